"""Fixtures: a tiny classifier exported the way the export pipeline does it (dynamo ONNX with a
dynamic batch, OpenVINO IR converted from it) plus a hand-written model card, at 32×32 so every
test stays fast. Built once per session."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from qbheat_contract.card import SCHEMA, write_model_card

SIZE = 32
LABELS = ["tee", "trouser", "pullover", "dress", "coat"]


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, len(LABELS))

    def forward(self, x):  # B×3×32×32 -> B×5
        y = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(y.mean((2, 3)))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_export_dir(folder: Path, with_openvino: bool = True) -> Path:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    onnx_path = folder / "model.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=True, input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    artifacts = [{"format": "onnx", "precision": "fp32", "path": "model.onnx", "sha256": _sha(onnx_path),
                  "size_bytes": onnx_path.stat().st_size, "opset": 20, "verified": "parity",
                  "parity": {"max_abs": 1e-7, "cosine": 1.0, "top1_agreement": 1.0}}]
    if with_openvino:
        import openvino as ov

        ov.save_model(ov.convert_model(str(onnx_path)), str(folder / "model.xml"), compress_to_fp16=False)
        from qbheat_contract.hashing import artifact_sha256 as sha256_path
        artifacts.append({"format": "openvino", "precision": "fp32", "path": "model.xml",
                          "sha256": sha256_path(folder / "model.xml"), "size_bytes": (folder / "model.bin").stat().st_size,
                          "verified": "parity", "parity": {"max_abs": 2e-7, "cosine": 1.0, "top1_agreement": 1.0}})
    card = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": "tiny_classifier", "source": {"kind": "timm", "path": None, "sha256": None},
                  "pretrain_method": None, "params": sum(p.numel() for p in model.parameters()), "macs": 89_000, "flops": 178_000},
        "head": {"type": "classifier", "variant": "linear", "labels": LABELS},
        "preprocessing": {"input_size": [3, SIZE, SIZE], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "interpolation": "bilinear", "crop_pct": 0.875, "color": "RGB", "pixel_scale": 1 / 255, "layout": "NCHW"},
        "io": {"inputs": [{"name": "x", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"}],
               "outputs": [{"name": "logits", "shape": ["batch", len(LABELS)], "dtype": "float32"}]},
        "artifacts": artifacts,
        "tools": {"torch": torch.__version__},
    }
    write_model_card(folder, card)
    return folder


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return make_export_dir(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return TinyClassifier().eval()


@pytest.fixture
def jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()
