"""``qbheat-export report``: merge benchmark runs from several devices, compare with a baseline,
render Markdown and a single-file HTML page (inline SVG plots, no external assets).

The merged JSON (schema ``qbheat.bench_report/1``, see ``results``) is the source of truth; the
Markdown and HTML are views of it.

Regression rule (ours, after trtexec's CV warning): a row's p50 changed beyond the measured noise
when |Δp50| / baseline p50 > max(2 × combined noise, 5 %), where each side's noise is its robust
relative spread 1.4826 × MAD / p50 (falling back to CV when MAD is absent) and the two combine in
quadrature. Slower beyond it is a *regression*, faster an *improvement*, else *within noise*.
"""
from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import fingerprint as fp
from qbheat_contract.errors import QBHeatError
from .results import SCHEMA, options_label, read_document, row_label, validate_document, write_text_atomic

MIN_THRESHOLD = 0.05


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies the same measurement across runs: target, model, artifact kind, runtime, settings."""
    art = row["artifact"]
    opts = json.dumps(row.get("options") or {}, sort_keys=True)
    return (row["target"], row.get("model"), art.get("format"), art.get("precision"), Path(art.get("path", "")).name,
            row["runtime"], row["threads"], row["batch"], opts)


def merge(docs: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """One document holding every row of every input (rows keep their own fingerprints)."""
    merged = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": [], "protocol": {}, "targets": {}, "rows": [], "sources": list(sources), "runs": []}
    for doc, src in zip(docs, sources):
        merged["targets"].update(doc.get("targets", {}))
        merged["runs"].append({"source": src, "created": doc["created"], "command": doc.get("command"), "protocol": doc["protocol"]})
        for row in doc["rows"]:
            merged["rows"].append(dict(row, source=src))
    protocols = {json.dumps(d["protocol"], sort_keys=True) for d in docs}
    merged["protocol"] = docs[0]["protocol"] if len(protocols) == 1 else {"mixed": [d["protocol"] for d in docs]}
    return merged


def noise(stats: dict[str, Any]) -> float:
    p50 = stats.get("p50") or 0.0
    if p50 <= 0:
        return 0.0
    if stats.get("mad") is not None:
        return 1.4826 * stats["mad"] / p50
    return float(stats.get("cv") or 0.0)


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Per matching row: p50 delta against the baseline and whether it exceeds the measured noise."""
    base = {row_key(r): r for r in baseline["rows"] if r.get("steady")}
    out = []
    for row in current["rows"]:
        ref = base.get(row_key(row))
        if ref is None or not row.get("steady"):
            continue
        a, b = ref["steady"], row["steady"]
        delta = (b["p50"] - a["p50"]) / a["p50"]
        threshold = max(2 * math.hypot(noise(a), noise(b)), MIN_THRESHOLD)
        verdict = "regression" if delta > threshold else "improvement" if delta < -threshold else "within noise"
        out.append({"key": row_label(row), "baseline_p50": a["p50"], "p50": b["p50"], "delta": delta,
                    "threshold": threshold, "verdict": verdict})
    return out


# ----------------------------------------------------------------------------- Markdown

def _f(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}"


def _agreement(row: dict[str, Any]) -> float | None:
    """Agreement with PyTorch for the plot: golden top-1 agreement, else parity's, else cosine."""
    for src in (row.get("golden"), row.get("parity")):
        if src:
            for k in ("top1_agreement", "cosine"):
                if src.get(k) is not None:
                    return float(src[k])
    return None


def _accuracy_cells(row: dict[str, Any]) -> list[str]:
    """Top-1 and its drop against PyTorch with the 95 % interval, from the card's 'qbheat-export eval' entry."""
    acc = row.get("accuracy") or {}
    metric = next((m for m in ("top1", "mAP") if acc.get(m) is not None and acc.get(f"drop_{m}") is not None), None)
    if metric is None:
        return ["–", "–"]
    lo, hi = acc.get(f"drop_{metric}_ci") or (None, None)
    ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
    label = " mAP" if metric == "mAP" else ""  # a detector's COCO mAP in the top-1 column, marked
    return [f"{acc[metric]:.2f}{label}", f"{acc[f'drop_{metric}']:+.2f}{ci}"]


def _memory_cell(row: dict[str, Any]) -> str:
    mem = row.get("memory") or {}
    peaks = [(mem.get(k) or {}).get("peak_mb") for k in ("load", "steady")]
    return "–" if all(p is None for p in peaks) else " / ".join("–" if p is None else f"{p:.0f}" for p in peaks)


def to_markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [f"# Benchmark report", "", f"Created {doc['created']} · schema `{doc['schema']}` · {len(rows)} rows"]
    if doc.get("sources"):
        lines.append(f" · merged from {', '.join(f'`{s}`' for s in doc['sources'])}")
    lines += ["", "## Latency (ms)", "",
              "| target | model | artifact | precision | runtime | threads | batch | load | first | p50 | p90 | p99 | CV % | e2e p50 | golden | agreement | top-1 % | drop (pts) | peak RSS MB load / run |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s, e, g = r.get("steady") or {}, r.get("end_to_end") or {}, r.get("golden")
        art = r["artifact"]
        opts = options_label(r, " ")
        lines.append("| " + " | ".join([
            r["target"], str(r.get("model") or "–"), f"`{Path(art['path']).name}`", str(art.get("precision")),
            r["runtime"] + (f" ({opts})" if opts else ""), str(r["threads"]), str(r["batch"]),
            _f(r.get("load_ms"), 1), _f(r.get("first_inference_ms")), _f(s.get("p50")), _f(s.get("p90")), _f(s.get("p99")),
            (f"{s['cv'] * 100:.1f}" + (" ⚠" if s.get("cv_warning") else "")) if s else "–", _f(e.get("p50")),
            "skipped" if r.get("skipped") else "–" if g is None else ("pass" if g["passed"] else "**FAIL**"),
            _f(_agreement(r), 4), *_accuracy_cells(r), _memory_cell(r)]) + " |")
    if doc.get("probes"):
        lines += ["", "## Task accuracy (frozen-backbone probes)", "",
                  "| backbone | protocol | metric | top-1 % | train images | test images | source |", "|---|---|---|---:|---:|---:|---|"]
        for pr in doc["probes"]:
            for name, value in pr["metrics"].items():
                lines.append(f"| {pr['label']} | {pr['protocol']} | {name} | {100 * value:.2f} | {pr['train_images']} | "
                             f"{pr['test_images']} | `{pr['source']}` |")
    lines += ["", "## Environment", "", "| target | CPU / device | OS | runtime | version | precision | artifact sha256 |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        f = r["fingerprint"]
        key = (r["target"], f.get("runtime"), f.get("artifact_sha256"), f.get("device_name"))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['target']} | {f.get('device_name') or f.get('cpu_model')} ({fp.cores_text(f)}) | {f.get('os')} | "
                     f"{f.get('runtime')} | {f.get('runtime_version')} | {f.get('precision')} | `{(f.get('artifact_sha256') or '')[:16]}` |")
    if doc.get("comparisons"):
        lines += ["", "## Against the baseline", "", "| configuration | baseline p50 | p50 | Δ | threshold | verdict |", "|---|---:|---:|---:|---:|---|"]
        for c in doc["comparisons"]:
            verdict = f"**{c['verdict']}**" if c["verdict"] == "regression" else c["verdict"]
            lines.append(f"| {c['key']} | {_f(c['baseline_p50'])} | {_f(c['p50'])} | {c['delta'] * 100:+.1f} % | {c['threshold'] * 100:.1f} % | {verdict} |")
    targets = [t for t in dict.fromkeys(r["target"] for r in rows) if _accuracy_points(rows, t)[1]]
    if targets:
        from .recommend import pareto_front

        lines += ["", "## Accuracy vs latency", "", "| target | configuration | p50 ms | accuracy % | Pareto front |", "|---|---|---:|---:|---|"]
        for t in targets:
            metric, pts = _accuracy_points(rows, t)
            front = set(pareto_front([(x, y) for x, y, _ in pts]))
            for i, (x, y, r) in enumerate(pts):
                lines.append(f"| {t} | {row_label(r)} | {_f(x)} | {y:.2f} {METRIC_TITLES[metric]} | {'yes' if i in front else ''} |")
    if doc.get("recommendations") is not None:
        from .recommend import format_recommendations

        recs = doc["recommendations"]
        metric = next((r["choice"].get("drop_metric") for r in recs if r.get("choice") and r["choice"].get("drop_metric")), "top-1")
        lines += ["", f"## Recommendation ({metric} drop at most {recs[0]['max_drop']:g} points)" if recs else "## Recommendation", ""]
        lines += [f"- {line.strip()}" for line in format_recommendations(recs)]
    warnings = [f"{row_label(r)}: {w}" for r in rows for w in r.get("warnings", [])]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", "Protocol: " + json.dumps(doc.get("protocol")), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- HTML + SVG

_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def svg_latency_bars(rows: list[dict[str, Any]], width: int = 1100) -> str:
    """Horizontal bars of p50 per row (target × format × precision × settings), p90 as a whisker."""
    rows = [r for r in rows if r.get("steady")]
    if not rows:
        return ""
    bar, gap, left, top = 18, 6, 430, 30
    height = top + len(rows) * (bar + gap) + 30
    vmax = max(r["steady"]["p90"] for r in rows) * 1.1
    scale = (width - left - 70) / vmax
    colors = {}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img" aria-label="p50 latency per configuration">',
             f'<text x="{left}" y="18" font-size="13" font-weight="bold">p50 latency (ms), whisker to p90</text>']
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        key = (r["artifact"].get("format"), r["artifact"].get("precision"), r["runtime"])
        color = colors.setdefault(key, _PALETTE[len(colors) % len(_PALETTE)])
        p50, p90 = r["steady"]["p50"], r["steady"]["p90"]
        parts.append(f'<text x="{left - 8}" y="{y + bar - 5}" font-size="11" text-anchor="end">{_esc(row_label(r))}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{max(p50 * scale, 1):.1f}" height="{bar}" fill="{color}"><title>{_esc(row_label(r))}: p50 {p50:.3f} ms</title></rect>')
        parts.append(f'<line x1="{left + p50 * scale:.1f}" x2="{left + p90 * scale:.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" stroke="#333"/>')
        parts.append(f'<text x="{left + p90 * scale + 4:.1f}" y="{y + bar - 5}" font-size="11">{p50:.3g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top - 4}" y2="{height - 24}" stroke="#999"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_agreement_scatter(rows: list[dict[str, Any]], width: int = 700, height: int = 380) -> str:
    """Agreement with PyTorch (top-1 agreement or cosine) against p50 latency, one point per row."""
    pts = [(r["steady"]["p50"], _agreement(r), r) for r in rows if r.get("steady") and _agreement(r) is not None]
    if not pts:
        return ""
    left, right, top, bottom = 70, 20, 30, 50
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.1
    y0 = min(min(ys) - 0.01, 0.98)
    y1 = 1.0 + (1.0 - y0) * 0.05
    sx = (width - left - right) / (x1 - x0)
    sy = (height - top - bottom) / (y1 - y0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" role="img" aria-label="agreement vs latency">',
             f'<text x="{left}" y="18" font-size="13" font-weight="bold">agreement with PyTorch vs p50 latency</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="{(left + width) / 2}" y="{height - 12}" font-size="11" text-anchor="middle">p50 latency (ms)</text>',
             f'<text x="14" y="{(top + height) / 2}" font-size="11" transform="rotate(-90 14 {(top + height) / 2})" text-anchor="middle">agreement</text>']
    for t in range(5):
        xv = x0 + (x1 - x0) * t / 4
        yv = y0 + (y1 - y0) * t / 4
        parts.append(f'<text x="{left + (xv - x0) * sx:.1f}" y="{height - bottom + 15}" font-size="10" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 6}" y="{height - bottom - (yv - y0) * sy + 3:.1f}" font-size="10" text-anchor="end">{yv:.4f}</text>')
    colors: dict[tuple, str] = {}
    for x, y, r in pts:
        key = (r["artifact"].get("format"), r["artifact"].get("precision"), r["runtime"])
        color = colors.setdefault(key, _PALETTE[len(colors) % len(_PALETTE)])
        parts.append(f'<circle cx="{left + (x - x0) * sx:.1f}" cy="{height - bottom - (y - y0) * sy:.1f}" r="5" fill="{color}">'
                     f'<title>{_esc(row_label(r))}: {y:.4f} at {x:.3f} ms</title></circle>')
    parts += _legend(colors, width, top)
    parts.append("</svg>")
    return "\n".join(parts)


def _legend(colors: dict[tuple, str], width: int, top: int) -> list[str]:
    """One swatch and label per (format, precision, runtime) key, top right of a plot."""
    return [f'<rect x="{width - 220}" y="{top + 4 + i * 16}" width="10" height="10" fill="{color}"/>'
            f'<text x="{width - 205}" y="{top + 13 + i * 16}" font-size="10">{_esc("/".join(map(str, key)))}</text>'
            for i, (key, color) in enumerate(colors.items())]


METRIC_TITLES = {"top1": "top-1", "mAP": "COCO mAP"}  # the task metric of a classifier head, of a detector head


def _accuracy_points(rows: list[dict[str, Any]], target: str) -> tuple[str, list[tuple[float, float, dict[str, Any]]]]:
    """(metric, [(p50 ms, metric %, row)]) of ``target``'s measured rows: top-1 where the card has it (classifier
    heads), else COCO mAP (detector heads)."""
    measured = [r for r in rows if r["target"] == target and r.get("steady") and r.get("accuracy")]
    for metric in METRIC_TITLES:
        pts = [(r["steady"]["p50"], float(r["accuracy"][metric]), r) for r in measured if r["accuracy"].get(metric) is not None]
        if pts:
            return metric, pts
    return "top1", []


def svg_accuracy_pareto(rows: list[dict[str, Any]], target: str, width: int = 700, height: int = 380) -> str:
    """The task metric (top-1, or COCO mAP for a detector) against p50 latency for one target, the Pareto
    front (no other configuration both faster and more accurate) drawn as a line through its points, which
    are ringed."""
    from .recommend import pareto_front

    metric, pts = _accuracy_points(rows, target)
    if not pts:
        return ""
    name = METRIC_TITLES[metric]
    front = pareto_front([(x, y) for x, y, _ in pts])
    left, right, top, bottom = 70, 20, 30, 50
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x1 = max(xs) * 1.1
    y0, y1 = min(ys) - 0.5, max(ys) + 0.5
    sx, sy = (width - left - right) / x1, (height - top - bottom) / (y1 - y0)
    px = lambda x: left + x * sx  # noqa: E731
    py = lambda y: height - bottom - (y - y0) * sy  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot pareto-plot" data-target="{_esc(target)}" width="{width}" height="{height}" '
             f'role="img" aria-label="{name} vs p50 latency on {_esc(target)}">',
             f'<text x="{left}" y="18" font-size="13" font-weight="bold">{_esc(target)}: {name} vs p50 latency (Pareto front in red)</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="{(left + width) / 2}" y="{height - 12}" font-size="11" text-anchor="middle">p50 latency (ms)</text>',
             f'<text x="14" y="{(top + height) / 2}" font-size="11" transform="rotate(-90 14 {(top + height) / 2})" text-anchor="middle">{name} %</text>']
    for t in range(5):
        xv, yv = x1 * t / 4, y0 + (y1 - y0) * t / 4
        parts.append(f'<text x="{px(xv):.1f}" y="{height - bottom + 15}" font-size="10" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 6}" y="{py(yv) + 3:.1f}" font-size="10" text-anchor="end">{yv:.2f}</text>')
    line = " ".join(f"{px(pts[i][0]):.1f},{py(pts[i][1]):.1f}" for i in front)
    parts.append(f'<polyline class="pareto-front" points="{line}" fill="none" stroke="#d62728" stroke-width="2.5"/>')
    colors: dict[tuple, str] = {}
    for i, (x, y, r) in enumerate(pts):
        key = (r["artifact"].get("format"), r["artifact"].get("precision"), r["runtime"])
        color = colors.setdefault(key, _PALETTE[len(colors) % len(_PALETTE)])
        on = i in front
        ring = ' stroke="#d62728" stroke-width="2.5"' if on else ""
        parts.append(f'<circle class="{"pareto" if on else "config"}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="{7 if on else 5}" fill="{color}"{ring}>'
                     f'<title>{_esc(row_label(r))}: {name} {y:.2f} % at {x:.3f} ms{" (Pareto front)" if on else ""}</title></circle>')
    parts += _legend(colors, width, top)
    parts.append("</svg>")
    return "\n".join(parts)


def _md_table_to_html(md_lines: list[str]) -> str:
    rows = [line.strip().strip("|").split("|") for line in md_lines if line.startswith("|")]
    if len(rows) < 2:
        return ""
    head, body = rows[0], rows[2:]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_esc(c.strip())}</th>" for c in head) + "</tr></thead>", "<tbody>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{_esc(c.strip().strip('`').replace('**', ''))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def to_html(doc: dict[str, Any]) -> str:
    md = to_markdown(doc).splitlines()
    sections, current, title = [], [], None
    for line in md:
        if line.startswith("## "):
            if title:
                sections.append((title, current))
            title, current = line[3:], []
        elif title:
            current.append(line)
    if title:
        sections.append((title, current))
    body = []
    for name, lines in sections:
        table = _md_table_to_html(lines)
        items = [line[2:] for line in lines if line.startswith("- ")]
        body.append(f"<h2>{_esc(name)}</h2>")
        if name.startswith("Latency"):
            body.append(svg_latency_bars(doc["rows"]))
            body.append(svg_agreement_scatter(doc["rows"]))
        if name.startswith("Accuracy vs latency"):
            body += [svg_accuracy_pareto(doc["rows"], t) for t in dict.fromkeys(r["target"] for r in doc["rows"])]
        body.append(table or ("<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"))
    style = ("body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;font-size:12px}th{background:#f3f3f3}svg.plot{display:block;margin:12px 0}"
             "td:nth-child(n+6){text-align:right}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>qbheat benchmark report</title>"
            f"<style>{style}</style></head><body>\n<h1>Benchmark report</h1>\n<p>Created {_esc(doc['created'])} · schema "
            f"<code>{_esc(doc['schema'])}</code> · {len(doc['rows'])} rows</p>\n" + "\n".join(body) +
            f"\n<h2>Protocol</h2><pre>{_esc(json.dumps(doc.get('protocol'), indent=1))}</pre>\n</body></html>\n")


def read_probe(label: str, path: str | Path) -> dict[str, Any]:
    """The accuracy lines of a ``qbheat probe --out`` results JSON, labelled (e.g. "pre-trained", "random init")."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return {"label": label, "protocol": doc["protocol"], "metrics": dict(doc["metrics"]),
                "train_images": doc["data"]["train_images"], "test_images": doc["data"]["test_images"], "source": str(path)}
    except FileNotFoundError:
        raise QBHeatError(f"no probe result at {path}.") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise QBHeatError(f"{path} is not a results JSON written by 'qbheat probe --out'.") from None


def build_report(run_paths: list[str | Path], out: str | Path, baseline: str | Path | None = None,
                 max_drop: float | None = None, probes: list[tuple[str, str | Path]] = ()) -> dict[str, Any]:
    """Merge, compare, recommend (with ``max_drop``), and write report.json / report.md / report.html into
    ``out``; ``probes`` are (label, probe results JSON) pairs shown in the task-accuracy section."""
    if not run_paths:
        raise QBHeatError("give at least one result JSON written by 'qbheat-export bench' or a bundle.")
    docs = [read_document(p) for p in run_paths]
    merged = merge(docs, [str(p) for p in run_paths])
    if probes:
        merged["probes"] = [read_probe(label, path) for label, path in probes]
    if baseline is not None:
        merged["baseline"] = str(baseline)
        merged["comparisons"] = compare(merged, read_document(baseline))
    if max_drop is not None:
        from .recommend import recommend

        merged["recommendations"] = recommend(merged["rows"], max_drop)
    validate_document(merged)
    out = Path(out)
    write_text_atomic(out / "report.json", json.dumps(merged, indent=1) + "\n")
    write_text_atomic(out / "report.md", to_markdown(merged))
    write_text_atomic(out / "report.html", to_html(merged))
    return merged
