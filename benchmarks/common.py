"""What the latency benchmarks share: natural-image inputs, the export's own ONNX step, the package's runners.

Run the scripts as ``python benchmarks/<name>.py`` (their folder is then first on the import path, so
they import this module by name). Nothing here is a copy of package code: the ONNX file comes from the
export pipeline's own ``torch.export`` + dynamo step, and the runners are ``deploy_targets``'.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from deploy_targets.runners import get_runner
from qbheat.data.samples import sample_images
from qbheat_contract.preprocessing import Preprocessing

INPUT_NAME = "image"  # the export's input name


def images(n: int, size: int) -> np.ndarray:
    """``n`` natural-image crops (scikit-image's photographs) at ``size``, ImageNet-normalised N×3×H×W float32."""
    return Preprocessing(input_size=size).normalize(sample_images(n, size=size, seed=0))


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """PyTorch-default Linear init and random BN statistics, so activations are O(1) (the official
    Mobile-Former init, Linear N(0, 0.01), gives outputs near 1e-3 and would make parity vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        with torch.no_grad():
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound * math.sqrt(3), bound * math.sqrt(3), generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


class _ImageInput(nn.Module):
    """Names the graph's input as the export does (``torch.export`` takes it from ``forward``'s argument)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def export_onnx(model: nn.Module, size: int, path: Path, output_name: str = "y") -> Path:
    """The export pipeline's ONNX step (``export.source.export_program``: torch.export with an example batch
    of 2 and a symbolic batch, then ``export.onnx_format.export_program``: the dynamo exporter, opset 20)."""
    from export.onnx_format import export_program as to_onnx
    from export.source import export_program

    program, example = export_program(_ImageInput(model).eval(), size, max_batch=64)
    to_onnx(program, example, path, INPUT_NAME, (output_name,), {})
    return path


def onnx_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class ArrayRunner:
    """A ``deploy_targets`` runner called with one array; returns the first output. Other attributes
    (``session``, ``compiled``) are the runner's."""

    def __init__(self, runtime: str, path: Path, threads: int, batch: int | None = None, **options):
        self.runner = get_runner(runtime, threads=threads, precision="fp32", **options).load(path, batch=batch)
        self.name = self.runner.inputs()[0]["name"]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["runner"], name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return next(iter(self.runner.run({self.name: x}).values()))


def OrtRunner(path: Path, threads: int, spinning: bool = True, profile_prefix: str | None = None) -> ArrayRunner:  # noqa: N802
    """ONNX Runtime with intra-op spinning on or off (``profile_prefix``: its per-node profiler on)."""
    return ArrayRunner("onnxruntime", path, threads, allow_spinning=spinning, profile_prefix=profile_prefix)


def OpenVinoRunner(path: Path, threads: int, perf_count: bool = False) -> ArrayRunner:  # noqa: N802
    """OpenVINO as the runner sets it up (f32 hint, LATENCY, one stream, ``threads`` threads; compiled for
    batch 1, other shapes on first use). The file is read as it is: an ONNX graph directly, with no fp16
    weight compression on the way."""
    return ArrayRunner("openvino", path, threads, batch=1, perf_count=perf_count)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
