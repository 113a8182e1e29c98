"""Task accuracy of an artifact against PyTorch: top-k hits, the drop in points with a paired
bootstrap confidence interval, and the ``--max-drop`` budget. numpy only.

Paired bootstrap over images (Efron & Tibshirani, ch. 6): resample the N test images with
replacement, score PyTorch and the artifact on the *same* resample, take the difference of their
accuracies. Per image the difference d = hit_pytorch − hit_artifact is −1, 0 or +1, and the drop of a
resample depends only on how many images of each kind it drew, which is one multinomial draw with
the observed proportions: ``resamples`` of them give exactly the resampling distribution of drawing
image indices, at O(resamples) cost instead of O(resamples × N). The interval is the percentile
interval (2.5 %, 97.5 % by default).

The same resampling serves detectors (``export.eval_detection``): COCO mAP does not split into
per-image terms, so there each resample is the R×N matrix of image multiplicities
(``image_resamples``) and mAP is re-accumulated for it; both end in ``percentile_interval``.

The budget (ours): an artifact passes when its point estimate of the drop is at most ``max_drop``
points; the interval is reported beside it so a reader sees how sure the verdict is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """N bool: whether the label is among the ``k`` highest of each row of ``scores`` (N×C)."""
    scores = np.asarray(scores, np.float64).reshape(len(labels), -1)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def image_resamples(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """R×N int: how many times each of the ``n`` images is drawn in each of ``resamples`` bootstrap resamples
    (each row sums to ``n``): drawing ``n`` image indices with replacement, as counts."""
    if n < 1:
        raise ValueError("need at least one image to resample")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The percentile bootstrap interval [lo, hi] of resampled statistics (2.5 % and 97.5 % by default), rounded."""
    alpha = (1.0 - confidence) / 2
    lo, hi = np.percentile(np.asarray(values, np.float64), [100 * alpha, 100 * (1 - alpha)])
    return [round(float(lo), 4), round(float(hi), 4)]


def paired_drop(ref_hits: np.ndarray, art_hits: np.ndarray, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                seed: int = SEED) -> dict:
    """Drop in points (100 × (accuracy of PyTorch − accuracy of the artifact)) and its bootstrap interval."""
    ref_hits, art_hits = np.asarray(ref_hits, bool), np.asarray(art_hits, bool)
    if ref_hits.shape != art_hits.shape or ref_hits.ndim != 1 or not len(ref_hits):
        raise ValueError("need two equally long, non-empty vectors of per-image hits")
    d = ref_hits.astype(np.int8) - art_hits.astype(np.int8)
    n = len(d)
    counts = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()])
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # resamples × 3
    drops = 100.0 * (draws[:, 2] - draws[:, 0]) / n
    return {"drop": round(float(100.0 * d.mean()), 4), "ci": percentile_interval(drops, confidence), "n": int(n),
            "improved": int(counts[0]), "worsened": int(counts[2])}


def classification_scores(ref_scores: np.ndarray, art_scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracy (%) of both sides and the drop per k, for one artifact."""
    out: dict = {}
    for k in ks:
        ref_hits, art_hits = topk_hits(ref_scores, labels, k), topk_hits(art_scores, labels, k)
        drop = paired_drop(ref_hits, art_hits)
        out[f"top{k}"] = round(float(100.0 * art_hits.mean()), 4)
        out[f"drop_top{k}"] = drop["drop"]
        out[f"drop_top{k}_ci"] = drop["ci"]
    out["n"] = int(len(labels))
    return out


@dataclass(frozen=True)
class BudgetVerdict:
    passed: bool
    drop: float
    budget: float
    metric: str

    def sentence(self, name: str, ci: list[float] | None = None) -> str:
        interval = f" (95 % CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
        return (f"{name} loses {self.drop:.2f} points of {self.metric}{interval}, over the --max-drop budget of "
                f"{self.budget:g} points")


def within_budget(drop: float, max_drop: float, metric: str = "top-1") -> BudgetVerdict:
    """The gate's arithmetic: pass when the measured drop is at most ``max_drop`` points."""
    if max_drop < 0:
        raise ValueError("max_drop must be non-negative")
    return BudgetVerdict(passed=bool(drop <= max_drop + 1e-9), drop=float(drop), budget=float(max_drop), metric=metric)
