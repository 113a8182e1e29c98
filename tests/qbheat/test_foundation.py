"""The pieces every stage shares: the torchvision shim, checkpoints, data readers, the CLI."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from qbheat import _compat
from qbheat.checkpoint import load_checkpoint, save_checkpoint
from qbheat_contract.hashing import artifact_sha256 as sha256_file
from qbheat.cli import main as qbheat_main
from qbheat.data import fashion_mnist, samples
from qbheat.errors import QBHeatError


def test_timm_imports_after_shim():
    import timm

    assert timm.is_model("mobilenetv3_small_100")


def test_shim_nms_matches_greedy_definition():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 9, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses 0 (IoU 0.81) and 1 (IoU 0.55); box 2 does not overlap.
    assert _compat.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert torch.ops.torchvision.nms(boxes, scores, 0.5).tolist() == [3, 2]


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"kind": "pretrain", "model": {"name": "x", "kwargs": {}}, "backbone": {"w": torch.ones(2)}})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "qbheat" and torch.equal(ckpt["backbone"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    with pytest.raises(QBHeatError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(QBHeatError, match="corrupt"):
        load_checkpoint(bad)
    with pytest.raises(QBHeatError, match="expected one of"):
        load_checkpoint(path, kinds=("probe",))
    torch.save({"format": "other"}, bad)
    with pytest.raises(QBHeatError, match="not a qbheat checkpoint"):
        load_checkpoint(bad)


def test_sha256_of_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"abc")
    assert sha256_file(tmp_path / "d" / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    before = sha256_file(tmp_path / "d")
    (tmp_path / "d" / "b").write_bytes(b"")
    assert sha256_file(tmp_path / "d") != before


@pytest.mark.skipif(not fashion_mnist.is_available(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_reader():
    x, y = fashion_mnist.load("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = fashion_mnist.load("test")
    assert xt.shape == (10000, 28, 28) and yt[:3].tolist() == [9, 2, 1]


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("QBHEAT_FASHION_MNIST_DIR", str(tmp_path))
    fashion_mnist.load.cache_clear()
    with pytest.raises(QBHeatError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("train")
    fashion_mnist.load.cache_clear()


def test_sample_images_are_real_and_deterministic():
    a = samples.sample_images(18, 64, seed=1)
    b = samples.sample_images(18, 64, seed=1)
    assert a.shape == (18, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.reshape(18, -1).std(axis=1).min() > 5  # photographs, not flat fills


def test_cli_reports_user_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "qbheat.cli", "nosuchcommand"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_timm_imports_before_qbheat_in_this_environment():
    """A newcomer's first line, `import timm`, works in the project's venv: setup's start-up hook runs the
    torchvision shim before torchvision loads (scripts/torchvision_hook.py)."""
    code = "import sys, timm; print('torchvision' in sys.modules, timm.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-400:]
    assert proc.stdout.split()[0] == "True"
