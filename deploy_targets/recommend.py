"""Which configuration to ship to each device: the fastest whose accuracy drop fits a budget.

Input: benchmark rows (``qbheat.bench_report/1``) that carry the artifact's measured accuracy
(``row["accuracy"]``, from ``qbheat-export eval`` through the model card). Per target (device
profile), among the rows whose drop against PyTorch is at most ``max_drop`` points (a classifier's
top-1 drop; a detector's COCO mAP drop, ``drop_mAP``):

1. the row with the lowest steady-state p50 is the *fastest*;
2. a row counts as slower than it only beyond the measured noise, by ``report.compare``'s rule:
   Δp50 / p50 > max(2 × the two rows' noise combined in quadrature, 5 %), the noise of a row being
   its robust relative spread 1.4826 × MAD / p50;
3. among the rows *not* slower beyond the noise, the recommendation is the most accurate (smallest
   drop), then the one with fewer threads, then the smaller batch, then the lower p50 (ours: when
   the clock cannot tell two configurations apart, keep the accuracy and the spare cores).

It also says whether INT8 is faster than FP32 on that target by the same noise rule. Latency is the
p50 of one call at the row's batch (what an app waits for), not per image.
"""
from __future__ import annotations

import math
from typing import Any

from .report import MIN_THRESHOLD, noise
from .results import row_label


DROP_KEYS = (("drop_top1", "top-1"), ("drop_mAP", "COCO mAP"))  # the accuracy entry's drop, per head type


def _drop_key(row: dict[str, Any]) -> tuple[str, str] | None:
    acc = row.get("accuracy") or {}
    return next(((k, m) for k, m in DROP_KEYS if acc.get(k) is not None), None)


def _drop(row: dict[str, Any]) -> float | None:
    """The row's drop in points: top-1 for a classifier export, COCO mAP for a detector export."""
    key = _drop_key(row)
    return row["accuracy"][key[0]] if key else None


def slower_beyond_noise(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether row ``a`` is slower than row ``b`` by more than the measured noise."""
    sa, sb = a["steady"], b["steady"]
    threshold = max(2 * math.hypot(noise(sa), noise(sb)), MIN_THRESHOLD)
    return (sa["p50"] - sb["p50"]) / sb["p50"] > threshold


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    acc = row.get("accuracy") or {}
    art = row["artifact"]
    return {"label": row_label(row), "artifact": art.get("path"), "format": art.get("format"), "precision": art.get("precision"),
            "runtime": row["runtime"], "options": row.get("options") or {}, "threads": row["threads"], "batch": row["batch"],
            "p50_ms": row["steady"]["p50"], "noise": round(noise(row["steady"]), 4), "top1": acc.get("top1"),
            "drop_top1": acc.get("drop_top1"), "drop_top1_ci": acc.get("drop_top1_ci"),
            "drop": _drop(row), "drop_ci": acc.get(f"{(_drop_key(row) or ('drop_top1',))[0]}_ci"),
            "drop_metric": (_drop_key(row) or (None, None))[1], "mAP": acc.get("mAP"), "drop_mAP": acc.get("drop_mAP")}


def _int8_note(rows: list[dict[str, Any]]) -> str | None:
    """Per format that has both: whether its fastest INT8 row beats its fastest FP32 row beyond the noise."""
    notes = []
    for fmt in dict.fromkeys(r["artifact"].get("format") for r in rows):
        best = {p: min((r for r in rows if r["artifact"].get("format") == fmt and r["artifact"].get("precision") == p),
                       key=lambda r: r["steady"]["p50"], default=None) for p in ("int8", "fp32")}
        i8, f32 = best["int8"], best["fp32"]
        if i8 is None or f32 is None:
            continue
        a, b = i8["steady"]["p50"], f32["steady"]["p50"]
        if slower_beyond_noise(f32, i8):
            notes.append(f"{fmt}: INT8 is faster than FP32 here: {b / a:.2f}× ({a:.3f} vs {b:.3f} ms p50)")
        elif slower_beyond_noise(i8, f32):
            notes.append(f"{fmt}: INT8 is slower than FP32 here: {a:.3f} vs {b:.3f} ms p50 ({b / a:.2f}×)")
        else:
            notes.append(f"{fmt}: INT8 is not faster than FP32 here: {a:.3f} vs {b:.3f} ms p50 ({b / a:.2f}×, within the measured noise)")
    return "; ".join(notes) or None


def recommend(rows: list[dict[str, Any]], max_drop: float) -> list[dict[str, Any]]:
    """One recommendation per target, in the order targets first appear."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    out = []
    for target in targets:
        timed = [r for r in rows if r["target"] == target and r.get("steady") and not r.get("skipped")]
        unmeasured = [row_label(r) for r in timed if _drop(r) is None]
        fits = [r for r in timed if _drop(r) is not None and _drop(r) <= max_drop + 1e-9]
        over = [{"label": row_label(r), _drop_key(r)[0]: _drop(r)} for r in timed if _drop(r) is not None and _drop(r) > max_drop + 1e-9]
        rec: dict[str, Any] = {"target": target, "max_drop": max_drop, "over_budget": over, "unmeasured": unmeasured,
                               "int8": _int8_note(timed)}
        if not fits:
            rec.update(choice=None, tied=[], reason=(f"no configuration measured on {target} loses at most {max_drop:g} points "
                                                     "(run 'qbheat-export eval' on the export before 'bench' so rows carry accuracy)"))
            out.append(rec)
            continue
        fastest = min(fits, key=lambda r: r["steady"]["p50"])
        tied = [r for r in fits if not slower_beyond_noise(r, fastest)]
        choice = min(tied, key=lambda r: (_drop(r), r["threads"] or math.inf, r["batch"], r["steady"]["p50"]))  # 0 = all cores
        why = "the fastest within the budget" if choice is fastest else (
            f"as fast as the fastest ({row_label(fastest)}, {fastest['steady']['p50']:.3f} ms) within the measured noise, "
            f"and more accurate or lighter")
        rec.update(choice=_summary(choice), fastest=_summary(fastest), tied=[row_label(r) for r in tied if r is not choice],
                   reason=why)
        out.append(rec)
    return out


def format_recommendations(recs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in recs:
        c = rec["choice"]
        if c is None:
            lines.append(f"{rec['target']}: {rec['reason']}")
        else:
            lines.append(f"{rec['target']}: {c['format']}/{c['precision']} {c['artifact']} on {c['runtime']}, threads {c['threads']}, "
                         f"batch {c['batch']}: p50 {c['p50_ms']:.3f} ms, {c.get('drop_metric') or 'top-1'} drop "
                         f"{c['drop'] if c.get('drop') is not None else c['drop_top1']:+.2f} points "
                         f"(budget {rec['max_drop']:g}); {rec['reason']}")
        if rec.get("int8"):
            lines.append(f"{rec['target']}: {rec['int8']}")
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point beats on both (lower latency, higher
    accuracy, one of them strictly), sorted by latency."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def best_for(paths: list[str], target: str, max_drop: float | None) -> dict[str, Any]:
    """The recommended configuration for ``target``: from a report.json's recommendations, or computed
    from bench results with ``max_drop``."""
    from qbheat_contract.errors import QBHeatError
    from .report import merge
    from .results import read_document

    docs = [read_document(p) for p in paths]
    stored = [r for d in docs for r in d.get("recommendations") or [] if r["target"] == target]
    if max_drop is not None or not stored:
        if max_drop is None:
            raise QBHeatError("--best needs --max-drop POINTS, or a report.json written by 'qbheat-export report --recommend'.")
        rows = merge(docs, [str(p) for p in paths])["rows"]
        if not any(r["target"] == target for r in rows):
            raise QBHeatError(f"the results {', '.join(map(str, paths))} hold no rows for target {target}; bench it first.")
        stored = [r for r in recommend(rows, max_drop) if r["target"] == target]
    rec = stored[0]
    if rec["choice"] is None:
        raise QBHeatError(f"nothing to bundle for {target}: {rec['reason']}.")
    return rec["choice"]
