"""Parity of an artifact with a reference, per output, against one table of tolerances.

Export gates every artifact against PyTorch with ``compare``; a bench run or a device bundle checks
golden outputs with ``check_outputs``. Both use the same table and the same metrics, so what export
accepted a device accepts too.

Metrics per output (arrays compared as float64): max and mean absolute error, the error relative
to the reference's largest magnitude, and the cosine similarity of each sample's flattened output
(the minimum over the batch is gated). Then, by what the output is:

* classifier ``logits`` / ``probabilities``: top-1 agreement (share of images with the same argmax);
* detector: box agreement = matched / max(#reference, #artifact) detections, where a match is a
  one-to-one pair with the same label and IoU ≥ 0.5. For the ``decode`` variant both sides are
  first put through the head's own in-graph NMS (in PyTorch), so the same rule decides.
  Element-wise errors of the fixed-size NMS outputs are reported but not gated: a near-tie in
  score may legitimately swap two rows.

``TOLERANCES`` is the one table, by precision, with per-format overrides; a result outside it
fails the export (unless ``--allow-mismatch``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    cosine: float  # minimum per-sample cosine similarity
    top1: float  # minimum top-1 agreement (classifiers)
    box_match: float  # minimum box agreement (detectors)
    rel_max: float | None  # maximum |error| / max |reference|; None = not gated


# Values are ours: FP32 should be exact to float rounding; FP16 loses ~3 decimal digits; INT8
# budgets follow what per-channel QDQ / NNCF reach on trained CNNs (cosine ≥ 0.98 is the usual
# "quantisation worked" line, e.g. in NNCF and AI Hub numerics checks).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(cosine=0.9999, top1=1.0, box_match=0.95, rel_max=1e-3),
    "fp16": Tolerance(cosine=0.995, top1=0.75, box_match=0.7, rel_max=None),
    "int8": Tolerance(cosine=0.97, top1=0.5, box_match=0.4, rel_max=None),
}
FORMAT_OVERRIDES: dict[tuple[str, str], Tolerance] = {
    # Core ML INT8 here is 8-bit weight-only quantisation (activations stay FP16): closer than INT8 QDQ.
    ("coreml", "int8"): Tolerance(cosine=0.98, top1=0.6, box_match=0.5, rel_max=None),
}


def tolerance(fmt: str | None, precision: str) -> Tolerance:
    """The tolerance for ``fmt`` at ``precision``; an unknown precision is held to FP32's."""
    return FORMAT_OVERRIDES.get((fmt, precision), TOLERANCES.get(precision, TOLERANCES["fp32"]))


def tolerance_table() -> dict:
    """The table as plain JSON, for the model card."""
    out = {p: asdict(t) for p, t in TOLERANCES.items()}
    out.update({f"{f}/{p}": asdict(t) for (f, p), t in FORMAT_OVERRIDES.items()})
    return out


def error_stats(ref: np.ndarray, out: np.ndarray) -> dict:
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref64.shape != out64.shape:
        return {"shape_mismatch": [list(ref64.shape), list(out64.shape)]}
    diff = np.abs(ref64 - out64)
    finite = bool(np.isfinite(out64).all())
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    a = ref64.reshape(ref64.shape[0], -1) if ref64.ndim > 1 else ref64.reshape(1, -1)
    b = out64.reshape(a.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))
    return {"max_abs": float(diff.max()) if diff.size else 0.0, "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "rel_max": float(diff.max() / scale) if scale > 0 else float(diff.max() if diff.size else 0.0),
            "cosine_min": float(cos.min()) if cos.size else 1.0, "finite": finite}


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    return float((np.asarray(ref).argmax(-1) == np.asarray(out).argmax(-1)).mean())


def agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    """``error_stats`` plus top-1 agreement (over the flattened rows) and the row count: one output of
    two models on the same batch, as the benchmarks report it."""
    ref, out = np.asarray(ref), np.asarray(out)
    rows = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    return {**error_stats(*rows), "top1_agreement": top1_agreement(*rows), "n": int(len(ref))}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def box_agreement(ref: tuple, out: tuple, iou_threshold: float = 0.5) -> dict:
    """Detections as (boxes B×D×4, scores B×D, labels B×D, count B) on both sides → agreement."""
    matched = total = n_ref = n_out = 0
    for b in range(ref[0].shape[0]):
        rb, rl = ref[0][b][ref[1][b] > 0], ref[2][b][ref[1][b] > 0]
        ob, ol = out[0][b][out[1][b] > 0], out[2][b][out[1][b] > 0]
        n_ref, n_out = n_ref + len(rb), n_out + len(ob)
        total += max(len(rb), len(ob))
        if len(rb) and len(ob):
            iou = _iou(np.asarray(rb, np.float64), np.asarray(ob, np.float64))
            iou[np.asarray(rl)[:, None] != np.asarray(ol)[None, :]] = 0.0
            used = np.zeros(len(ob), bool)
            for i in range(len(rb)):  # reference rows are sorted by score: greedy one-to-one
                cand = np.where(~used & (iou[i] >= iou_threshold))[0]
                if len(cand):
                    used[cand[iou[i, cand].argmax()]] = True
                    matched += 1
    return {"box_match": float(matched / total) if total else 1.0, "detections_reference": int(n_ref),
            "detections_artifact": int(n_out)}


def compare(task: str, variant: str, names: tuple[str, ...], ref: list[np.ndarray], out: list[np.ndarray],
            fmt: str, precision: str, nms=None) -> dict:
    """Compare one artifact's outputs with PyTorch's; return metrics, the tolerance and failures.

    ``nms``: for the detector ``decode`` variant, a function (boxes, scores) → (boxes, scores,
    labels, count) in numpy, i.e. the head's own NMS run in PyTorch.
    """
    tol = tolerance(fmt, precision)
    result: dict = {"outputs": {}, "tolerance": asdict(tol), "failures": []}
    fails = result["failures"]
    gated_elementwise = not (task == "detector" and variant == "nms")
    for name, r, o in zip(names, ref, out):
        stats = error_stats(r, o)
        result["outputs"][name] = stats
        if "shape_mismatch" in stats:
            fails.append(f"{name}: shape {stats['shape_mismatch'][1]} instead of {stats['shape_mismatch'][0]}")
            continue
        if not stats["finite"]:
            fails.append(f"{name}: non-finite values")
        if not gated_elementwise or np.issubdtype(np.asarray(r).dtype, np.integer):
            continue
        if stats["cosine_min"] < tol.cosine:
            fails.append(f"{name}: cosine {stats['cosine_min']:.6f} < {tol.cosine}")
        if tol.rel_max is not None and stats["rel_max"] > tol.rel_max:
            fails.append(f"{name}: max error {stats['rel_max']:.2e} of the output's scale > {tol.rel_max:.0e}")
        if task == "classifier":
            stats["top1_agreement"] = top1_agreement(r, o)
            if stats["top1_agreement"] < tol.top1:
                fails.append(f"{name}: top-1 agreement {stats['top1_agreement']:.2f} < {tol.top1}")
    if task == "detector" and not fails:
        if variant == "decode":
            ref_det, out_det = nms(ref[0], ref[1]), nms(out[0], out[1])
        else:
            ref_det, out_det = tuple(ref), tuple(out)
        agreement = box_agreement(ref_det, out_det)
        result["detections"] = agreement
        if agreement["box_match"] < tol.box_match:
            fails.append(f"box agreement {agreement['box_match']:.2f} < {tol.box_match}")
    result["passed"] = not fails
    return result


def check_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], precision: str, fmt: str | None = None,
                  override: dict | None = None) -> dict:
    """Golden-output check: ``got`` against ``expected``, matched by name where the names agree, else by
    position. Gates the minimum cosine, the relative max error (where the tolerance has one) and, for
    outputs of more than one column, top-1 agreement; ``override`` replaces fields of the tolerance."""
    base = asdict(tolerance(fmt, precision))
    tol = Tolerance(**{**base, **{k: v for k, v in (override or {}).items() if k in base}})
    got_items = [got[k] for k in expected] if set(expected) <= set(got) else list(got.values())
    per_output = []
    for (name, ref), out in zip(expected.items(), got_items):
        ref = np.asarray(ref)
        out = np.asarray(out).reshape(ref.shape)
        stats = error_stats(ref, out)
        rows = ref.reshape(ref.shape[0], -1), out.reshape(ref.shape[0], -1)
        top1 = top1_agreement(*rows)
        ok = stats["finite"] and stats["cosine_min"] >= tol.cosine
        if tol.rel_max is not None:
            ok = ok and stats["rel_max"] <= tol.rel_max
        if rows[0].shape[1] > 1:
            ok = ok and top1 >= tol.top1
        per_output.append({"name": name, "max_abs": stats["max_abs"], "mean_abs": stats["mean_abs"],
                           "cosine": stats["cosine_min"], "top1_agreement": top1, "passed": bool(ok)})
    worst = min(per_output, key=lambda o: o["cosine"])
    return {"passed": all(o["passed"] for o in per_output), "max_abs": max(o["max_abs"] for o in per_output),
            "mean_abs": worst["mean_abs"], "cosine": worst["cosine"], "top1_agreement": worst["top1_agreement"],
            "tolerance": asdict(tol), "outputs": per_output}
