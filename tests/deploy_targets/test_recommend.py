"""The recommendation on synthetic timings: the fastest configuration within the accuracy budget,
faster only beyond the measured noise, the INT8 verdict, the Pareto front, and the HTML plot."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deploy_targets.recommend import pareto_front, recommend, slower_beyond_noise
from deploy_targets.report import build_report, svg_accuracy_pareto
from deploy_targets.results import new_document, write_document
from export.cli import main


def _row(target: str, path: str, precision: str, p50: float, mad: float, drop: float | None, threads: int = 2, batch: int = 1,
         top1: float = 80.0) -> dict:
    s = {"n": 30, "mean": p50, "std": mad, "cv": mad / p50, "p50": p50, "p90": p50 + mad, "p99": p50 + mad, "min": p50 - mad,
         "max": p50 + mad, "mad": mad, "trimmed_mean": p50, "cv_warning": False, "warmup_runs": 10, "samples_ms": [p50] * 30}
    fmt = "openvino" if path.endswith(".xml") else "onnx"
    acc = None if drop is None else {"top1": top1 - drop, "top5": 99.0, "drop_top1": drop, "drop_top1_ci": [drop - 0.3, drop + 0.3], "n": 10000}
    return {"target": target, "hardware": "x", "model": "mf", "head": "classifier", "runtime": "onnxruntime" if fmt == "onnx" else "openvino",
            "threads": threads, "batch": batch, "options": {}, "artifact": {"path": path, "format": fmt, "precision": precision,
                                                                          "sha256": "ab" * 32, "size_bytes": 10},
            "load_ms": 50.0, "first_inference_ms": 9.0, "steady": s, "end_to_end": None, "warnings": [],
            "fingerprint": {"cpu_model": "Test CPU", "cores": 2, "os": "Linux", "runtime": "onnxruntime", "runtime_version": "1",
                            "precision": precision, "threads": threads, "artifact_sha256": "ab" * 32},
            "parity": None, "accuracy": acc, "golden": None, "macs": 1, "flops": 2, "params": 1}


def test_the_fastest_within_the_budget_wins_and_over_budget_rows_are_excluded():
    rows = [_row("phone", "onnx/model.fp32.onnx", "fp32", 10.0, 0.05, 0.0),
            _row("phone", "onnx/model.int8.onnx", "int8", 6.0, 0.05, 0.4),
            _row("phone", "onnx/model.int8.onnx", "int8", 4.0, 0.05, 0.4, threads=4),
            _row("phone", "openvino/int8/model.xml", "int8", 3.0, 0.05, 2.5)]  # fastest, but loses 2.5 points
    (rec,) = recommend(rows, max_drop=1.0)
    c = rec["choice"]
    assert (c["artifact"], c["threads"], c["p50_ms"]) == ("onnx/model.int8.onnx", 4, 4.0)
    assert rec["reason"] == "the fastest within the budget"
    assert rec["over_budget"] == [{"label": "phone · openvino/int8 · openvino · t2 b1", "drop_top1": 2.5}]
    assert rec["int8"] == "onnx: INT8 is faster than FP32 here: 2.50× (4.000 vs 10.000 ms p50)"
    # a tighter budget leaves only FP32
    assert recommend(rows, max_drop=0.2)[0]["choice"]["precision"] == "fp32"


def test_a_configuration_is_faster_only_beyond_the_noise():
    # INT8 3 % faster on noisy timings (MAD 4 % of p50): not faster, so the more accurate FP32 is chosen
    fp32 = _row("pi", "onnx/model.fp32.onnx", "fp32", 10.0, 0.4, 0.0)
    int8 = _row("pi", "onnx/model.int8.onnx", "int8", 9.7, 0.4, 0.6)
    assert not slower_beyond_noise(fp32, int8)
    (rec,) = recommend([fp32, int8], max_drop=1.0)
    assert rec["choice"]["precision"] == "fp32" and rec["fastest"]["precision"] == "int8"
    assert "within the measured noise" in rec["reason"] and rec["tied"] == ["pi · onnx/int8 · onnxruntime · t2 b1"]
    assert rec["int8"].startswith("onnx: INT8 is not faster than FP32 here") and "within the measured noise" in rec["int8"]
    # the same 3 % on quiet timings is still under the 5 % floor; 30 % faster is beyond it
    quiet3 = [_row("pi", "onnx/model.fp32.onnx", "fp32", 10.0, 0.01, 0.0), _row("pi", "onnx/model.int8.onnx", "int8", 9.7, 0.01, 0.6)]
    assert recommend(quiet3, 1.0)[0]["choice"]["precision"] == "fp32"
    quiet = [_row("pi", "onnx/model.fp32.onnx", "fp32", 10.0, 0.01, 0.0), _row("pi", "onnx/model.int8.onnx", "int8", 7.0, 0.01, 0.6)]
    assert recommend(quiet, 1.0)[0]["choice"]["precision"] == "int8"
    # INT8 slower beyond the noise is called slower
    slow = [_row("pi", "onnx/model.fp32.onnx", "fp32", 10.0, 0.01, 0.0), _row("pi", "onnx/model.int8.onnx", "int8", 13.0, 0.01, 0.6)]
    assert recommend(slow, 1.0)[0]["int8"].startswith("onnx: INT8 is slower than FP32 here")
    # ties within the noise prefer fewer threads, then the smaller batch
    ties = [_row("pi", "a.onnx", "fp32", 10.0, 0.3, 0.0, threads=4), _row("pi", "a.onnx", "fp32", 10.2, 0.3, 0.0, threads=1)]
    assert recommend(ties, 1.0)[0]["choice"]["threads"] == 1


def test_rows_without_accuracy_are_not_recommended():
    (rec,) = recommend([_row("pi", "onnx/model.fp32.onnx", "fp32", 10.0, 0.05, None)], 1.0)
    assert rec["choice"] is None and "qbheat-export eval" in rec["reason"] and rec["unmeasured"]


def test_pareto_front():
    pts = [(1.0, 70.0), (2.0, 75.0), (2.5, 74.0), (3.0, 75.0), (4.0, 80.0), (0.5, 60.0)]
    assert pareto_front(pts) == [5, 0, 1, 4]  # (2.5, 74) and (3, 75) are beaten by (2, 75)


def _rows_for_two_devices() -> list[dict]:
    return [_row("laptop", "onnx/model.fp32.onnx", "fp32", 3.0, 0.01, 0.0), _row("laptop", "onnx/model.int8.onnx", "int8", 2.0, 0.01, 0.5),
            _row("laptop", "onnx/model.fp16.onnx", "fp16", 3.5, 0.01, 0.1), _row("pi5", "onnx/model.fp32.onnx", "fp32", 21.0, 0.1, 0.0),
            _row("pi5", "onnx/model.int8.onnx", "int8", 12.0, 0.1, 1.5)]


def test_report_recommend_cli_writes_the_recommendation_and_bundle_best_uses_it(tmp_path, capsys):
    run = write_document(dict(new_document(["bench"], {"min_runs": 30}, {}), rows=_rows_for_two_devices()), tmp_path / "a.json")
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--recommend"]) == 2
    assert "--recommend needs --max-drop" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--recommend", "--max-drop", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "laptop: onnx/int8 onnx/model.int8.onnx" in printed and "pi5: onnx/fp32 onnx/model.fp32.onnx" in printed
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["choice"]["precision"] for r in doc["recommendations"]] == ["int8", "fp32"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Recommendation (top-1 drop at most 1 points)" in md and "## Accuracy vs latency" in md


def test_bundle_best_bundles_only_the_recommended_artifact(export_dir, tmp_path, capsys):
    # the fixture export holds model.onnx and model.xml; the OpenVINO profile runs both
    rows = [_row("local-cpu-openvino", "model.onnx", "fp32", 3.0, 0.01, 0.0), _row("local-cpu-openvino", "model.xml", "fp32", 2.0, 0.01, 0.0, threads=1)]
    run = write_document(dict(new_document(["bench"], {"min_runs": 30}, {}), rows=rows), tmp_path / "a.json")
    out = tmp_path / "bundle"
    assert main(["bundle", str(export_dir), "--target", "local-cpu-openvino", "--out", str(out), "--best", str(run)]) == 2
    assert "--best needs --max-drop" in capsys.readouterr().err
    assert main(["bundle", str(export_dir), "--target", "local-cpu-openvino", "--out", str(out), "--best", str(run), "--max-drop", "1"]) == 0
    bundle = json.loads((out / "bundle.json").read_text())
    assert [a["path"] for a in bundle["artifacts"]] == ["artifacts/model.xml"]
    assert bundle["profile"]["threads"] == [1] and bundle["profile"]["batch"] == [1]


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_pareto_svg_marks_the_front():
    svg = svg_accuracy_pareto(_rows_for_two_devices(), "laptop")
    assert svg.count('class="pareto"') == 2 and svg.count('class="config"') == 1  # fp16 is slower and less accurate than fp32
    assert 'class="pareto-front"' in svg and svg_accuracy_pareto(_rows_for_two_devices(), "nowhere") == ""


def test_a_detectors_rows_are_plotted_and_recommended_by_coco_map(tmp_path):
    rows = _rows_for_two_devices()[:3]
    for r in rows:  # a detector export's card: COCO mAP and its drop, no top-1
        drop = r["accuracy"]["drop_top1"]
        r["head"], r["accuracy"] = "detector", {"mAP": 30.0 - drop, "AP50": 50.0, "drop_mAP": drop, "drop_mAP_ci": [drop - 0.2, drop + 0.2]}
    svg = svg_accuracy_pareto(rows, "laptop")
    assert "laptop: COCO mAP vs p50 latency" in svg and ">COCO mAP %</text>" in svg and "top-1" not in svg
    assert svg.count('class="pareto"') == 2 and svg.count('class="config"') == 1
    run = write_document(dict(new_document(["bench"], {"min_runs": 30}, {}), rows=rows), tmp_path / "a.json")
    doc = build_report([run], tmp_path / "out", max_drop=1.0)
    assert doc["recommendations"][0]["choice"]["precision"] == "int8"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Recommendation (COCO mAP drop at most 1 points)" in md and "| laptop | " in md and " COCO mAP | yes |" in md
    assert "laptop: COCO mAP vs p50 latency" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_html_with_the_pareto_plot_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    run = write_document(dict(new_document(["bench"], {"min_runs": 30}, {}), rows=_rows_for_two_devices()), tmp_path / "a.json")
    build_report([run], tmp_path / "out", max_drop=1.0)
    url = (tmp_path / "out" / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert dom.stdout.count('class="plot pareto-plot"') == 2 and dom.stdout.count('class="pareto-front"') == 2
    assert "Recommendation" in dom.stdout
    png = tmp_path / "shot.png"
    shot = subprocess.run([*flags, f"--screenshot={png}", "--window-size=1280,4000", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-500:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)  # the front's #d62728
    assert red.sum() > 200


def _detector_row(target: str, path: str, precision: str, p50: float, drop_map: float) -> dict:
    row = _row(target, path, precision, p50, 0.05, None)
    row["head"] = "detector"
    row["accuracy"] = {"mAP": 40.0 - drop_map, "AP50": 70.0, "AP75": 40.0, "detections": 900, "drop_mAP": drop_map,
                       "drop_mAP_ci": [drop_map - 0.4, drop_map + 0.4], "n": 500}
    return row


def test_detector_rows_are_judged_on_their_map_drop():
    rows = [_detector_row("phone", "onnx/model.fp32.onnx", "fp32", 10.0, 0.0),
            _detector_row("phone", "onnx/model.int8.onnx", "int8", 6.0, 0.8),
            _detector_row("phone", "openvino/int8/model.xml", "int8", 3.0, 1.7)]  # fastest, but loses 1.7 mAP points
    (rec,) = recommend(rows, max_drop=1.0)
    c = rec["choice"]
    assert (c["artifact"], c["drop"], c["drop_metric"], c["drop_top1"]) == ("onnx/model.int8.onnx", 0.8, "COCO mAP", None)
    assert c["drop_ci"] == pytest.approx([0.4, 1.2]) and rec["unmeasured"] == []
    assert rec["over_budget"] == [{"label": "phone · openvino/int8 · openvino · t2 b1", "drop_mAP": 1.7}]
    assert recommend(rows, max_drop=0.5)[0]["choice"]["precision"] == "fp32"
    from deploy_targets.recommend import format_recommendations

    assert "COCO mAP drop +0.80 points (budget 1)" in format_recommendations([rec])[0]
    from deploy_targets.report import _accuracy_cells

    assert _accuracy_cells(rows[1]) == ["39.20 mAP", "+0.80 [+0.40, +1.20]"]
