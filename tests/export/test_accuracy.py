"""The accuracy arithmetic on synthetic predictions: top-k hits, the paired bootstrap, the budget."""
from __future__ import annotations

import numpy as np
import pytest

from export.accuracy import classification_scores, paired_drop, topk_hits, within_budget


def test_topk_hits_counts_the_label_among_the_k_best():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert topk_hits(scores, labels, 1).tolist() == [True, False, False]
    assert topk_hits(scores, labels, 2).tolist() == [True, True, False]
    assert topk_hits(scores, labels, 5).all()  # k beyond the class count: every label is in


def test_paired_drop_is_the_difference_of_accuracies_and_zero_for_identical_predictions():
    ref = np.array([1] * 80 + [0] * 20, bool)
    art = ref.copy()
    art[:6] = False  # 6 images lost
    art[90:92] = True  # 2 images gained
    d = paired_drop(ref, art)
    assert d["drop"] == pytest.approx(4.0) and d["worsened"] == 6 and d["improved"] == 2 and d["n"] == 100
    assert d["ci"][0] < 4.0 < d["ci"][1]
    same = paired_drop(ref, ref)
    assert same["drop"] == 0.0 and same["ci"] == [0.0, 0.0]


def test_paired_bootstrap_matches_resampling_image_indices():
    """The multinomial shortcut against the slow, obvious bootstrap (resample indices, score both sides)."""
    rng = np.random.default_rng(1)
    ref = rng.random(400) < 0.8
    art = np.where(rng.random(400) < 0.1, ~ref, ref)
    fast = paired_drop(ref, art, resamples=4000, seed=3)
    idx = rng.integers(0, 400, size=(4000, 400))
    slow = 100.0 * (ref[idx].mean(1) - art[idx].mean(1))
    lo, hi = np.percentile(slow, [2.5, 97.5])
    assert fast["drop"] == pytest.approx(100.0 * (ref.mean() - art.mean()), abs=1e-9)
    width = hi - lo
    assert abs(fast["ci"][0] - lo) < 0.1 * width and abs(fast["ci"][1] - hi) < 0.1 * width


def test_classification_scores_per_k():
    labels = np.arange(10) % 3
    ref = np.eye(3)[labels]  # always right
    art = np.eye(3)[(labels + 1) % 3] + 0.5 * np.eye(3)[labels]  # top-1 always wrong, top-2 right
    r = classification_scores(ref, art, labels, ks=(1, 2))
    assert r["top1"] == 0.0 and r["drop_top1"] == 100.0 and r["top2"] == 100.0 and r["drop_top2"] == 0.0 and r["n"] == 10


def test_budget_passes_at_the_budget_and_fails_beyond_it():
    assert within_budget(1.0, 1.0).passed and within_budget(-0.3, 0.0).passed
    v = within_budget(1.25, 1.0)
    assert not v.passed
    text = v.sentence("onnx int8 (onnx/model.int8.onnx)", [0.9, 1.6])
    assert text == ("onnx int8 (onnx/model.int8.onnx) loses 1.25 points of top-1 (95 % CI 0.90 to 1.60), "
                    "over the --max-drop budget of 1 points")
    with pytest.raises(ValueError):
        within_budget(0.0, -1.0)
