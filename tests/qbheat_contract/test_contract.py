"""The contract package: torch-free, one hash rule, one preprocessing recipe, one tolerance table."""
from __future__ import annotations

import hashlib
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from qbheat_contract import parity
from qbheat_contract.errors import QBHeatError
from qbheat_contract.hashing import artifact_files, artifact_sha256, artifact_size, file_sha256
from qbheat_contract.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[2]
DEVICE_SIDE = ["qbheat_contract", "qbheat_contract.card", "qbheat_contract.hashing", "qbheat_contract.parity",
               "qbheat_contract.preprocessing", "deploy_targets.harness", "deploy_targets.runners",
               *[f"deploy_targets.runners.{m}_runner" for m in ("onnxruntime", "openvino", "tensorrt", "coreml", "litert")],
               "deploy_targets.bundle", "deploy_targets.report", "deploy_targets.flops"]


def test_importing_the_harness_and_runners_does_not_import_torch():
    code = ("import importlib, sys\n"
            f"for m in {DEVICE_SIDE!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'qbheat', 'export', 'timm', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_one_hash_rule_for_files_companions_and_folders(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"abc")
    assert artifact_sha256(tmp_path / "m.onnx") == hashlib.sha256(b"abc").hexdigest()  # one file: sha256sum's value
    xml, bin_ = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_bytes(b"<net/>")
    bin_.write_bytes(b"\0" * 8)
    expected = hashlib.sha256(b"m.bin\0" + b"\0" * 8 + b"m.xml\0" + b"<net/>").hexdigest()
    assert artifact_sha256(xml) == expected and artifact_size(xml) == 14
    bin_.write_bytes(b"\1" * 8)  # the weights change: so does the IR's hash
    assert artifact_sha256(xml) != expected and file_sha256(xml) == hashlib.sha256(b"<net/>").hexdigest()
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "w.bin").write_bytes(b"w")
    assert [name for name, _ in artifact_files(pkg)] == ["Data/w.bin", "Manifest.json"]
    before = artifact_sha256(pkg)
    (pkg / "Data" / "w.bin").rename(pkg / "Data" / "v.bin")  # same bytes, another name
    assert artifact_sha256(pkg) != before
    (tmp_path / "e.engine").write_bytes(b"plan")
    (tmp_path / "e.engine.json").write_text("{}")
    assert [n for n, _ in artifact_files(tmp_path / "e.engine")] == ["e.engine", "e.engine.json"]


def test_preprocessing_round_trips_the_card_block_and_crops_like_timm():
    pre = Preprocessing(input_size=32, interpolation="bilinear", crop_pct=0.875)
    assert pre.input_size == (3, 32, 32) and Preprocessing.from_dict(pre.card()) == pre
    assert set(pre.card()) == {"input_size", "mean", "std", "interpolation", "crop_pct", "color", "pixel_scale", "layout"}
    assert Preprocessing() == Preprocessing(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875)  # timm's
    assert pre.resized_size(48, 64) == (36, 48)  # short side 32 / 0.875 = 36.57 → 36
    crop = pre.decode_and_crop(np.full((48, 64, 3), 255, np.uint8))
    assert crop.shape == (32, 32, 3)
    x = pre.normalize(crop)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], (1 - np.asarray(pre.mean)) / np.asarray(pre.std), rtol=1e-6)
    with pytest.raises(QBHeatError, match="interpolation"):
        Preprocessing(interpolation="lanczos")


def test_export_and_golden_checks_share_one_table():
    ref = {"y": np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.5]], np.float32)}
    noisy = {"y": ref["y"] * np.float32(1.02)}
    for precision in ("fp32", "fp16", "int8"):
        got = parity.check_outputs(noisy, ref, precision)
        tol = parity.tolerance(None, precision)
        assert got["tolerance"]["cosine"] == tol.cosine
        assert got["passed"] == (tol.rel_max is None or 0.02 <= tol.rel_max)
    assert parity.check_outputs(noisy, ref, "int8", "coreml")["tolerance"] == parity.tolerance_table()["coreml/int8"]
    assert not parity.check_outputs(noisy, ref, "fp16", override={"cosine": 1.01})["passed"]
