"""Mobile-Former's export-time lean forms: what ``fuse()`` turns each training-form module into.

Export-only: ``timm.utils.model.reparameterize_model`` (the export pipeline's step 3) calls every module's
``fuse()``, which builds these from the trained module; training and probes never see them. The model
file, ``qbheat.models.mobileformer``, holds the training forms.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from qbheat.models.mobileformer import ChannelShuffle, DynamicReLU, Former, FormerToMobile, LiteBottleneck, MergeClassifier, MobileBottleneck, MobileDownsample, MobileToFormer

# ``fuse()`` turns each training-form module into one of these. They compute the same function with
# far fewer (and no layout-changing) graph nodes, which is what costs time in ONNX Runtime and
# OpenVINO for a model whose tokens are tiny: the plain MF-294M exports to ~1,100 ONNX nodes against
# MobileNetV3-L's 140. The rewrites are ours (not in the paper or the official code):
#   * one projection per bridge side: query and gate (Mobile→Former), key and value (Former→Mobile);
#   * heads split by reshapes of the feature map (no copy) and transposes of the 6 tokens only; the
#     transposed operands of the attention matmuls fold into the runtimes' matmul kernels (ORT's
#     FusedMatMul), so the feature map is never transposed;
#   * constants folded into weights: 1/√d_head into the query/key projection, the gate's factor 2
#     into the output projection, BN into convs and the head's FC, DyReLU's affine maps of hsigmoid
#     into its MLP (a₁ = clamp(u₁/3 + 1, 0, 2), a₂ = clamp(u₂/3, −1, 1));
#   * both DyReLUs of a Mobile sub-block get their coefficients from one MLP (concatenated first
#     layer, block-diagonal second layer), computed once from token 0;
#   * a depthwise conv with channel multiplier m > 1 (C → m·C, groups C: the lite block's and the
#     downsampling blocks' 3×3 convs) becomes m plain depthwise convs C → C and a concat, with the
#     next 1×1 conv's input channels and the DyReLU coefficients permuted to match. OpenVINO runs
#     the multiplier form as a generic grouped conv (the lite block's alone took 0.84 of 9.1 ms in
#     MF-294M); split, OpenVINO f32 was 11.6 % faster and ONNX Runtime 2 % slower (one run, batch 1).
# An earlier version wrote each head into a zero-padded copy of the channel vector instead (no token
# transposes, but 16.1 M instead of 11.3 M weights and 320 M instead of 287 M MACs for MF-294M);
# measured side by side with this form (224², batch 1, 2 threads, shared 2-core AVX2 machine) it was
# ~10 % slower: ONNX Runtime 20.2 vs 18.1 ms p50 (spinning off), OpenVINO f32 21.7 vs 18.2 ms min; the
# extra weight traffic cost more than the tiny transposes it saved. The DyReLU hyper-networks' second
# layers are grouped 1×1 convs where the widths allow (see ``LeanDynamicReLUs``).
def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Conv (no bias) followed by eval-mode BN, as one conv with bias (torch's ``fuse_conv_bn_weights``)."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def _fold_conv_bn(seq: nn.Sequential) -> nn.Module:
    """``conv_bn``'s Sequential(conv, BN[, shuffle]) → conv with bias [→ shuffle]."""
    conv = _fold_bn(seq[0], seq[1])
    return nn.Sequential(conv, *seq[2:]) if len(seq) > 2 else conv


class SplitDepthwise(nn.Module):
    """A depthwise conv with channel multiplier m (C → m·C, groups = C) as m depthwise convs C → C
    whose outputs are concatenated. Output channel j·C + c is the original's channel c·m + j
    (``order`` lists, per new position, the original channel)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        c, m = conv.in_channels, conv.out_channels // conv.in_channels
        self.parts = nn.ModuleList()
        for j in range(m):
            part = nn.Conv2d(c, c, conv.kernel_size, conv.stride, conv.padding, groups=c, bias=conv.bias is not None)
            with torch.no_grad():
                part.weight.copy_(conv.weight[j::m])
                if conv.bias is not None:
                    part.bias.copy_(conv.bias[j::m])
            self.parts.append(part)
        self.order = torch.tensor([i * m + j for j in range(m) for i in range(c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=1)


def _split_depthwise(dw: nn.Module, consumer: nn.Module) -> Tuple[nn.Module, Optional[torch.Tensor]]:
    """Split ``dw`` if it is a depthwise conv with channel multiplier > 1 feeding the ungrouped 1×1
    conv ``consumer``, whose input channels are permuted in place to match. Returns the (possibly new)
    depthwise module and the channel order (None when nothing was split, e.g. behind a channel shuffle)."""
    if not (isinstance(dw, nn.Conv2d) and isinstance(consumer, nn.Conv2d) and consumer.groups == 1
            and dw.groups == dw.in_channels and dw.out_channels > dw.in_channels):
        return dw, None
    split = SplitDepthwise(dw)
    with torch.no_grad():
        consumer.weight.copy_(consumer.weight[:, split.order])
    return split, split.order


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


class LeanMobileToFormer(nn.Module):
    """``MobileToFormer`` for export: the query (pre-scaled by 1/√(C/h)) and the gate come from one
    projection d → 2C; the heads split the channels by a reshape of the map (no copy) and of the tiny
    query; the gate's factor 2 is folded into the output projection."""

    def __init__(self, m: MobileToFormer):
        super().__init__()
        self.heads = m.num_heads
        self.project_in = _linear(torch.cat([m.q.weight * m.scale, m.gate.weight]),
                                  torch.cat([m.q.bias * m.scale, m.gate.bias]))  # d → 2C
        self.project_out = _linear(m.proj.weight * 2.0, m.proj.bias)  # C → d
        self.norm = m.norm

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        t, h = z.shape[1], self.heads
        q, g = self.project_in(z).split(c, dim=-1)  # B×T×C each
        q = q.reshape(b, t, h, c // h).transpose(1, 2)  # B×h×T×C/h (6 tokens: a tiny transpose)
        k = x.reshape(b, h, c // h, hh * ww)  # B×h×C/h×HW, keys = values = pixels, no copy
        attn = (q @ k).softmax(dim=-1)  # B×h×T×HW
        out = (attn @ k.transpose(-1, -2)).transpose(1, 2).reshape(b, t, c)  # B×T×C
        return self.norm(z + self.project_out(out * F.hardsigmoid(g)))


class LeanFormer(nn.Module):
    """``Former`` for export: the attention scale folded into the query projection; the heads split
    the 6 tokens' channels by reshapes and tiny transposes (a zero-padded per-head query, which
    needs no transpose, quadruples the projection weights and measured slower)."""

    def __init__(self, m: Former):
        super().__init__()
        self.heads = m.num_heads
        self.q = _linear(m.q.weight * m.scale, m.q.bias * m.scale)
        self.proj, self.norm, self.ffn, self.ffn_norm = m.proj, m.norm, m.ffn, m.ffn_norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        n = self.heads
        q = self.q(z).reshape(b, t, n, d // n).transpose(1, 2)  # B×n×T×d/n
        k = z.reshape(b, t, n, d // n).transpose(1, 2)  # K = V = Z
        out = ((q @ k.transpose(-1, -2)).softmax(dim=-1) @ k).transpose(1, 2).reshape(b, t, d)
        z = self.norm(z + self.proj(out))
        return self.ffn_norm(z + self.ffn(z))


class LeanFormerToMobile(nn.Module):
    """``FormerToMobile`` for export: keys (pre-scaled by 1/√(C/h)) and values from one projection
    d → 2C, laid out per head as C/h×T matrices (a permute of the 6 tokens only). The logits are
    computed token-major, Kᵀ X (T×HW per head), with the softmax over the tokens axis, and the output
    is V A: both matmuls take the feature map as it is laid out, and the softmax runs along HW-long
    rows instead of over 6 values at a time (pixel-major with a softmax over the last axis was 3–4 %
    slower on OpenVINO and 1 % on ONNX Runtime for MF-294M)."""

    def __init__(self, m: FormerToMobile):
        super().__init__()
        self.heads = m.num_heads
        self.project = _linear(torch.cat([m.k.weight * m.scale, m.v.weight]),
                               torch.cat([m.k.bias * m.scale, m.v.bias]))  # d → 2C

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        t, h = z.shape[1], self.heads
        kv = self.project(z).reshape(b, t, 2 * h, c // h).permute(0, 2, 3, 1)  # B×2h×C/h×T
        k, v = kv.split(h, dim=1)  # B×h×C/h×T each
        q = x.reshape(b, h, c // h, hh * ww)  # B×h×C/h×HW, no copy
        attn = (k.transpose(-1, -2) @ q).softmax(dim=-2)  # B×h×T×HW, normalised over the T tokens
        return x + (v @ attn).reshape(b, c, hh, ww)


class LeanDynamicReLUs(nn.Module):
    """The coefficients of several DyReLUs from token 0 in one pass: first layers concatenated, second
    layers side by side, and hsigmoid's affine maps folded in, so a = clamp(W z₀ + b, lo, hi) gives
    every (a₁, a₂) pair at once as B×ΣC×1×1 slices.

    Where every DyReLU has the same hidden and channel widths (all of MF-294M's blocks but one
    downsampling block), the second layers are one grouped 1×1 conv on the B×K×1×1 hidden vector, so
    no weight is padding. Otherwise they are one block-diagonal linear layer, zeros off the blocks.
    The padded form made MF-294M's lean graph 12.5 M weights against the model's 11.3 M, and
    streaming those zeros from memory is not free at batch 1."""

    def __init__(self, acts: List[DynamicReLU]):
        super().__init__()
        self.sizes = [a.channels for act in acts for a in (act, act)]  # a₁ and a₂ of each DyReLU
        w1 = torch.cat([a.hyper[0].weight for a in acts])
        b1 = torch.cat([a.hyper[0].bias for a in acts])
        hidden = [a.hyper[2].in_features for a in acts]
        self.grouped = len(set(hidden)) == 1 and len(set(a.channels for a in acts)) == 1
        rows, cols = sum(2 * a.channels for a in acts), w1.shape[0]
        w2 = w1.new_zeros(rows, hidden[0] if self.grouped else cols)
        b2, lo, hi = w1.new_zeros(rows), w1.new_zeros(rows), w1.new_zeros(rows)
        r, col = 0, 0
        for a, k in zip(acts, hidden):
            fc2, n = a.hyper[2], a.channels
            c0 = 0 if self.grouped else col
            w2[r:r + 2 * n, c0:c0 + k] = fc2.weight / 3.0  # 2·hsigmoid(u) − o = clamp(u/3 + 1 − o, −o, 2 − o)
            b2[r:r + 2 * n] = fc2.bias / 3.0
            b2[r:r + n] += 1.0
            lo[r + n:r + 2 * n], hi[r:r + n], hi[r + n:r + 2 * n] = -1.0, 2.0, 1.0
            r, col = r + 2 * n, col + k
        self.fc1 = _linear(w1, b1)
        if self.grouped:
            self.fc2 = nn.Conv2d(cols, rows, 1, groups=len(acts))
            with torch.no_grad():
                self.fc2.weight.copy_(w2[:, :, None, None])
                self.fc2.bias.copy_(b2)
        else:
            self.fc2 = _linear(w2, b2)
        self.register_buffer("lo", lo[:, None, None])
        self.register_buffer("hi", hi[:, None, None])

    def reorder(self, index: int, order: torch.Tensor) -> None:
        """Emit DyReLU ``index``'s (a₁, a₂) in channel ``order`` (that of a split conv's output)."""
        start, n = sum(self.sizes[:2 * index]), self.sizes[2 * index]
        rows = torch.arange(len(self.lo))
        rows[start:start + n] = start + order
        rows[start + n:start + 2 * n] = start + n + order
        with torch.no_grad():
            for t in (self.fc2.weight, self.fc2.bias, self.lo, self.hi):
                t.copy_(t[rows])

    def forward(self, token0: torch.Tensor) -> List[torch.Tensor]:
        h = F.relu(self.fc1(token0))
        a = self.fc2(h[:, :, None, None]) if self.grouped else self.fc2(h)[:, :, None, None]
        return list(torch.clamp(a, self.lo, self.hi).split(self.sizes, dim=1))  # B×ΣC×1×1 slices


class LeanMobile(nn.Module):
    """``MobileBottleneck`` / ``MobileDownsample`` for export: BN folded into the convs and both DyReLUs'
    coefficients from one ``LeanDynamicReLUs``; y = max(a₁x, a₂x) stays two products and a max."""

    def __init__(self, m: Union[MobileBottleneck, MobileDownsample]):
        super().__init__()
        self.downsample = isinstance(m, MobileDownsample)
        if self.downsample:
            convs = (m.conv_dw1, m.conv_pw1, m.conv_dw2, m.conv_pw2)
        else:
            convs = (m.conv_pw, m.conv_dw, m.conv_pwl)
        convs = [_fold_conv_bn(c) for c in convs]
        self.coefficients = LeanDynamicReLUs([m.act1, m.act2])
        if self.downsample:  # both depthwise convs have a channel multiplier (e1, e2)
            for act, i in ((0, 0), (1, 2)):
                convs[i], order = _split_depthwise(convs[i], convs[i + 1])
                if order is not None:
                    self.coefficients.reorder(act, order)
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor, token0: torch.Tensor) -> torch.Tensor:
        a1, a2, b1, b2 = self.coefficients(token0)
        if self.downsample:
            x = self.convs[0](x)
            r = self.convs[1](torch.maximum(x * a1, x * a2))
            x = self.convs[2](r)
            return self.convs[3](torch.maximum(x * b1, x * b2)) + r
        x = self.convs[0](x)
        x = self.convs[1](torch.maximum(x * a1, x * a2))
        return self.convs[2](torch.maximum(x * b1, x * b2))


class LeanLite(nn.Module):
    """``LiteBottleneck`` for export: BN folded, the depthwise conv (multiplier e) split into plain
    depthwise convs and a concat, the pointwise conv's inputs permuted to match."""

    def __init__(self, m: LiteBottleneck):
        super().__init__()
        self.pw = _fold_conv_bn(m.pw)
        self.dw, _ = _split_depthwise(_fold_conv_bn(m.dw), self.pw)
        self.has_skip = m.has_skip

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.pw(F.relu6(self.dw(x)))
        return (out + x if self.has_skip else out), z


class LeanMergeClassifier(nn.Module):
    """``MergeClassifier`` for export: BN folded into the 1×1 conv and into the FC; h-swish as one op."""

    def __init__(self, m: MergeClassifier):
        super().__init__()
        convs = list(m.conv)
        self.shuffle = convs[0] if isinstance(convs[0], ChannelShuffle) else nn.Identity()
        self.conv = _fold_bn(convs[-2], convs[-1])
        bn = m.fc_norm
        self.fc = _linear(*fuse_linear_bn_weights(m.fc.weight, m.fc.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias))
        self.num_features = m.num_features
        self.classifier = m.classifier

    def forward(self, x: torch.Tensor, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.hardswish(F.relu6(self.conv(self.shuffle(x))).mean(dim=(2, 3)))
        feats = F.hardswish(self.fc(torch.cat([pooled, z[:, 0]], dim=1)))
        return feats if pre_logits else self.classifier(feats)
