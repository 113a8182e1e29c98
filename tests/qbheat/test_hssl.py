"""HSSL: the distillation loss against a slow reference, heterogeneous heads, the teacher, pre-training smoke runs."""
import argparse
import csv
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from qbheat.checkpoint import build_backbone, load_checkpoint
from qbheat.commands.pretrain import add_arguments, overrides_from_args
from qbheat.config import PretrainConfig
from qbheat.errors import QBHeatError
from qbheat.additions.hssl import (
    HSSL,
    AttentionBlock,
    ConvNeXtBlock,
    HSSLConfig,
    as_feature_map,
    distillation_loss,
    teacher_distribution,
    teacher_temperature_at,
)
from qbheat.methods.mocov2 import MoCoV2, MoCoV2Config
from qbheat.methods.qbheat import QBHeat, QBHeatConfig
from qbheat.models import create_model
from qbheat.train import pretrain

SMALL = HSSLConfig(enabled=True, depth=2, hidden_dim=32, bottleneck_dim=8, out_dim=16)


def test_distillation_loss_matches_slow_reference():
    torch.manual_seed(0)
    t_logits, s_logits, center = torch.randn(4, 7), torch.randn(4, 7), torch.randn(1, 7)
    tau_t, tau_s = 0.04, 0.1
    total = 0.0
    for i in range(4):
        t = [math.exp((float(t_logits[i, k]) - float(center[0, k])) / tau_t) for k in range(7)]
        s = [math.exp(float(s_logits[i, k]) / tau_s) for k in range(7)]
        total += -sum(t[k] / sum(t) * math.log(s[k] / sum(s)) for k in range(7))
    probs = teacher_distribution(t_logits, center, tau_t)
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert distillation_loss(probs, s_logits, tau_s).item() == pytest.approx(total / 4, rel=1e-5)


def test_teacher_temperature_warms_up_linearly():
    assert teacher_temperature_at(0.0, 0.04, 0.07, 0.5) == pytest.approx(0.04)
    assert teacher_temperature_at(0.25, 0.04, 0.07, 0.5) == pytest.approx(0.055)
    assert teacher_temperature_at(0.5, 0.04, 0.07, 0.5) == pytest.approx(0.07)
    assert teacher_temperature_at(0.9, 0.04, 0.07, 0.5) == pytest.approx(0.07)
    assert teacher_temperature_at(0.0, 0.04, 0.07, 0.0) == pytest.approx(0.07)


def test_first_block_has_no_shortcut():
    x = torch.randn(2, 8, 5, 5)
    with_sc, without = ConvNeXtBlock(8, shortcut=True), ConvNeXtBlock(8, shortcut=False)
    for blk in (with_sc, without):
        torch.nn.init.zeros_(blk.mlp[2].weight)
        torch.nn.init.zeros_(blk.mlp[2].bias)
    assert torch.equal(with_sc(x), x) and torch.equal(without(x), torch.zeros_like(x))
    tokens = torch.randn(2, 6, 8)
    attn = AttentionBlock(8, 2, shortcut=False)
    torch.nn.init.zeros_(attn.proj.weight)
    torch.nn.init.zeros_(attn.proj.bias)
    torch.nn.init.zeros_(attn.mlp[2].weight)
    torch.nn.init.zeros_(attn.mlp[2].bias)
    assert torch.equal(attn(tokens), torch.zeros_like(tokens))  # the input is not carried through


def test_attention_block_matches_torch_multihead_attention():
    torch.manual_seed(0)
    blk = AttentionBlock(8, 2, shortcut=False).eval()
    torch.nn.init.zeros_(blk.mlp[2].weight)
    torch.nn.init.zeros_(blk.mlp[2].bias)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(blk.qkv.weight)
        ref.in_proj_bias.copy_(blk.qkv.bias)
        ref.out_proj.weight.copy_(blk.proj.weight)
        ref.out_proj.bias.copy_(blk.proj.bias)
    x = torch.randn(3, 5, 8)
    h = blk.norm1(x)
    torch.testing.assert_close(blk(x), ref(h, h, h, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def _heads_case():
    cases = [("resnet10t", "cnn", "transformer"), ("test_vit", "transformer", "conv")]
    if timm.is_model("mobileformer_micro"):
        cases.append(("mobileformer_micro", "cnn", "transformer"))
    return cases


@pytest.mark.parametrize("name,base,head", _heads_case())
def test_head_is_heterogeneous_to_the_base(name, base, head):
    torch.manual_seed(0)
    size = 32 if name == "test_vit" else 64
    method = MoCoV2(create_model(name, num_classes=0), MoCoV2Config(queue_size=8, dim=8))
    hssl = HSSL(SMALL, method, size)
    assert (hssl.base_kind, hssl.head_kind) == (base, head)
    first = hssl.aux_head.blocks[0]
    assert first.shortcut is False and all(b.shortcut for b in list(hssl.aux_head.blocks)[1:])
    out = method([torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)])
    res = hssl(out)
    assert torch.isfinite(res["loss"]) and res["loss"].item() == pytest.approx(0.5 * (res["base"] + res["aux"]).item(), rel=1e-5)
    res["loss"].backward()
    assert next(method.backbone.parameters()).grad is not None  # the base learns from the head's target
    assert all(p.grad is None for p in hssl.teacher_backbone.parameters())
    assert hssl.aux_head.blocks[0].mlp[0].weight.grad.abs().sum() > 0


def test_transformer_tokens_become_a_square_map():
    tokens = torch.randn(2, 1 + 16, 5)  # one class token + a 4×4 grid
    fmap, kind = as_feature_map(tokens, num_prefix_tokens=1)
    assert kind == "transformer" and fmap.shape == (2, 5, 4, 4)
    assert torch.equal(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    with pytest.raises(QBHeatError, match="square grid"):
        as_feature_map(torch.randn(2, 15, 5))


def test_teacher_center_and_ema():
    torch.manual_seed(0)
    method = QBHeat(create_model("test_convnext", num_classes=0), QBHeatConfig(feature_strides=[8]), 32)
    hssl = HSSL(SMALL, method, 32)
    out = method([torch.randn(4, 3, 32, 32)])
    logits = hssl.teacher_logits(out["target_inputs"][0])
    hssl(out)
    torch.testing.assert_close(hssl.center, 0.1 * logits.mean(0, keepdim=True))  # c ← 0.9·0 + 0.1·mean
    # the teacher follows the student's backbone and head by EMA, and remembers the progress
    s, t = hssl.aux_head.blocks[1].qkv.weight, hssl.teacher_aux_head.blocks[1].qkv.weight
    before = t.detach().clone()
    with torch.no_grad():
        s.add_(1.0)
    hssl.after_step(0.5)
    m = hssl.momentum
    assert 0.996 < m < 1.0 and float(hssl.progress) == 0.5
    torch.testing.assert_close(t, m * before + (1 - m) * s.detach())
    assert hssl.teacher_temperature() == pytest.approx(0.07)


def _cfg(out_dir, method, **kw):
    base = dict(method=method, model="test_convnext", data="synthetic", synthetic_size=24, image_size=32, batch_size=8,
                steps=4, num_workers=0, log_every=1, ckpt_every=100, progress=False, tensorboard=False,
                out_dir=str(out_dir), hssl=SMALL, qbheat=QBHeatConfig(feature_strides=[8]),
                mocov2=MoCoV2Config(queue_size=16, dim=8))
    base.update(kw)
    return PretrainConfig(**base)


def test_qbheat_with_hssl_resumes_exactly_and_ships_a_plain_backbone(tmp_path):
    whole = load_checkpoint(pretrain(_cfg(tmp_path / "whole", "qbheat")))
    pretrain(_cfg(tmp_path / "split", "qbheat", stop_after=2))
    resumed = load_checkpoint(pretrain(_cfg(tmp_path / "split", "qbheat", resume="auto")))
    assert whole["method"] == "qbheat+hssl" and resumed["step"] == 4
    for key in ("backbone", "hssl"):
        assert whole[key].keys() == resumed[key].keys()
        for k, v in whole[key].items():
            assert torch.equal(v, resumed[key][k]), f"{key}.{k}"
    assert float(resumed["hssl"]["progress"]) == pytest.approx(1.0)
    assert {"aux_head.blocks.0.qkv.weight", "teacher_backbone.stem.0.weight", "center"} <= set(whole["hssl"])
    # export sees an unchanged backbone: the same keys as a plain one, and it rebuilds strictly
    plain = create_model("test_convnext", num_classes=0).state_dict()
    assert set(whole["backbone"]) == set(plain)
    assert set(build_backbone(whole).state_dict()) == set(plain)
    rows = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["method_loss"]) + float(r["hssl_loss"]), rel=1e-4)
        assert math.isfinite(float(r["hssl_base"])) and math.isfinite(float(r["hssl_aux"]))


def test_mocov2_with_hssl_pretrains(tmp_path):
    ckpt = load_checkpoint(pretrain(_cfg(tmp_path, "mocov2", steps=3)))
    assert ckpt["method"] == "mocov2+hssl" and ckpt["step"] == 3
    assert set(ckpt["backbone"]) == set(create_model("test_convnext", num_classes=0).state_dict())
    assert int(ckpt["method_state"]["queue_ptr"]) == 8  # 3 steps × 8 keys in a 16-slot queue
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)


def test_cli_flag_and_validation():
    p = argparse.ArgumentParser()
    add_arguments(p)
    over = overrides_from_args(p.parse_args(["--method", "qbheat", "--hssl", "--set", "hssl.depth=2"]))
    assert over["hssl.enabled"] is True and over["hssl.depth"] == 2
    from qbheat.config import load_config

    cfg = load_config(None, over | {"data": "synthetic"})
    assert cfg.hssl.enabled and cfg.hssl.depth == 2 and cfg.method_label == "qbheat+hssl"
    with pytest.raises(QBHeatError, match="hssl.head"):
        PretrainConfig(data="synthetic", hssl=HSSLConfig(enabled=True, head="mlp")).validate()
    PretrainConfig(data="synthetic", hssl=HSSLConfig(enabled=False, head="mlp")).validate()  # off: not checked
