"""The benchmark result document, schema ``qbheat.bench_report/1`` — the source of truth.

``qbheat-export bench`` and a bundle's ``run_bundle.py`` write it; ``qbheat-export report`` reads
several, merges them and renders Markdown and HTML from it. Standard library only.

    schema       "qbheat.bench_report/1"
    created      ISO-8601 UTC time
    command      argv of the run that produced it (for reproduction)
    protocol     ProtocolConfig as a dict
    targets      {name: profile dict}
    rows         [row, ...] where a row is
        target, hardware, model, head, runtime, threads, batch, options, input_shapes
        artifact     {path, format, precision, sha256, size_bytes}
        load_ms, first_inference_ms
        steady       {n, mean, std, cv, p50, p90, p99, min, max, mad, trimmed_mean, cv_warning, warmup_runs, samples_ms}
        end_to_end   same keys, or null
        memory       {load: {start_mb, peak_mb, method}, steady: {...}}: peak resident memory of the process while
                     loading and over the steady-state runs (method "VmHWM": that phase's own peak; "lifetime": since start)
        warnings     [str]
        fingerprint  {cpu_model, cores, usable_cores?, cpu_features?, os, machine, python, governor, temperature_c, runtime, runtime_version,
                      device, device_name, precision, threads, artifact_sha256, runtime_details?}
        parity       the model card's parity entry for the artifact, or null
        accuracy     the model card's accuracy entry ('qbheat-export eval': top1, top5, drop_top1, drop_top1_ci, n), or null
        golden       {passed, max_abs, mean_abs, cosine, top1_agreement, tolerance} or null
        macs, flops, params   from the model card (PyTorch counts), or null
        skipped      reason, when the configuration could not run (then no timings)
    sources      [file, ...]                         (report: the merged inputs)
    comparisons  [{key, baseline_p50, p50, delta, threshold, verdict}]   (report --compare)
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qbheat_contract.errors import QBHeatError

SCHEMA = "qbheat.bench_report/1"


def new_document(command: list[str], protocol: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": list(command), "protocol": protocol, "targets": targets, "rows": []}


def validate_document(doc: Any, where: str = "<document>") -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise QBHeatError(f"{where} is not a {SCHEMA} document (schema {found!r}); pass JSON written by 'qbheat-export bench' or a bundle.")
    for key in ("created", "protocol", "rows"):
        if key not in doc:
            raise QBHeatError(f"{where} lacks {key!r}; it was not written by 'qbheat-export bench' or a bundle.")
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in ("target", "runtime", "artifact", "threads", "batch", "fingerprint") if k not in row]
        if missing:
            raise QBHeatError(f"{where}: row {i} lacks {missing}.")
    return doc


def read_document(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise QBHeatError(f"no benchmark result at {path}.") from None
    except json.JSONDecodeError as e:
        raise QBHeatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    return validate_document(doc, str(path))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temporary sibling, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_document(doc: dict[str, Any], path: str | Path) -> Path:
    validate_document(doc)
    return write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def options_label(row: dict[str, Any], sep: str = ",") -> str:
    """A row's runner options, short: text values as they are ('CPU', 'f32'), numbers and flags as
    key=value ('static_shapes=True'), so that no bare True or 2 stands in a table without its name."""
    return sep.join(v if isinstance(v, str) else f"{k}={v}" for k, v in (row.get("options") or {}).items()
                    if isinstance(v, (str, int, float)))


def runtime_label(row: dict[str, Any]) -> str:
    """The row's runtime with its options, e.g. 'openvino CPU,f32,static_shapes=True'."""
    opts = options_label(row)
    return f"{row['runtime']} {opts}" if opts else row["runtime"]


def row_label(row: dict[str, Any]) -> str:
    art = row["artifact"]
    return f"{row['target']} · {art.get('format')}/{art.get('precision')} · {runtime_label(row)} · t{row['threads']} b{row['batch']}"


def _peak(row: dict[str, Any]) -> str:
    """The process's peak resident memory over load and steady state, MB, and (+) how far above its
    resident memory before the load: what loading and running this artifact cost."""
    mem = row.get("memory") or {}
    peaks = [p for p in (mem.get(k, {}).get("peak_mb") for k in ("load", "steady")) if p is not None]
    if not peaks:
        return "–"
    start = mem.get("load", {}).get("start_mb")
    return f"{max(peaks):.0f}" + (f" (+{max(peaks) - start:.0f})" if start is not None else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows (what the CLIs print at the end)."""
    head = ["target", "model", "artifact", "runtime", "thr", "batch", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms", "CV %", "e2e p50", "peak MB", "golden"]
    lines = [head]
    for r in rows:
        s, e, g = r.get("steady") or {}, r.get("end_to_end") or {}, r.get("golden")
        lines.append([r["target"], str(r.get("model") or "?"), f"{Path(r['artifact']['path']).name} ({r['artifact'].get('precision')})",
                      runtime_label(r),
                      str(r["threads"]), str(r["batch"]),
                      _ms(r.get("load_ms")), _ms(r.get("first_inference_ms")), _ms(s.get("p50")), _ms(s.get("p90")), _ms(s.get("p99")),
                      f"{s['cv'] * 100:.1f}" if s else "–", _ms(e.get("p50")), _peak(r),
                      "skipped" if r.get("skipped") else "–" if g is None else ("pass" if g["passed"] else "FAIL")])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
