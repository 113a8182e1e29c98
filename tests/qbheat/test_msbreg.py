"""MSBReg: each term against a slow reference of its formula, the delayed network, pre-training with both methods."""
import math

import pytest
import torch
import torch.nn.functional as F

from qbheat import cli
from qbheat.checkpoint import build_backbone, load_checkpoint
from qbheat.config import PretrainConfig, load_config
from qbheat.errors import QBHeatError
from qbheat.methods.mocov2 import MoCoV2, MoCoV2Config
from qbheat.methods.qbheat import QBHeat, QBHeatConfig
from qbheat.models import create_model
from qbheat.additions import ADDITIONS
from qbheat.additions.msbreg import (
    MSBReg,
    MSBRegConfig,
    brownian_diffusive_loss,
    multiview_centroid_loss,
    singular_value_loss,
)
from qbheat.train import build_objective, pretrain

SMALL = MSBRegConfig(dim=8, hidden_dim=16)


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _slow_centroid(online, target):
    """Σ_i ‖c_i − c'_i‖² / N with c = n(mean_m n(v_m)), in Python floats."""
    total = 0.0
    for i in range(online.shape[0]):
        cs = []
        for views in (online[i], target[i]):
            units = [_unit(v.double().tolist()) for v in views]
            mean = [sum(u[k] for u in units) / len(units) for k in range(len(units[0]))]
            cs.append(_unit(mean))
        total += sum((a - b) ** 2 for a, b in zip(*cs))
    return total / online.shape[0]


@pytest.mark.parametrize("m_online,m_target", [(1, 1), (3, 2), (2, 4)])
def test_centroid_loss_matches_slow_reference(m_online, m_target):
    torch.manual_seed(0)
    online, target = torch.randn(5, m_online, 6), torch.randn(5, m_target, 6)
    got = multiview_centroid_loss(online, target)
    assert got.item() == pytest.approx(_slow_centroid(online, target), rel=1e-5)
    # zero when the centroids coincide, whatever the spread of the views around them
    u = F.normalize(torch.randn(5, 6), dim=1)
    w = torch.randn(5, 6)
    w = F.normalize(w - (w * u).sum(1, keepdim=True) * u, dim=1)  # ⊥ u: n(u ± 0.5 w) average to u's direction
    same = torch.stack([u + 0.5 * w, u - 0.5 * w], dim=1)
    assert multiview_centroid_loss(same, 3 * u[:, None]).item() == pytest.approx(0.0, abs=1e-5)


def test_centroid_loss_sends_no_gradient_to_the_target():
    online, target = torch.randn(4, 2, 5, requires_grad=True), torch.randn(4, 1, 5, requires_grad=True)
    multiview_centroid_loss(online, target).backward()
    assert online.grad.abs().sum() > 0 and target.grad is None


def _slow_singular_value(z):
    """(1/D) Σ_k (D σ_k² − 1)² from an explicit SVD of the centred Z/√(N−1), σ padded with zeros to D."""
    z = z.double()
    n, d = z.shape
    sv = torch.linalg.svdvals((z - z.mean(0)) / math.sqrt(n - 1)).tolist()
    sv += [0.0] * (d - len(sv))
    return sum((d * s * s - 1) ** 2 for s in sv) / d


@pytest.mark.parametrize("n,d", [(32, 8), (6, 16), (9, 9)])
def test_singular_value_loss_matches_svd_reference(n, d):
    torch.manual_seed(1)
    z = F.normalize(torch.randn(n, d) @ torch.randn(d, d), dim=1)  # correlated unit embeddings
    assert singular_value_loss(z).item() == pytest.approx(_slow_singular_value(z), rel=1e-4)


def test_singular_value_loss_is_zero_when_whitened_and_one_when_collapsed():
    d = 6
    n = 2 * d
    scale = math.sqrt((n - 1) / (2 * d))  # ±scale·e_k: covariance exactly I/D
    eye = torch.eye(d) * scale
    assert singular_value_loss(torch.cat([eye, -eye])).item() == pytest.approx(0.0, abs=1e-5)
    assert singular_value_loss(torch.ones(10, d)).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(QBHeatError, match="at least two"):
        singular_value_loss(torch.ones(1, d))


def test_brownian_loss_matches_reference_and_kicks_along_the_direction():
    torch.manual_seed(2)
    online = torch.randn(4, 3, 5, requires_grad=True)
    r = F.normalize(torch.randn(4, 5), dim=1)
    slow = sum(float(torch.dot(F.normalize(online[i, m].detach(), dim=0), r[i])) for i in range(4) for m in range(3)) / 12
    got = brownian_diffusive_loss(online, r)
    assert got.item() == pytest.approx(slow, rel=1e-5)
    # one direction for the whole batch broadcasts over images
    shared = r[:1]
    slow_shared = sum(float(torch.dot(F.normalize(online[i, m].detach(), dim=0), shared[0])) for i in range(4) for m in range(3)) / 12
    assert brownian_diffusive_loss(online, shared).item() == pytest.approx(slow_shared, rel=1e-5)
    # on a unit embedding the gradient is the tangential part of r̂ / (N·M): a kick of fixed direction
    got.backward()
    p = F.normalize(online[0, 0].detach(), dim=0)
    tangential = (r[0] - torch.dot(r[0], p) * p) / 12 / online[0, 0].detach().norm()
    torch.testing.assert_close(online.grad[0, 0], tangential, rtol=1e-4, atol=1e-6)


def _qbheat():
    return QBHeat(create_model("test_convnext", num_classes=0), QBHeatConfig(feature_strides=[16]), 64)


def test_msbreg_with_qbheat_owns_a_delayed_backbone_that_follows_the_online_one():
    torch.manual_seed(0)
    method = _qbheat()
    reg = MSBReg(SMALL, method)
    assert not reg.uses_method_momentum and reg.delayed_backbone is not None
    assert not any(p.requires_grad for p in reg.delayed_backbone.parameters())
    assert not any(k.startswith("_online") for k in reg.state_dict())  # the method's backbone is not saved twice
    out = method([torch.randn(4, 3, 64, 64)])
    res = reg(out)
    (out["loss"] + res["loss"]).backward()
    w = res["loss"].item()
    parts = res["centroid"] + res["singular_value"] + 0.1 * res["brownian"]
    assert w == pytest.approx(parts.item(), rel=1e-5)
    first = next(method.backbone.parameters())
    assert first.grad is not None and all(p.grad is None for p in reg.delayed_backbone.parameters())
    # EMA: after the online backbone moves, the delayed one moves (1 − m) of the way
    online_p, delayed_p = next(method.backbone.parameters()), next(reg.delayed_backbone.parameters())
    before = delayed_p.detach().clone()
    with torch.no_grad():
        online_p.add_(1.0)
    reg.after_step(0.0)  # cosine schedule at progress 0: m = base 0.996
    torch.testing.assert_close(delayed_p, 0.996 * before + 0.004 * online_p.detach())


def test_msbreg_with_mocov2_uses_the_key_encoder():
    torch.manual_seed(0)
    method = MoCoV2(create_model("test_convnext", num_classes=0), MoCoV2Config(queue_size=8, dim=8))
    reg = MSBReg(SMALL, method)
    assert reg.uses_method_momentum and reg.delayed_backbone is None
    out = method([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    target = torch.stack([reg.target_projector(h) for h in out["momentum_embeddings"]], 1)
    online = torch.stack([reg.predictor(reg.projector(h)) for h in out["embeddings"]], 1)
    torch.manual_seed(3)
    res = reg(out)
    assert res["centroid"].item() == pytest.approx(multiview_centroid_loss(online, target).item(), rel=1e-5)


def _cfg(out_dir, method, **kw):
    base = dict(method=method, model="test_convnext", data="synthetic", synthetic_size=24, image_size=32, batch_size=8,
                steps=4, num_workers=0, log_every=1, ckpt_every=100, progress=False, tensorboard=False,
                out_dir=str(out_dir), regularizers=["msbreg"], msbreg=SMALL,
                qbheat=QBHeatConfig(feature_strides=[8]), mocov2=MoCoV2Config(queue_size=16, dim=8))
    base.update(kw)
    return PretrainConfig(**base)


def test_mocov2_with_msbreg_pretrains_and_records_it(tmp_path):
    path = pretrain(_cfg(tmp_path, "mocov2"))
    ckpt = load_checkpoint(path)
    assert ckpt["method"] == "mocov2+msbreg" and ckpt["step"] == 4
    assert "msbreg.projector.0.weight" in ckpt["regularizers"] and "msbreg.target_projector.0.weight" in ckpt["regularizers"]
    # the backbone rebuilds strictly: MSBReg adds nothing to what export sees
    backbone = build_backbone(ckpt)
    assert set(backbone.state_dict()) == set(create_model("test_convnext", num_classes=0).state_dict())
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 4
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("loss", "method_loss", "msbreg_loss", "msbreg_centroid",
                                                          "msbreg_singular_value", "msbreg_brownian"))
        assert float(r["loss"]) == pytest.approx(float(r["method_loss"]) + float(r["msbreg_loss"]), rel=1e-4)


def test_qbheat_with_msbreg_resumes_exactly(tmp_path):
    whole = load_checkpoint(pretrain(_cfg(tmp_path / "whole", "qbheat")))
    pretrain(_cfg(tmp_path / "split", "qbheat", stop_after=2))
    resumed = load_checkpoint(pretrain(_cfg(tmp_path / "split", "qbheat", resume="auto")))
    assert whole["method"] == resumed["method"] == "qbheat+msbreg" and resumed["step"] == 4
    for key in ("backbone", "regularizers"):  # incl. the delayed backbone and projector
        assert whole[key].keys() == resumed[key].keys()
        for k, v in whole[key].items():
            assert torch.equal(v, resumed[key][k]), f"{key}.{k}"
    assert any(k.startswith("msbreg.delayed_backbone.") for k in whole["regularizers"])


def test_resuming_without_the_regularizer_is_refused(tmp_path, capsys):
    pretrain(_cfg(tmp_path, "qbheat", steps=1))
    code = cli.main(["pretrain", "--no-progress", "--no-tensorboard", "--data", "synthetic", "--model", "test_convnext",
                     "--image-size", "32", "--batch-size", "8", "--steps", "2", "--num-workers", "0",
                     "--set", "synthetic_size=24", "--set", "qbheat.feature_strides=[8]", "--out-dir", str(tmp_path),
                     "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'qbheat+msbreg'" in err and "\n" not in err


def test_cli_and_yaml_reach_msbreg(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: mocov2\ndata: synthetic\nregularizers: [msbreg]\nmsbreg:\n  weight_brownian: 0.3\n  norm: batch\n")
    cfg = load_config(f, {"msbreg.dim": 64})
    assert cfg.regularizers == ["msbreg"] and cfg.msbreg.weight_brownian == 0.3 and cfg.msbreg.dim == 64
    assert cfg.method_label == "mocov2+msbreg"
    from qbheat.commands.pretrain import add_arguments, overrides_from_args
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    over = overrides_from_args(p.parse_args(["--method", "mocov2", "--regularizer", "msbreg"]))
    assert over["regularizers"] == ["msbreg"]
    with pytest.raises(QBHeatError, match="msbreg.norm"):
        PretrainConfig(data="synthetic", regularizers=["msbreg"], msbreg=MSBRegConfig(norm="group")).validate()
    assert "msbreg" in ADDITIONS


def test_objective_adds_msbreg_to_the_method_loss():
    cfg = PretrainConfig(method="qbheat", model="test_convnext", data="synthetic", image_size=64, regularizers=["msbreg"],
                         msbreg=SMALL, qbheat=QBHeatConfig(feature_strides=[16]))
    objective = build_objective(cfg)
    out = objective([torch.randn(3, 3, 64, 64)])
    assert out["loss"].item() == pytest.approx(out["method_loss"].item() + out["msbreg_loss"].item(), rel=1e-5)
