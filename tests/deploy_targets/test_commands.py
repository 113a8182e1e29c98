"""The CLI: bench on a local profile writes the report JSON; user errors are one line and exit 2."""
from __future__ import annotations

import json

from deploy_targets.results import validate_document
from export.cli import main


def test_bench_cli_sweeps_and_counts(export_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", str(export_dir), "--target", "local-cpu-openvino", "--threads", "1", "--batch", "1,2", "--quick", "--out", str(out)])
    assert rc == 0
    doc = validate_document(json.loads(out.read_text()))
    # the OpenVINO profile runs both the IR and the ONNX file, each at batch 1 and 2
    assert sorted((r["artifact"]["format"], r["batch"]) for r in doc["rows"]) == [("onnx", 1), ("onnx", 2), ("openvino", 1), ("openvino", 2)]
    onnx_row = next(r for r in doc["rows"] if r["artifact"]["format"] == "onnx")
    assert onnx_row["graph"]["macs"] == 16 * 16 * 8 * 27 + 16 * 16 * 8 * 9 + 40 and onnx_row["end_to_end"]["n"] == 5
    assert {r["fingerprint"]["runtime_details"]["inference_precision"] for r in doc["rows"]} == {"f32"}
    printed = capsys.readouterr()
    assert "p50 ms" in printed.out and "wrote" in printed.err


def test_bench_cli_user_errors(export_dir, tmp_path, capsys):
    assert main(["bench", str(export_dir), "--target", "no-such-device"]) == 2
    assert "unknown target 'no-such-device'" in capsys.readouterr().err
    assert main(["bench", str(export_dir), "--target", "rpi5-ort"]) == 2
    assert "qbheat-export bundle" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing"), "--target", "local-cpu-ort"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qbheat-export: error:") and err.count("\n") == 1
