"""The learning-curve benchmark, everything tiny (CI): milestones of one run per row and seed, merged and resumed."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qbheat.data import fashion_mnist

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get) for this test")
def test_learning_curves_smoke_probes_every_milestone_and_resumes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("learning_curves", BENCH / "learning_curves.py")
    lc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "learning_curves", lc)
    spec.loader.exec_module(lc)
    before = torch.get_num_threads()
    argv = ["--smoke", "--jobs", "1", "--work-dir", str(tmp_path)]
    try:
        result = lc.main(argv + ["--rows", "random", "qbheat", "mocov2"])
        points = {(p["row"], p["seed"], round(p["epochs"], 4)) for p in result["points"]}
        plan = result["milestones"]
        # MoCo-v2 gets the points of equal compute with QB-Heat's milestones, from the measured FLOPs ratio
        ratio = result["step_flops"]["qbheat"] / result["step_flops"]["mocov2"]
        assert 0 < ratio < 1.5 and len(plan["mocov2"]) >= 2
        for row in ("random", "qbheat", "mocov2"):
            assert {(row, s, round(e, 4)) for s in (0, 1) for e in plan[row]} <= points
        q = [p for p in result["points"] if p["row"] == "qbheat" and p["seed"] == 0]
        per_epoch = 60_000 // 32
        assert [p["steps"] for p in sorted(q, key=lambda p: p["epochs"])] == [round(e * per_epoch) for e in plan["qbheat"]]
        assert all(p["pretrain_flops"] == p["steps"] * result["step_flops"]["qbheat"] for p in q)
        for p in result["points"]:
            assert all(v is None or 0.0 <= v <= 1.0 for v in p["metrics"].values())
        # a second invocation adds a row and recomputes nothing that is done
        again = lc.main(argv + ["--rows", "supervised"])
        assert len(again["points"]) == len(result["points"]) + 2
        assert len(again["runs"]) == 2
        # a longer schedule is its own run: the same milestones again, kept beside the first schedule's
        longer = lc.main(argv + ["--rows", "qbheat", "--max-epochs", "0.016"])
        new = [p for p in longer["points"] if p["row"] == "qbheat" and p["schedule_epochs"] == 0.016]
        assert len(longer["points"]) == len(again["points"]) + 2 * len(plan["qbheat"]) == len(again["points"]) + len(new)
        groups = [(a["epochs"], a["schedule_epochs"]) for a in longer["summary"] if a["row"] == "qbheat"]
        assert sorted(groups) == sorted((round(e, 4), s) for e in plan["qbheat"] for s in (max(plan["qbheat"]), 0.016))
        assert (tmp_path / "qbheat_s0_sch0.016").is_dir()
    finally:
        torch.set_num_threads(before)
    saved = json.loads((tmp_path / "results" / "learning_curves.json").read_text())
    assert {a["row"] for a in saved["summary"]} == {"random", "supervised", "qbheat", "mocov2"}
    svg = (tmp_path / "results" / "learning_curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") >= 3 and 'stroke-dasharray="6,3"' in svg  # the longer schedule, dashed
    assert "| QB-Heat |" in (tmp_path / "results" / "learning_curves.md").read_text()
