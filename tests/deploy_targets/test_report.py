"""Report rendering: JSON schema, Markdown tables, single-file HTML with SVG plots, regression flags,
and a headless-Chromium check that the page shows a plot and a table."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qbheat_contract.errors import QBHeatError
from deploy_targets.report import build_report, compare, to_markdown
from deploy_targets.results import SCHEMA, new_document, write_document

from export.cli import main as export_main


def _row(target: str, fmt: str, precision: str, p50: float, mad: float, agreement: float) -> dict:
    samples = [p50 - mad, p50, p50 + mad] * 10
    s = {"n": 30, "mean": p50, "std": mad, "cv": mad / p50, "p50": p50, "p90": p50 + mad, "p99": p50 + mad, "min": p50 - mad,
         "max": p50 + mad, "mad": mad, "trimmed_mean": p50, "cv_warning": mad / p50 > 0.025, "warmup_runs": 10, "samples_ms": samples}
    return {"target": target, "hardware": "x", "model": "mf", "head": "classifier", "runtime": "onnxruntime" if fmt == "onnx" else "openvino",
            "threads": 2, "batch": 1, "options": {}, "artifact": {"path": f"model.{fmt}", "format": fmt, "precision": precision, "sha256": "ab" * 32, "size_bytes": 10},
            "load_ms": 50.0, "first_inference_ms": 9.0, "steady": s, "end_to_end": None, "warnings": [],
            "fingerprint": {"cpu_model": "Test CPU", "cores": 2, "os": "Linux", "runtime": "onnxruntime", "runtime_version": "1", "precision": precision,
                            "threads": 2, "artifact_sha256": "ab" * 32},
            "parity": {"top1_agreement": agreement, "cosine": 0.999}, "golden": None, "macs": 1, "flops": 2, "params": 1}


def _doc(rows) -> dict:
    doc = new_document(["qbheat-export", "bench"], {"min_runs": 30}, {"laptop": {}})
    doc["rows"] = rows
    return doc


def test_compare_flags_only_changes_beyond_the_noise():
    base = _doc([_row("laptop", "onnx", "fp32", 10.0, 0.05, 1.0), _row("laptop", "xml", "int8", 10.0, 1.0, 0.98),
                 _row("laptop", "xml", "fp32", 10.0, 0.05, 1.0)])
    cur = copy.deepcopy(base)
    cur["rows"][0]["steady"]["p50"] = 10.8   # +8 %: quiet rows -> threshold 5 % -> regression
    cur["rows"][1]["steady"]["p50"] = 11.5   # +15 %, but noisy (MAD 10 %): threshold 2·√2·1.48·0.1 ≈ 42 % -> within noise
    cur["rows"][2]["steady"]["p50"] = 9.0    # -10 % -> improvement
    verdicts = [c["verdict"] for c in compare(cur, base)]
    assert verdicts == ["regression", "within noise", "improvement"]
    c = compare(cur, base)[1]
    assert c["threshold"] == pytest.approx(2 * np.hypot(1.4826 * 1.0 / 10.0, 1.4826 * 1.0 / 11.5))
    assert compare(cur, base)[0]["threshold"] == 0.05


def test_report_files(tmp_path):
    a = write_document(_doc([_row("laptop", "onnx", "fp32", 3.0, 0.01, 1.0), _row("laptop", "xml", "int8", 1.9, 0.02, 0.97)]), tmp_path / "a.json")
    b_doc = _doc([_row("pi5", "onnx", "fp32", 21.0, 0.3, 1.0)])
    b_doc["targets"] = {"pi5": {}}
    b = write_document(b_doc, tmp_path / "b.json")
    merged = build_report([a, b], tmp_path / "out", baseline=a)
    assert merged["schema"] == SCHEMA and len(merged["rows"]) == 3 and merged["sources"] == [str(a), str(b)]
    assert set(merged["targets"]) == {"laptop", "pi5"}
    assert [c["verdict"] for c in merged["comparisons"]] == ["within noise", "within noise"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"][2]["target"] == "pi5"
    md = (tmp_path / "out" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| laptop") or line.startswith("| pi5")]
    assert len(table) >= 3 and "| 3.000 |" in table[0] and "## Against the baseline" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<svg") == 2 and "<table>" in page and "<rect" in page and "<circle" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page and "<script" not in page


def test_report_refuses_other_json(tmp_path):
    (tmp_path / "x.json").write_text('{"schema": "qbheat.model_card/1"}')
    with pytest.raises(QBHeatError, match="is not a qbheat.bench_report/1 document"):
        build_report([tmp_path / "x.json"], tmp_path / "out")
    assert export_main(["report", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 2


def test_markdown_environment_names_pinned_cores_and_instruction_sets():
    row = _row("laptop", "xml", "int8", 2.0, 0.02, 0.99)
    row["fingerprint"].update(cores=16, usable_cores=2, cpu_features=["avx512_vnni", "amx_int8"])
    assert "Test CPU (2 of 16 cores, avx512_vnni amx_int8)" in to_markdown(_doc([row]))
    assert "Test CPU (2 cores)" in to_markdown(_doc([_row("laptop", "xml", "int8", 2.0, 0.02, 0.99)]))


def test_option_labels_name_numbers_and_flags():
    from deploy_targets.results import format_table, options_label, row_label

    row = _row("laptop", "xml", "fp32", 2.0, 0.02, 1.0)
    row["options"] = {"device": "CPU", "inference_precision": "f32", "static_shapes": True, "streams": 1}
    assert options_label(row) == "CPU,f32,static_shapes=True,streams=1"
    assert "openvino CPU,f32,static_shapes=True,streams=1" in format_table([row]) and "CPU,f32,static_shapes=True" in row_label(row)
    assert "(CPU f32 static_shapes=True streams=1)" in to_markdown(_doc([row]))


def test_markdown_marks_noisy_rows():
    md = to_markdown(_doc([_row("laptop", "xml", "int8", 2.0, 0.2, 0.97)]))
    assert "10.0 ⚠" in md


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_html_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    rows = [_row("laptop", "onnx", "fp32", 3.0, 0.01, 1.0), _row("laptop", "xml", "int8", 1.9, 0.02, 0.97), _row("pi5", "onnx", "fp32", 21.0, 0.3, 1.0)]
    build_report([write_document(_doc(rows), tmp_path / "a.json")], tmp_path / "out")
    url = (tmp_path / "out" / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "<svg" in dom.stdout and "<table>" in dom.stdout and "<rect" in dom.stdout
    png = tmp_path / "shot.png"
    shot = subprocess.run([*flags, f"--screenshot={png}", "--window-size=1280,2000", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-500:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (2000, 1280)
    colored = (np.abs(img[..., 0] - img[..., 2]) > 60).mean()   # the bars' blue/orange, not grey text or white
    assert img.std() > 10 and colored > 0.002


def test_probe_results_need_their_own_format(tmp_path):
    from qbheat_contract.errors import QBHeatError
    from deploy_targets.report import read_probe

    good = tmp_path / "p.json"
    good.write_text(json.dumps({"protocol": "linear", "metrics": {"linear_top1": 0.81},
                                "data": {"train_images": 100, "test_images": 50}}))
    assert read_probe("random init", good)["metrics"] == {"linear_top1": 0.81}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(QBHeatError, match="not a results JSON written by 'qbheat probe"):
        read_probe("x", bad)
    with pytest.raises(QBHeatError, match="no probe result"):
        read_probe("x", tmp_path / "missing.json")
