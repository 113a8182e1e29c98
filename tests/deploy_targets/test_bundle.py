"""A bundle runs in a Python that can import only numpy and the runtime, verifies golden outputs,
and writes the same JSON as bench; a damaged artifact or wrong expected outputs fail it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numpy
import onnxruntime

from qbheat_contract.errors import QBHeatError
from deploy_targets.bundle import write_bundle
from deploy_targets.profiles import load_profile
from deploy_targets.results import validate_document
from qbheat_contract.card import read_model_card

from conftest import SIZE

SITE = Path(numpy.__file__).parent.parent


@pytest.fixture(scope="module")
def isolated_path(tmp_path_factory) -> Path:
    """A folder holding only numpy and onnxruntime (symlinks into this venv): the device's site-packages."""
    folder = tmp_path_factory.mktemp("device_site")
    for name in ("numpy", "numpy.libs", "onnxruntime"):
        if (SITE / name).exists():
            (folder / name).symlink_to(SITE / name)
    assert Path(onnxruntime.__file__).parent.parent == SITE
    return folder


def _device_python(isolated: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # -S: no site module, so no site-packages; -s: no user site; PYTHONPATH: only the two packages.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(isolated), "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-S", "-s", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle(export_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundles")
    profile_path = folder / "pi.toml"
    text = (Path(load_profile("rpi5-ort").source)).read_text()
    profile_path.write_text(text.replace('name = "rpi5-ort"', 'name = "my-pi"').replace("threads = [1, 4]", "threads = [1]").replace("batch = [1]", "batch = [1, 2]"))
    return write_bundle(read_model_card(export_dir), export_dir, load_profile(str(profile_path)), folder / "pi_bundle")


def test_bundle_layout(bundle):
    """The profile says 224×224 but the card says SIZE: the card's size, at which parity was verified, wins."""
    names = {p.name for p in bundle.iterdir()}
    assert {"run_bundle.py", "bundle.json", "golden.npz", "golden.jpg", "README.md", "model_card.json", "qbheat_bench", "artifacts", "snippets"} <= names
    meta = json.loads((bundle / "bundle.json").read_text())
    assert [a["format"] for a in meta["artifacts"]] == ["onnx"]  # the Pi's ORT takes the ONNX file, not the IR
    assert "parity with PyTorch verified" in meta["golden_reference"]
    assert sorted(p.name for p in (bundle / "qbheat_bench" / "runners").iterdir() if p.suffix == ".py") == ["__init__.py", "onnxruntime_runner.py"]
    with np.load(bundle / "golden.npz") as z:
        assert z["input:x"].shape == (4, 3, SIZE, SIZE) and z["output:logits"].shape == (4, 5) and z["images"].dtype == np.uint8
    readme = (bundle / "README.md").read_text()
    assert meta["profile"]["input_size"] == [SIZE, SIZE]
    assert "{{" not in readme and "ssh -- raspberrypi.local" in readme and "my-pi" in readme
    assert (bundle / "snippets" / "model_onnx.kt").exists()


def test_device_python_really_lacks_qbheat_and_torch(isolated_path, tmp_path):
    probe = "import numpy, onnxruntime\nfor m in ('torch', 'qbheat', 'deploy_targets', 'PIL'):\n    try:\n        __import__(m)\n        print('HAS', m)\n    except ImportError:\n        print('no', m)\n"
    r = _device_python(isolated_path, ["-c", probe], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["no", "torch", "no", "qbheat", "no", "deploy_targets", "no", "PIL"]


def test_bundle_runs_isolated_and_writes_bench_json(bundle, isolated_path, tmp_path):
    out = tmp_path / "result.json"
    r = _device_python(isolated_path, [str(bundle / "run_bundle.py"), "--quick", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Pillow is not installed; skipping the end-to-end timing" in r.stderr
    doc = validate_document(json.loads(out.read_text()))
    assert [(row["batch"], row["golden"]["passed"]) for row in doc["rows"]] == [(1, True), (2, True)]
    assert doc["rows"][0]["fingerprint"]["runtime"] == "onnxruntime" and doc["rows"][0]["end_to_end"] is None
    assert doc["rows"][0]["golden"]["max_abs"] < 1e-5 and "my-pi" in doc["targets"]


def test_damaged_artifact_and_wrong_golden_fail(bundle, isolated_path, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    with open(broken / "artifacts" / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = _device_python(isolated_path, [str(broken / "run_bundle.py"), "--quick"], tmp_path)
    assert r.returncode == 2 and "the copy is damaged" in r.stderr and "Traceback" not in r.stderr

    wrong = tmp_path / "wrong"
    shutil.copytree(bundle, wrong)
    with np.load(wrong / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output:logits"] = arrays["output:logits"][:, ::-1].copy()
    np.savez(wrong / "golden.npz", **arrays)
    r = _device_python(isolated_path, [str(wrong / "run_bundle.py"), "--quick", "--out", str(tmp_path / "w.json")], tmp_path)
    assert r.returncode == 1 and "FAILED the golden-output check" in r.stderr
    assert not json.loads((tmp_path / "w.json").read_text())["rows"][0]["golden"]["passed"]


def test_bundle_refuses_what_the_target_cannot_run(export_dir, tmp_path):
    card = read_model_card(export_dir)
    with pytest.raises(QBHeatError, match="has no artifact that litert runs"):
        write_bundle(card, export_dir, load_profile("android-litert-xnnpack"), tmp_path / "b")
    damaged = tmp_path / "export"
    shutil.copytree(export_dir, damaged)
    (damaged / "model.onnx").unlink()
    with pytest.raises(QBHeatError, match="model.onnx does not exist"):
        write_bundle(card, damaged, load_profile("local-cpu-ort"), tmp_path / "c")
    assert not (tmp_path / "c").exists() and not any(p.name.startswith(".c") for p in tmp_path.iterdir())


def test_tensorrt_targets_never_take_the_onnx_runtime_int8_file():
    """ONNX INT8 is typed for ONNX Runtime (zero points, INT32 biases), which TensorRT's parser rejects."""
    import dataclasses

    from deploy_targets.bundle import select_artifacts

    card = {"artifacts": [{"format": "onnx", "precision": p, "path": f"onnx/model.{p}.onnx"} for p in ("fp32", "fp16", "int8")]}
    trt = load_profile("desktop-nvidia-tensorrt")
    assert [a["precision"] for a in select_artifacts(card, trt)] == ["fp16"]
    assert [a["precision"] for a in select_artifacts(card, dataclasses.replace(trt, precision="any"))] == ["fp32", "fp16"]
    with pytest.raises(QBHeatError, match="no artifact that tensorrt runs at precision int8"):
        select_artifacts(card, dataclasses.replace(trt, precision="int8"))
    ort = dataclasses.replace(load_profile("local-cpu-ort"), precision="int8")
    assert [a["precision"] for a in select_artifacts(card, ort)] == ["int8"]
