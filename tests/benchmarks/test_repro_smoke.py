"""The Fashion-MNIST reproduction benchmark, everything tiny (CI): every row, every protocol, a report."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qbheat.data import fashion_mnist

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "repro_fashion_mnist.py"


@pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get) for this test")
def test_repro_smoke_has_every_row_and_numbers_in_range(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("repro_fashion_mnist", SCRIPT)
    repro = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "repro_fashion_mnist", repro)  # dataclasses look their module up
    spec.loader.exec_module(repro)
    before = torch.get_num_threads()
    try:
        result = repro.main(["--smoke", "--jobs", "1", "--threads", "1", "--no-progress",
                             "--work-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")])
    finally:
        torch.set_num_threads(before)
    expected = {"raw", "random", "supervised", "mocov2", "qbheat", "qbheat_s16", "qbheat_s32", "qbheat_rawpix", "qbheat_topleft",
                "qbheat_dec3", "mocov2_msbreg", "qbheat_hssl", "random_hcnet", "qbheat_hcnet"}
    assert set(result["rows"]) == expected
    for key, row in result["rows"].items():
        if not row["run"]:  # an addition that the trainer does not offer is listed, with the reason
            assert key in ("mocov2_msbreg", "qbheat_hssl") and row["why_not"]
            continue
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for metric, s in row["summary"].items():
            if key == "raw" and metric in ("nonlinear", "det_mAP", "det_AP50"):
                assert s["mean"] is None  # raw pixels have no spatial map or detector
                continue
            assert s["n"] == 2 and 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0, (key, metric, s)
    targets = [v["target"] for v in result["verdicts"]]
    assert "QB-Heat beats random init under every protocol" in targets
    assert any(t.startswith("non-linear probe") for t in targets) and any(t.startswith("frozen-backbone detection") for t in targets)
    saved = json.loads((tmp_path / "results" / "repro_fashion_mnist.json").read_text())
    assert saved["settings"]["smoke"] is True and saved["command"]
    md = (tmp_path / "results" / "repro_fashion_mnist.md").read_text()
    assert "SMOKE" in md and "| QB-Heat (mobileformer_micro) |" in md and "65.6 %" in md
    assert (tmp_path / "pretrain" / "qbheat_s0" / "last.pt").is_file()  # pre-training went through the trainer
