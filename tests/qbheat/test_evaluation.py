"""Evaluation protocols: features, kNN, linear and non-linear probes, held-out selection."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qbheat.errors import QBHeatError
from qbheat.evaluation.features import (FeatureSet, ProbePreprocessing as Preprocessing, as_uint8_chw, extract_features, holdout_split,
                                       pool_features, recalibrate_untracked_batchnorm)
from qbheat.evaluation.knn import knn_predict, run_knn
from qbheat.evaluation.linear_probe import LinearProbeConfig, fit_linear, run_linear_probe, select_and_fit
from qbheat.evaluation.nonlinear_probe import NonlinearProbeConfig, predict, run_nonlinear_probe
from qbheat.heads import create_head, head_inputs
from qbheat.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _blobs(n, dim, k, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * sep
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, dim, generator=g)
    return x, y


# ------------------------------------------------------------------------------------ kNN

def _knn_reference(train, labels, queries, k, t, num_classes):
    """Obvious per-query loop: cosine similarity to every training item, top k, exp(s/T) votes."""
    out = []
    for q in queries:
        sims = [float(F.cosine_similarity(q[None], x[None])) for x in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / t)
        total = sum(votes)
        out.append([v / total for v in votes])
    return torch.tensor(out)


@pytest.mark.parametrize("k,t", [(20, 0.07), (200, 0.1), (5, 0.5)])
def test_knn_matches_slow_reference(k, t):
    x, y = _blobs(240, 8, 4, 1.0, 0)
    q, _ = _blobs(30, 8, 4, 1.0, 1)
    fast = knn_predict(x, y, q, k=k, temperature=t, num_classes=4, chunk=7)  # chunks that do not divide Q
    slow = _knn_reference(x, y, q, min(k, 240), t, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_knn_on_separated_clusters_is_perfect_and_reports_both_settings():
    x, y = _blobs(400, 16, 5, 8.0, 0)
    q, qy = _blobs(100, 16, 5, 8.0, 0)
    res = run_knn(FeatureSet(x, y), FeatureSet(q + 0.01, qy), num_classes=5)
    assert set(res) == {"knn_k20_t0.07", "knn_k200_t0.1"}
    assert res["knn_k20_t0.07"] == 1.0 and res["knn_k200_t0.1"] > 0.95


def test_knn_rejects_bad_arguments():
    with pytest.raises(QBHeatError):
        knn_predict(torch.randn(5, 3), torch.zeros(5), torch.randn(2, 4), k=2, temperature=0.1)
    with pytest.raises(QBHeatError):
        knn_predict(torch.randn(5, 3), torch.zeros(5), torch.randn(2, 3), k=0, temperature=0.1)


# ------------------------------------------------------------------------------------ linear probe

def test_linear_probe_learns_a_separable_toy_set_and_folds_the_standardisation():
    x, y = _blobs(600, 20, 3, 1.5, 0)
    x = x * torch.linspace(0.01, 100, 20) + 50  # wildly different feature scales: standardisation matters
    xt, yt = _blobs(300, 20, 3, 1.5, 0)
    xt = xt * torch.linspace(0.01, 100, 20) + 50
    res = run_linear_probe(FeatureSet(x, y), FeatureSet(xt, yt), LinearProbeConfig(weight_decays=(1e-4, 1e-2)))
    assert res.test_accuracy > 0.9  # chance is 1/3
    assert res.weight_decay in (1e-4, 1e-2) and len(res.grid) == 2
    # the saved head is a plain linear layer on raw features and reproduces the probe's logits
    head = create_head("linear", in_features=20, num_classes=3)
    head.load_state_dict(res.head_state())
    torch.testing.assert_close(head(xt), res.logits(xt), rtol=1e-5, atol=1e-4)


def test_fit_linear_is_deterministic():
    x, y = _blobs(200, 6, 3, 1.0, 0)
    w1, b1 = fit_linear(x, y, 3, weight_decay=1e-3, max_iter=30)
    w2, b2 = fit_linear(x, y, 3, weight_decay=1e-3, max_iter=30)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_holdout_split_is_disjoint_complete_and_seeded():
    fit, val = holdout_split(100, 0.1, seed=3)
    assert len(val) == 10 and len(fit) == 90
    assert set(fit.tolist()).isdisjoint(val.tolist()) and set(fit.tolist()) | set(val.tolist()) == set(range(100))
    assert torch.equal(val, holdout_split(100, 0.1, seed=3)[1]) and not torch.equal(val, holdout_split(100, 0.1, seed=4)[1])
    with pytest.raises(QBHeatError):
        holdout_split(1, 0.5)


def test_selection_never_touches_the_test_set(monkeypatch):
    """The chosen setting and weights are the same whatever the test set holds; selection sees train only."""
    x, y = _blobs(300, 10, 3, 0.7, 0)
    xt, yt = _blobs(150, 10, 3, 0.7, 1)
    cfg = LinearProbeConfig(weight_decays=(1e-4, 1e-2, 1.0), max_iter=40)
    seen = []
    real_fit = fit_linear

    def spy(xx, *a, **kw):
        seen.append(xx.shape[0])
        return real_fit(xx, *a, **kw)

    monkeypatch.setattr("qbheat.evaluation.linear_probe.fit_linear", spy)
    a = run_linear_probe(FeatureSet(x, y), FeatureSet(xt, yt), cfg)
    b = run_linear_probe(FeatureSet(x, y), FeatureSet(torch.randn_like(xt) * 100, yt.flip(0)), cfg)
    assert a.weight_decay == b.weight_decay and a.grid == b.grid and torch.equal(a.weight, b.weight)
    assert seen == [270, 270, 270, 300] * 2  # three fits on the fitting part, one refit on all of train; never 150
    assert a.test_accuracy != b.test_accuracy
    # select_and_fit has no test argument at all
    assert "test" not in select_and_fit.__code__.co_varnames[:select_and_fit.__code__.co_argcount]


# ------------------------------------------------------------------------------------ non-linear probe

def test_nonlinear_probe_learns_from_spatial_tokens_and_is_exportable_head():
    g = torch.Generator().manual_seed(0)
    n, c = 240, 8
    y = torch.arange(n) % 3
    fmap = torch.randn(n, c, 2, 2, generator=g)
    fmap[torch.arange(n), y, y % 2, 0] += 4.0  # the class lives in one channel at one position
    tokens = torch.randn(n, 2, 6, generator=g)
    train, test = FeatureSet(fmap.mean((2, 3)), y, fmap, tokens).subset(range(180)), FeatureSet(fmap.mean((2, 3)), y, fmap, tokens).subset(range(180, 240))
    cfg = NonlinearProbeConfig(width=32, num_heads=2, epochs=10, batch_size=32, lrs=(3e-3,))
    res = run_nonlinear_probe(train, test, cfg, num_classes=3)
    assert res.test_accuracy > 0.8
    assert res.head.kwargs["token_dim"] == 6 and res.head.head_type == "transformer_probe"
    logits = predict(res.head, test)
    assert logits.shape == (60, 3)


def test_nonlinear_probe_needs_spatial_features():
    fs = FeatureSet(torch.randn(20, 4), torch.zeros(20, dtype=torch.long))
    with pytest.raises(QBHeatError, match="spatial"):
        run_nonlinear_probe(fs, fs)


# ------------------------------------------------------------------------------------ features

def test_preprocessing_resizes_repeats_grey_and_normalises():
    pre = Preprocessing(input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    from qbheat.evaluation.features import as_uint8_chw

    grey = np.full((2, 28, 28), 255, dtype=np.uint8)
    x = pre(as_uint8_chw(grey))
    assert x.shape == (2, 3, 64, 64)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))  # (1 − 0.5) / 0.25
    rect = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    assert pre(rect).shape == (1, 3, 64, 64)  # short side resized, then centre-cropped


def test_features_are_frozen_pooled_view_batch_independent_and_mode_restored():
    torch.manual_seed(0)
    model = create_model("mobileformer_micro", num_classes=0)
    model.train()
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    pre = Preprocessing(input_size=(3, 32, 32))
    a = extract_features(model, images, pre, np.arange(5), batch_size=5, spatial=True, progress=False)
    b = extract_features(model, images, pre, np.arange(5), batch_size=2, progress=False)
    assert model.training  # restored
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-4, atol=1e-5)  # BN in eval mode: batch does not matter
    model.eval()
    from qbheat.evaluation.features import as_uint8_chw

    with torch.no_grad():
        ref = head_inputs(model, pre(as_uint8_chw(images)), "pooled")
    torch.testing.assert_close(a.pooled, ref, rtol=1e-4, atol=1e-5)
    assert a.tokens is not None and a.fmap.shape[0] == 5 and a.labels.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(pool_features(a.fmap, a.tokens), a.pooled)


def test_nonlinear_probe_works_on_tiny_feature_variation_and_folds_standardisation():
    """Features that vary by 0.1 % around a large offset (a random Mobile-Former's) are still learnable;
    the returned head reads raw features and equals the head trained on standardised ones."""
    g = torch.Generator().manual_seed(1)
    n = 180
    y = torch.arange(n) % 3
    fmap = torch.randn(n, 6, 2, 2, generator=g)
    fmap[torch.arange(n), y] += 3.0
    raw = 5.0 + 1e-3 * fmap
    tokens = 2.0 + 1e-3 * torch.randn(n, 2, 4, generator=g)
    fs = FeatureSet(raw.mean((2, 3)), y, raw, tokens)
    cfg = NonlinearProbeConfig(width=16, num_heads=2, epochs=8, batch_size=30, lrs=(3e-3,))
    res = run_nonlinear_probe(fs.subset(range(120)), fs.subset(range(120, 180)), cfg, num_classes=3)
    assert res.test_accuracy > 0.8


# ------------------------------------------------------------------------------------ BatchNorm recalibration

def test_recalibration_touches_only_batchnorm_that_pretraining_never_updated():
    model = create_model("mobileformer_micro")
    images = torch.randint(0, 256, (24, 64, 64), dtype=torch.uint8)
    pre = Preprocessing(input_size=(3, 64, 64))
    model.train()
    with torch.no_grad():  # "pre-training" that ran only the stem and first blocks
        model.forward_features(pre(as_uint8_chw(images[:8])))
    for name, m in model.named_modules():  # pretend only the stem was trained
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith("stem"):
            m.reset_running_stats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = recalibrate_untracked_batchnorm(model, images, pre, batch_size=8, progress=False)
    after = model.state_dict()
    assert changed and not any(n.startswith("stem") for n in changed) and model.training
    for k, v in after.items():
        module = k.rsplit(".", 1)[0]
        if module in changed and k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(v, before[k]), k  # weights and the stem's statistics untouched
    # The cumulative average over all images of the mean its input has. Checked on the first recalibrated layer,
    # whose input does not depend on layers that used batch statistics during the pass.
    name = next(n for n, _ in model.named_modules() if n in changed)
    bn = dict(model.named_modules())[name]
    seen = []
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    model.eval()
    with torch.no_grad():
        for start in range(0, 24, 8):
            model.forward_head(model.forward_features(pre(as_uint8_chw(images[start:start + 8]))), pre_logits=True)
    hook.remove()
    x = torch.cat(seen)
    dims = [0] + list(range(2, x.ndim))
    per_batch = torch.stack([s.mean(dim=dims) for s in seen]).mean(0)  # equal batches: mean of batch means
    torch.testing.assert_close(bn.running_mean, per_batch, rtol=1e-4, atol=1e-5)
    assert recalibrate_untracked_batchnorm(model, images, pre, progress=False) == []  # nothing left untracked
