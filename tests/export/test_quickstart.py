"""The quickstart end to end (``--quick``: tiny budgets, real stages), and its report in headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.cli import main
from qbheat_contract.card import artifact_path, read_model_card
from qbheat.data import fashion_mnist

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not fashion_mnist.is_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
    out = tmp_path_factory.mktemp("quickstart") / "out"
    rc = main(["quickstart", "--quick", "--out", str(out)])
    assert rc == 0
    return out


def test_quickstart_writes_every_promised_file(quick_run):
    out = quick_run
    for name in ("report.html", "report.md", "report.json", "model_card.json", "linear_probe.json", "commands.sh",
                 "pretrain/last.pt", "classifier.pt", "bench_local-cpu-ort.json", "bench_local-cpu-openvino.json"):
        assert (out / name).is_file(), name
    card = read_model_card(out / "model_card.json")
    assert card["head"]["type"] == "classifier" and card["head"]["labels"] == list(fashion_mnist.CLASSES)
    shipped = {(a["format"], a["precision"]): a for a in card["artifacts"]}
    # FP32 always passes parity; every shipped runnable artifact was verified, the rest are listed with a reason
    assert shipped[("onnx", "fp32")]["verified"] == "parity"
    assert shipped[("openvino", "fp32")]["verified"] == "parity"
    for a in card["artifacts"]:
        assert a["verified"] in ("parity", "spec-only") and not a.get("mismatch")
        assert artifact_path(out / "model_card.json", a).exists()
    for n in card.get("not_built", []):
        assert n["reason"]
    # parity ran on held-out Fashion-MNIST training images, not on photographs
    assert "held out from calibration" in card["parity_images"]["source"]
    # pre-training trained every BatchNorm of the backbone (no stage left at its initial statistics)
    import torch

    state = torch.load(out / "pretrain" / "last.pt", map_location="cpu", weights_only=True)["backbone"]
    tracked = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked") and not k.startswith("head.")}
    assert tracked and min(tracked.values()) > 0, [k for k, v in tracked.items() if v == 0]
    # the same probe ran on a random-init backbone, and both accuracies reach the report
    pre = json.loads((out / "linear_probe.json").read_text())
    ref = json.loads((out / "random_init_probe.json").read_text())
    assert ref["source"]["init"] == "random" and pre["source"]["method"] == "qbheat"
    assert ref["data"]["test_images"] == pre["data"]["test_images"]
    report = json.loads((out / "report.json").read_text())
    labels = [p["label"] for p in report["probes"]]
    assert labels[1] == "random init" and labels[0].startswith("pre-trained")
    assert "Task accuracy" in (out / "report.html").read_text()
    # the commands it ran are the product's own CLI, in order
    lines = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("qbheat")]
    assert [line.split()[1] for line in lines] == ["pretrain", "probe", "probe", "export", "eval", "bench", "bench",
                                                   "bundle", "bundle", "report"]
    # every runnable artifact's accuracy on the test split, the drop against PyTorch, the recommendation per local target
    assert card["evaluation"]["data"]["count"] == 512
    for a in card["artifacts"]:
        acc = a["accuracy"]
        assert ("skipped" in acc) == (a["format"] == "coreml")
        if "top1" in acc:
            assert acc["drop_top1"] == pytest.approx(card["evaluation"]["pytorch"]["top1"] - acc["top1"], abs=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert [r["target"] for r in report["recommendations"]] == ["local-cpu-ort", "local-cpu-openvino"]
    assert all(r["choice"] is None or r["choice"]["drop_top1"] <= 1.0 for r in report["recommendations"])


def test_quickstart_bundles_for_phone_targets(quick_run):
    for name, artifact_suffix in (("iphone", ".mlpackage"), ("android", ".onnx")):
        bundle = quick_run / "bundles" / name
        meta = json.loads((bundle / "bundle.json").read_text())
        assert (bundle / "run_bundle.py").is_file() and (bundle / "golden.npz").is_file()
        assert any(a["path"].endswith(artifact_suffix) for a in meta["artifacts"]), meta["artifacts"]
    assert any((quick_run / "bundles" / "iphone" / "snippets").glob("*.swift"))
    assert any((quick_run / "bundles" / "android" / "snippets").glob("*.kt"))


def test_quickstart_report_has_measured_rows(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    rows = report["rows"]
    assert rows and all(r["stats"]["p50_ms"] > 0 for r in rows if "stats" in r)
    assert "<svg" in (quick_run / "report.html").read_text()
    assert "|" in (quick_run / "report.md").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_quickstart_report_renders_in_headless_chromium(quick_run, tmp_path):
    from PIL import Image

    url = (quick_run / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "<svg" in dom.stdout and "<table>" in dom.stdout, "the page has no plot or no table"
    png = tmp_path / "report.png"
    shot = subprocess.run([*flags, f"--screenshot={png}", "--window-size=1280,2000", url], capture_output=True, text=True,
                          timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-500:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colored = (np.abs(img[..., 0] - img[..., 2]) > 60).mean()  # plot bars are coloured; text and background are not
    assert img.std() > 10 and colored > 0.001


def test_quickstart_refuses_a_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["quickstart", "--quick", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_skimage_fallback_is_a_labelled_image_folder(tmp_path):
    from qbheat.data.samples import NAMES, write_crop_folder
    from qbheat.evaluation.sources import classification_data

    counts = write_crop_folder(tmp_path, n_per_class=5, size=64)
    assert counts == {"train": 4 * len(NAMES), "test": 1 * len(NAMES)}
    x, y, classes = classification_data(str(tmp_path), "train")
    assert x.shape[0] == counts["train"] and sorted(classes) == sorted(NAMES) and len(set(y.tolist())) == len(NAMES)
