"""Mobile-Former: a MobileNet and a few-token Transformer in parallel, joined by a two-way bridge.

Paper: Yinpeng Chen, Xiyang Dai, Dongdong Chen, Mengchen Liu, Xiaoyi Dong, Lu Yuan, Zicheng Liu,
"Mobile-Former: Bridging MobileNet and Transformer", CVPR 2022 (arXiv 2108.05895). Official code:
github.com/AAboys/MobileFormer (``mobile_former.py``, ``dna_blocks.py``, written for timm 0.3.4).
This file is our own implementation of the published design; facts come from
``reference/qbheat_mobileformer.md`` section B.

The network carries two things side by side: a local feature map X (B×C×H×W) and T global tokens
Z (B×T×d, T ≤ 6, learned, not image patches). Every block except the first does, in order:

1. **Mobile→Former** (``MobileToFormer``): the tokens attend to the pixels of the block's input,
   2 heads splitting channels, no key/value projection on the local side (K = V = X), a per-token
   gate 2·hsigmoid(Linear(Z)) (a detail only in the official code), output projection, post-LN.
2. **Former** (``Former``): self-attention over the T tokens (4 heads, query projection only,
   K = V = Z), then an FFN with expansion 2 and GELU; post-LN after each.
3. **Mobile** (``MobileBottleneck`` or, when downsampling, ``MobileDownsample``): an inverted
   bottleneck whose activations are **dynamic ReLUs** with coefficients computed from token 0.
4. **Former→Mobile** (``FormerToMobile``): every pixel attends to the tokens (2 heads, Q = X with no
   projection, K and V projected from Z), added to the map with no output projection.

The first block is MicroNet's lite bottleneck (no tokens involved). One more Mobile→Former after
the last block updates the tokens, and the merge classifier concatenates the pooled, widened map
with token 0 before an MLP.

Where this file departs from the official code, on purpose (none changes the function or the
parameter count):
  * Tokens are kept batch-first (B×T×d) everywhere; the official code keeps them token-first.
  * The token embedding is a ``tokens`` parameter (T×d, N(0, 1) init) rather than ``nn.Embedding``.
  * Every shape is read from the input, so any input size divisible by the network's stride works
    and ``torch.export`` sees a dynamic batch.
  * ``feature_info`` lists the last block of each stride; ``features_only=True`` defaults to the
    levels at strides 8, 16 and 32 (the detection taps).
  * ``fuse()`` (timm's ``reparameterize_model`` calls it) rewrites the modules into an export-time
    form with fewer graph nodes and the same outputs; training always uses the form above.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from qbheat.errors import QBHeatError

__all__ = [
    "BlockSpec",
    "MobileFormerConfig",
    "MOBILEFORMER_CONFIGS",
    "DynamicReLU",
    "MobileToFormer",
    "Former",
    "FormerToMobile",
    "LiteBottleneck",
    "MobileBottleneck",
    "MobileDownsample",
    "MobileFormerBlock",
    "MergeClassifier",
    "MobileFormer",
]


# --- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSpec:
    """One row of the official ``dna_blocks`` table: ``kind, e1, channels, stride, e2``.

    kind: "lite" (MicroNet's lite bottleneck, the first block), "down" (official ``DnaBlock3``:
    dw(s, ×e1) → pw → dw(×e2) → pw with an inner residual) or "mobile" (official ``DnaBlock``:
    pw(×e1) → dw(s) → pw). ``e2`` is unused by "mobile" blocks (the official rows carry it anyway).
    """

    kind: str
    e1: int
    channels: int
    stride: int = 1
    e2: int = 4


def _rows(*rows: Tuple[str, int, int, int, int]) -> Tuple[BlockSpec, ...]:
    return tuple(BlockSpec(*r) for r in rows)


@dataclass(frozen=True)
class MobileFormerConfig:
    """Architecture of one Mobile-Former. Defaults are the official constants common to all seven.

    ``head_features`` is the merge classifier's MLP width (official ``num_features``);
    ``group_num`` > 1 makes the 1×1 convs grouped with channel shuffles (official MF-26M).
    """

    blocks: Tuple[BlockSpec, ...]
    stem_chs: int
    token_num: int
    token_dim: int
    head_features: int
    group_num: int = 1
    head_expansion: int = 6  # official last_exp: the head's 1×1 conv widens C → 6C
    bridge_heads: int = 2  # official attn_num_heads (Mobile→Former and Former→Mobile)
    former_heads: int = 4  # official GlobalBlock default (the argument is not passed through)
    former_ffn_expansion: int = 2  # official GlobalBlock.ffn_exp
    hyper_reduction: int = 4  # official hyper_reduction_ratio: DyReLU MLP d → d/4 → 2C
    drop_path_rate: float = 0.0  # official README trains with --drop-path 0

    def validate(self) -> None:
        if not self.blocks or self.blocks[0].kind != "lite":
            raise QBHeatError("a Mobile-Former config must start with a 'lite' block; put the lite bottleneck first.")
        for i, b in enumerate(self.blocks):
            if b.kind not in ("lite", "down", "mobile") or (b.kind == "lite" and i > 0):
                raise QBHeatError(f"block {i} has kind {b.kind!r}; use 'lite' (first block only), 'down' or 'mobile'.")
            if b.stride not in (1, 2):
                raise QBHeatError(f"block {i} has stride {b.stride}; Mobile-Former blocks use stride 1 or 2.")
            if b.channels % self.bridge_heads or b.channels % self.group_num:
                raise QBHeatError(f"block {i} has {b.channels} channels, not divisible by the bridge heads "
                                  f"({self.bridge_heads}) and groups ({self.group_num}); change the channel count.")
        if self.token_dim % self.former_heads or self.token_dim % self.hyper_reduction:
            raise QBHeatError(f"token_dim {self.token_dim} must divide by former_heads ({self.former_heads}) and "
                              f"hyper_reduction ({self.hyper_reduction}); change token_dim.")

    @property
    def stride(self) -> int:
        return 2 * math.prod(b.stride for b in self.blocks)


# Official block tables (``AAboys/MobileFormer/mobile_former.py``; reference section B.3), as
# (kind, e1, channels, stride, e2). Published: params 14.0/11.4/9.4/7.6/4.6/3.5/3.2 M,
# FLOPs 508/294/214/151/96/52/26 M, ImageNet top-1 79.3/77.9/76.7/75.2/72.8/68.7/64.0.
_BLOCKS_508 = _rows(("lite", 2, 24, 1, 0), ("down", 6, 40, 2, 4), ("mobile", 3, 40, 1, 3), ("down", 6, 72, 2, 4),
                    ("mobile", 3, 72, 1, 3), ("down", 6, 128, 2, 4), ("mobile", 4, 128, 1, 4), ("mobile", 6, 176, 1, 4),
                    ("mobile", 6, 176, 1, 4), ("down", 6, 240, 2, 4), ("mobile", 6, 240, 1, 4), ("mobile", 6, 240, 1, 4))
_BLOCKS_294 = _rows(("lite", 2, 16, 1, 0), ("down", 6, 24, 2, 4), ("mobile", 4, 24, 1, 4), ("down", 6, 48, 2, 4),
                    ("mobile", 4, 48, 1, 4), ("down", 6, 96, 2, 4), ("mobile", 4, 96, 1, 4), ("mobile", 6, 128, 1, 4),
                    ("mobile", 6, 128, 1, 4), ("down", 6, 192, 2, 4), ("mobile", 6, 192, 1, 4), ("mobile", 6, 192, 1, 4))
_BLOCKS_214 = _rows(("lite", 2, 12, 1, 0), ("down", 6, 20, 2, 4), ("mobile", 3, 20, 1, 4), ("down", 6, 40, 2, 4),
                    ("mobile", 4, 40, 1, 4), ("down", 6, 80, 2, 4), ("mobile", 4, 80, 1, 4), ("mobile", 6, 112, 1, 4),
                    ("mobile", 6, 112, 1, 4), ("down", 6, 160, 2, 4), ("mobile", 6, 160, 1, 4), ("mobile", 6, 160, 1, 4))
_BLOCKS_151 = _rows(("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("mobile", 3, 16, 1, 3), ("down", 6, 32, 2, 4),
                    ("mobile", 3, 32, 1, 3), ("down", 6, 64, 2, 4), ("mobile", 4, 64, 1, 4), ("mobile", 6, 88, 1, 4),
                    ("mobile", 6, 88, 1, 4), ("down", 6, 128, 2, 4), ("mobile", 6, 128, 1, 4), ("mobile", 6, 128, 1, 4))
_BLOCKS_96 = _rows(("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("down", 6, 32, 2, 4), ("mobile", 3, 32, 1, 3),
                   ("down", 6, 64, 2, 4), ("mobile", 4, 64, 1, 4), ("mobile", 6, 88, 1, 4), ("down", 6, 128, 2, 4),
                   ("mobile", 6, 128, 1, 4))
_BLOCKS_52 = _rows(("lite", 3, 12, 2, 0), ("mobile", 3, 12, 1, 3), ("down", 6, 24, 2, 4), ("mobile", 3, 24, 1, 3),
                   ("down", 6, 48, 2, 4), ("mobile", 4, 48, 1, 4), ("mobile", 6, 64, 1, 4), ("down", 6, 96, 2, 4),
                   ("mobile", 6, 96, 1, 4))

MOBILEFORMER_CONFIGS: Dict[str, MobileFormerConfig] = {
    "mobileformer_508m": MobileFormerConfig(_BLOCKS_508, stem_chs=24, token_num=6, token_dim=192, head_features=1920),
    "mobileformer_294m": MobileFormerConfig(_BLOCKS_294, stem_chs=16, token_num=6, token_dim=192, head_features=1920),
    "mobileformer_214m": MobileFormerConfig(_BLOCKS_214, stem_chs=12, token_num=6, token_dim=192, head_features=1600),
    "mobileformer_151m": MobileFormerConfig(_BLOCKS_151, stem_chs=12, token_num=6, token_dim=192, head_features=1280),
    "mobileformer_96m": MobileFormerConfig(_BLOCKS_96, stem_chs=12, token_num=4, token_dim=128, head_features=1280),
    "mobileformer_52m": MobileFormerConfig(_BLOCKS_52, stem_chs=8, token_num=3, token_dim=128, head_features=1024),
    "mobileformer_26m": MobileFormerConfig(_BLOCKS_52, stem_chs=8, token_num=3, token_dim=128, head_features=1024,
                                           group_num=4),
    # QB-Heat's encoder ("Mobile-Former, 5.8 M params, 285 M FLOPs") is not public; see
    # ``mobileformer_qbheat_285m`` for how this config was chosen.
    "mobileformer_qbheat_285m": MobileFormerConfig(_BLOCKS_294, stem_chs=16, token_num=6, token_dim=192,
                                                   head_features=1920),
    # Our config for 32–64 px images (Fashion-MNIST at 64 px): the MF-52M pattern with one block
    # fewer at strides 4 and 16, so the stride-8/16/32 levels exist at 64 px (8×8, 4×4, 2×2).
    "mobileformer_micro": MobileFormerConfig(
        _rows(("lite", 3, 12, 2, 0), ("down", 6, 24, 2, 4), ("mobile", 3, 24, 1, 3), ("down", 6, 48, 2, 4),
              ("mobile", 4, 48, 1, 4), ("down", 6, 96, 2, 4), ("mobile", 4, 96, 1, 4)),
        stem_chs=8, token_num=3, token_dim=96, head_features=512),
}


# --- small layers -----------------------------------------------------------------------------------
class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle over ``groups`` groups (official MF-26M, with grouped 1×1 convs)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, shuffle: int = 1) -> nn.Sequential:
    """Conv (no bias) → BN, then an optional channel shuffle over ``shuffle`` groups."""
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if shuffle > 1:
        layers.append(ChannelShuffle(shuffle))
    return nn.Sequential(*layers)


class DynamicReLU(nn.Module):
    """Dynamic ReLU (DY-ReLU-B, slopes only) whose coefficients come from global token 0.

    h = hsigmoid(W₂ ReLU(W₁ z₀)) ∈ [0, 1]^{2C}, split into a₁ = 2h₁ ∈ [0, 2] and a₂ = 2h₂ − 1 ∈ [−1, 1]
    (the official ``(h − 0.5)·2 + 1`` and ``(h − 0.5)·2``), and y = max(a₁ ⊙ x, a₂ ⊙ x), per channel and
    shared over space. At h = 0.5 it is a plain ReLU. Official ``HyperFunc`` + ``DyReLU(num_func=2)``.
    """

    def __init__(self, channels: int, token_dim: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.hyper = nn.Sequential(nn.Linear(token_dim, token_dim // reduction), nn.ReLU(inplace=True),
                                   nn.Linear(token_dim // reduction, 2 * channels))

    def coefficients(self, token0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(a₁, a₂), each B×C×1×1, from token 0 (B×d)."""
        h = F.hardsigmoid(self.hyper(token0))  # B×2C: relu6(x + 3) / 6, the official h_sigmoid
        a1, a2 = h.unsqueeze(-1).unsqueeze(-1).split(self.channels, dim=1)
        return (a1 - 0.5) * 2.0 + 1.0, (a2 - 0.5) * 2.0

    def forward(self, x: torch.Tensor, token0: torch.Tensor) -> torch.Tensor:
        a1, a2 = self.coefficients(token0)
        if self.training and torch.is_grad_enabled():
            # The same function as max(a₁x, a₂x), written lo·x + (hi − lo)·ReLU(x) with hi, lo the larger and
            # smaller slope per channel: its backward is a ReLU mask and products instead of the elementwise
            # max's masked fills over both full-size products (see benchmarks/pretrain_throughput.py). It
            # rounds differently in the last bits, so evaluation and export keep the max form.
            hi, lo = torch.maximum(a1, a2), torch.minimum(a1, a2)
            return lo * x + (hi - lo) * torch.relu(x)
        return torch.maximum(x * a1, x * a2)


# --- the bridge and the Former ----------------------------------------------------------------------
class MobileToFormer(nn.Module):
    """Mobile→Former: tokens attend to the pixels of X (official ``Local2Global``, attention form).

    Per head i (channels split in h groups x̃_i): A_i = softmax_HW(Q_i x̃_iᵀ / √(C/h)), out_i = A_i x̃_i,
    with Q = Z W_Q (d→C, bias) and no projection on the local side. Then the official dynamic gate
    out ⊙ 2·hsigmoid(Z W_α), the output projection W_O (C→d) and Z ← LN(Z + DropPath(out W_O)).
    """

    def __init__(self, channels: int, token_dim: int, num_heads: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.q = nn.Linear(token_dim, channels)
        self.gate = nn.Linear(token_dim, channels)  # official "alpha": 2·hsigmoid(Linear(Z))
        self.proj = nn.Linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> "LeanMobileToFormer":
        """The export-time form (same function, fewer graph nodes); see ``LeanMobileToFormer``."""
        from qbheat.models.mobileformer_lean import LeanMobileToFormer

        return LeanMobileToFormer(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = z.shape[1]
        q = self.q(z).reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # B×h×T×C/h
        k = x.reshape(b, self.num_heads, c // self.num_heads, h * w)  # B×h×C/h×HW (K = V = X)
        attn = ((q @ k) * self.scale).softmax(dim=-1)  # B×h×T×HW
        out = (attn @ k.transpose(-1, -2)).transpose(1, 2).reshape(b, t, c)  # B×T×C
        out = out * (F.hardsigmoid(self.gate(z)) * 2.0)
        return self.norm(z + self.drop_path(self.proj(out)))


class Former(nn.Module):
    """The Former: one post-LN Transformer block on the T global tokens (official ``GlobalBlock``).

    Self-attention with 4 heads, a query projection only (K = V = Z), scale (d/heads)^-½, an output
    Linear d→d; then an FFN d → 2d → d with GELU. Z ← LN(Z + DropPath(attn)); Z ← LN(Z + FFN(Z)).
    """

    def __init__(self, token_dim: int, num_heads: int = 4, ffn_expansion: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (token_dim // num_heads) ** -0.5
        self.q = nn.Linear(token_dim, token_dim)
        self.proj = nn.Linear(token_dim, token_dim)  # official "channel_mlp"
        self.norm = nn.LayerNorm(token_dim)
        self.ffn = nn.Sequential(nn.Linear(token_dim, token_dim * ffn_expansion), nn.GELU(),
                                 nn.Linear(token_dim * ffn_expansion, token_dim))
        self.ffn_norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> "LeanFormer":
        """The export-time form (same function, fewer graph nodes); see ``LeanFormer``."""
        from qbheat.models.mobileformer_lean import LeanFormer

        return LeanFormer(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        q = self.q(z).reshape(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # B×h×T×d/h
        k = z.reshape(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # K = V = Z
        attn = ((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1)  # B×h×T×T
        out = (attn @ k).transpose(1, 2).reshape(b, t, d)
        z = self.norm(z + self.drop_path(self.proj(out)))
        return self.ffn_norm(z + self.ffn(z))


class FormerToMobile(nn.Module):
    """Former→Mobile: every pixel attends to the tokens (official ``Global2Local``, attention form).

    Q = X split channel-wise into h heads (no projection), K = Z W_K, V = Z W_V (d→C, biases on);
    A = softmax over the T tokens of (Q_i K_iᵀ / √(C/h)); X ← X + DropPath([A_i V_i]) with no output
    projection.
    """

    def __init__(self, channels: int, token_dim: int, num_heads: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)  # official "proj"
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> "LeanFormerToMobile":
        """The export-time form (same function, fewer graph nodes); see ``LeanFormerToMobile``."""
        from qbheat.models.mobileformer_lean import LeanFormerToMobile

        return LeanFormerToMobile(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = z.shape[1]
        q = x.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)  # B×h×HW×C/h
        k = self.k(z).reshape(b, t, self.num_heads, c // self.num_heads).permute(0, 2, 3, 1)  # B×h×C/h×T
        v = self.v(z).reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # B×h×T×C/h
        attn = ((q @ k) * self.scale).softmax(dim=-1)  # B×h×HW×T
        out = (attn @ v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.drop_path(out)


# --- the Mobile side --------------------------------------------------------------------------------
class LiteBottleneck(nn.Module):
    """MicroNet's lite bottleneck, the first block: dw3×3 (C → e·C, stride s), BN, ReLU6, pw → C', BN.

    Identity residual when the shapes match. No bridge and no Former: the tokens pass through.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, groups: int = 1):
        super().__init__()
        self.dw = conv_bn(cin, cin * expansion, 3, stride, groups=cin, shuffle=cin if groups > 1 else 1)
        self.pw = conv_bn(cin * expansion, cout, 1, groups=groups)
        self.has_skip = stride == 1 and cin == cout

    def fuse(self) -> "LeanLite":
        """The export-time form: BN folded, the depthwise conv split; see ``LeanLite``."""
        from qbheat.models.mobileformer_lean import LeanLite

        return LeanLite(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.pw(F.relu6(self.dw(x)))
        return (out + x if self.has_skip else out), z


class MobileBottleneck(nn.Module):
    """Mobile sub-block (official ``DnaBlock`` convs): pw1×1 C→eC, BN, DyReLU; dw3×3 (stride s), BN,
    DyReLU; pw1×1 → C', BN (no activation). Both DyReLUs are fed by token 0."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, token_dim: int, groups: int = 1,
                 hyper_reduction: int = 4):
        super().__init__()
        hidden = round(cin * expansion)
        shuffle = groups if groups > 1 else 1
        self.conv_pw = conv_bn(cin, hidden, 1, groups=groups, shuffle=shuffle)
        self.act1 = DynamicReLU(hidden, token_dim, hyper_reduction)
        self.conv_dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.act2 = DynamicReLU(hidden, token_dim, hyper_reduction)
        self.conv_pwl = conv_bn(hidden, cout, 1, groups=groups, shuffle=shuffle)

    def fuse(self) -> "LeanMobile":
        """The export-time form: BN folded, both DyReLUs' coefficients from one MLP; see ``LeanMobile``."""
        from qbheat.models.mobileformer_lean import LeanMobile

        return LeanMobile(self)

    def forward(self, x: torch.Tensor, token0: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv_pw(x), token0)
        x = self.act2(self.conv_dw(x), token0)
        return self.conv_pwl(x)


class MobileDownsample(nn.Module):
    """Downsampling Mobile sub-block (official ``DnaBlock3`` convs), a MobileNet block with an extra
    leading depthwise conv: dw3×3 stride s (C → e1·C), BN, DyReLU; pw → C', BN, kept as r; dw3×3
    (C' → e2·C'), BN, DyReLU; pw → C', BN; out = DropPath(out) + r."""

    def __init__(self, cin: int, cout: int, stride: int, e1: int, e2: int, token_dim: int, groups: int = 1,
                 hyper_reduction: int = 4, drop_path: float = 0.0):
        super().__init__()
        hidden1, hidden2 = round(cin * e1), round(cout * e2)
        self.conv_dw1 = conv_bn(cin, hidden1, 3, stride, groups=cin, shuffle=cin if groups > 1 else 1)
        self.act1 = DynamicReLU(hidden1, token_dim, hyper_reduction)
        self.conv_pw1 = conv_bn(hidden1, cout, 1, groups=groups)
        self.conv_dw2 = conv_bn(cout, hidden2, 3, 1, groups=cout, shuffle=cout if groups > 1 else 1)
        self.act2 = DynamicReLU(hidden2, token_dim, hyper_reduction)
        self.conv_pw2 = conv_bn(hidden2, cout, 1, groups=groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self) -> "LeanMobile":
        """The export-time form: BN folded, both DyReLUs' coefficients from one MLP; see ``LeanMobile``."""
        from qbheat.models.mobileformer_lean import LeanMobile

        return LeanMobile(self)

    def forward(self, x: torch.Tensor, token0: torch.Tensor) -> torch.Tensor:
        r = self.conv_pw1(self.act1(self.conv_dw1(x), token0))
        out = self.conv_pw2(self.act2(self.conv_dw2(r), token0))
        return self.drop_path(out) + r


class MobileFormerBlock(nn.Module):
    """One Mobile-Former block: Mobile→Former on the input, Former, Mobile (DyReLU from token 0 of the
    updated tokens), Former→Mobile on the output.

    Residuals follow the official code: a "mobile" block adds its identity skip *before*
    Former→Mobile (``gbr_before_skip=False``); a "down" block applies Former→Mobile and then its
    (rarely present) identity skip.
    """

    def __init__(self, spec: BlockSpec, cin: int, cfg: MobileFormerConfig, drop_path: float = 0.0):
        super().__init__()
        cout, d = spec.channels, cfg.token_dim
        self.downsample = spec.kind == "down"
        self.mobile_to_former = MobileToFormer(cin, d, cfg.bridge_heads, drop_path)
        self.former = Former(d, cfg.former_heads, cfg.former_ffn_expansion, drop_path)
        if self.downsample:
            self.mobile = MobileDownsample(cin, cout, spec.stride, spec.e1, spec.e2, d, cfg.group_num,
                                           cfg.hyper_reduction, drop_path)
        else:
            self.mobile = MobileBottleneck(cin, cout, spec.stride, spec.e1, d, cfg.group_num, cfg.hyper_reduction)
        self.former_to_mobile = FormerToMobile(cout, d, cfg.bridge_heads, drop_path)
        self.has_skip = spec.stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip and not self.downsample else nn.Identity()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.former(self.mobile_to_former(x, z))  # B×T×d
        out = self.mobile(x, z[:, 0])  # B×C'×H'×W'
        if self.downsample:
            out = self.former_to_mobile(out, z)
            if self.has_skip:
                out = out + x
        else:
            if self.has_skip:
                out = self.drop_path(out) + x
            out = self.former_to_mobile(out, z)
        return out, z


class MergeClassifier(nn.Module):
    """The merge classifier (official ``MergeClassifier``, last_act 'relu', one class token).

    conv1×1 C → 6C (no bias), BN, ReLU6; global average pool; h-swish; concatenate token 0;
    Linear(6C + d → n_f), BN1d, h-swish (the pre-logits); Dropout; Linear(n_f → classes).
    """

    def __init__(self, channels: int, token_dim: int, num_features: int, num_classes: int, expansion: int = 6,
                 groups: int = 1, drop_rate: float = 0.0):
        super().__init__()
        hidden = channels * expansion
        layers: List[nn.Module] = [ChannelShuffle(groups)] if groups > 1 else []
        layers += [nn.Conv2d(channels, hidden, 1, bias=False, groups=groups), nn.BatchNorm2d(hidden)]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden + token_dim, num_features)
        self.fc_norm = nn.BatchNorm1d(num_features)
        self.num_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def fuse(self) -> "LeanMergeClassifier":
        """The export-time form: BN folded into the conv and the FC; see ``LeanMergeClassifier``."""
        from qbheat.models.mobileformer_lean import LeanMergeClassifier

        return LeanMergeClassifier(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.hardswish(F.relu6(self.conv(x)).mean(dim=(2, 3)))  # B×6C
        feats = F.hardswish(self.fc_norm(self.fc(torch.cat([pooled, z[:, 0]], dim=1))))  # B×n_f
        return feats if pre_logits else self.classifier(self.drop(feats))


# --- the model --------------------------------------------------------------------------------------
class MobileFormer(nn.Module):
    """Mobile-Former with timm's model surface.

    ``forward_features(x)`` returns ``(X, Z)``: the local map B×C×H/32×W/32 and the global tokens
    B×T×d after the final Mobile→Former bridge. ``forward_head`` takes that tuple. ``num_features``
    is C (the map's channels); ``head_hidden_size`` is the merge classifier's width, which is what
    ``num_classes=0`` returns.
    """

    def __init__(self, cfg: MobileFormerConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: Optional[float] = None, global_pool: str = "avg"):
        super().__init__()
        cfg.validate()
        if global_pool not in ("avg", ""):
            raise QBHeatError(f"Mobile-Former's merge classifier average-pools; global_pool={global_pool!r} is not supported.")
        dpr = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        if dpr != cfg.drop_path_rate:
            cfg = replace(cfg, drop_path_rate=dpr)
        self.cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.tokens = nn.Parameter(torch.randn(cfg.token_num, cfg.token_dim))  # T×d, learned global priors
        self.stem = nn.Sequential(nn.Conv2d(in_chans, cfg.stem_chs, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(cfg.stem_chs), nn.ReLU6(inplace=True))

        blocks: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        self._feature_blocks: List[int] = []
        cin, stride, n = cfg.stem_chs, 2, len(cfg.blocks)
        for i, spec in enumerate(cfg.blocks):
            if spec.kind == "lite":
                blocks.append(LiteBottleneck(cin, spec.channels, spec.stride, spec.e1, cfg.group_num))
            else:
                # Official drop-path schedule: rate·(i+1)/n for block i, on both the token and CNN paths.
                blocks.append(MobileFormerBlock(spec, cin, cfg, dpr * (i + 1) / n))
            stride *= spec.stride
            cin = spec.channels
            last_at_stride = i == n - 1 or cfg.blocks[i + 1].stride > 1
            if last_at_stride:
                self.feature_info.append(dict(num_chs=cin, reduction=stride, module=f"blocks.{i}"))
                self._feature_blocks.append(i)
        self.blocks = nn.ModuleList(blocks)
        self.mobile_to_former = MobileToFormer(cin, cfg.token_dim, cfg.bridge_heads, dpr)  # final bridge

        self.num_features = cin
        self.head_hidden_size = cfg.head_features
        self.head = MergeClassifier(cin, cfg.token_dim, cfg.head_features, num_classes, cfg.head_expansion,
                                    cfg.group_num, drop_rate)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """Official init: conv N(0, √(2/(k²·C_out))), BN γ=1 β=0, Linear N(0, 0.01) with zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    # --- timm surface -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # the official recipe decays the 2-D token embedding (timm skips only 1-D params)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem|^tokens", blocks=[(r"^blocks\.(\d+)", None), (r"^mobile_to_former", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self.head, "classifier", self.head)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, **kwargs: Any) -> None:
        self.num_classes = num_classes
        if hasattr(self.head, "classifier"):
            self.head.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                nn.init.normal_(self.head.classifier.weight, 0.0, 0.01)
                nn.init.zeros_(self.head.classifier.bias)

    def fuse(self) -> "MobileFormer":
        """Rewrite the model, in place, into its lean export-time form and return it.

        Every sub-module with a ``fuse()`` is replaced by its lean equivalent (what timm's
        ``reparameterize_model`` does; that function reaches the same modules when it walks a model
        that holds this one). Inference only: BN running statistics are folded, drop-path and dropout
        are gone, and the lean modules have no training form. Outputs equal the original's up to
        float rounding (tests check ≤ 1e-5 relative).
        """
        fuse_modules(self)
        return self

    def initial_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The learned tokens repeated over the batch, B×T×d (a copy, not a view: a view of a leaf made
        under ``no_grad`` would claim ``requires_grad`` without a grad_fn, which trips FlopCounterMode)."""
        return self.tokens.unsqueeze(0).repeat(x.shape[0], 1, 1)

    def _run_block(self, i: int, x: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, z, use_reentrant=False)
        return self.blocks[i](x, z)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.initial_tokens(x)  # B×T×d
        x = self.stem(x)  # B×stem×H/2×W/2
        for i in range(len(self.blocks)):
            x, z = self._run_block(i, x, z)
        return x, self.mobile_to_former(x, z)  # B×C×H/32×W/32, B×T×d

    def forward_head(self, x: Tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        fmap, z = x
        if isinstance(self.head, nn.Identity):
            raise QBHeatError("this Mobile-Former was pruned to a feature extractor and has no head; "
                              "create it without features_only to classify.")
        return self.head(fmap, z, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]]:
        """Local maps at the ``feature_info`` levels (timm's contract; ``indices`` index feature_info:
        last n levels if int, all if None, else those listed).

        Without ``intermediates_only`` the first item is ``forward_features``' (X, Z). ``norm`` is
        accepted for timm's API and has no effect (Mobile-Former has no final norm on the map).
        """
        if output_fmt != "NCHW":
            raise QBHeatError(f"Mobile-Former gives NCHW feature maps only, not {output_fmt!r}; pass output_fmt='NCHW'.")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        take_blocks = {self._feature_blocks[i] for i in take}
        last_block = self._feature_blocks[max_index] if stop_early else len(self.blocks) - 1
        intermediates: List[torch.Tensor] = []
        z = self.initial_tokens(x)
        x = self.stem(x)
        for i in range(last_block + 1):
            x, z = self._run_block(i, x, z)
            if i in take_blocks:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if last_block == len(self.blocks) - 1:
            z = self.mobile_to_former(x, z)
        return (x, z), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop blocks after the last wanted level, and the head, as timm's feature getter expects."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        last_block = self._feature_blocks[max_index]
        if last_block < len(self.blocks) - 1:
            self.blocks = self.blocks[:last_block + 1]
            self.mobile_to_former = nn.Identity()
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or last_block < len(self.blocks) - 1:
            self.head = nn.Identity()
            self.num_classes = 0
        return take



def fuse_modules(model: nn.Module, kinds: Optional[Tuple[type, ...]] = None) -> nn.Module:
    """Replace, in place, every sub-module that has ``fuse()`` (only those of ``kinds`` if given) by its
    lean form. ``kinds`` lets a benchmark apply the rewrites one family at a time."""
    for name, child in model.named_children():
        if hasattr(child, "fuse") and not isinstance(child, MobileFormer) and (kinds is None or isinstance(child, kinds)):
            setattr(model, name, child.fuse())
        else:
            fuse_modules(child, kinds)
    return model


# --- registry -----------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Pre-processing that travels with the model (official ``_cfg``). No URL: qbheat never downloads."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (1, 1),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0", "classifier": "head.classifier",
        "paper_ids": "arXiv:2108.05895",
        "paper_name": "Mobile-Former: Bridging MobileNet and Transformer",
        "origin_url": "https://github.com/AAboys/MobileFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in MOBILEFORMER_CONFIGS if name != "mobileformer_micro"},
    # 64 px Fashion-MNIST (grey images repeated to 3 channels); ImageNet statistics kept so that the
    # same normalisation serves natural images, as for every other config.
    "mobileformer_micro": _cfg(input_size=(3, 64, 64), num_classes=10, crop_pct=1.0),
})


def _create_mobileformer(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    if pretrained:
        raise QBHeatError("Mobile-Former has no downloadable weights in qbheat; pass a local checkpoint instead of pretrained=True.")
    cfg = MOBILEFORMER_CONFIGS[variant]
    stride, levels = 2, []
    for b in cfg.blocks:
        stride *= b.stride
        levels.append(stride)
    reductions = sorted(set(levels))
    detection = tuple(reductions.index(s) for s in (8, 16, 32) if s in reductions)
    return build_model_with_cfg(
        MobileFormer, variant, pretrained,
        model_cfg=cfg,
        feature_cfg=dict(feature_cls="getter", out_indices=detection),
        **kwargs,
    )


@register_model
def mobileformer_508m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-508M (official): 14.0 M params, 508 M FLOPs, 79.3 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_508m", pretrained, **kwargs)


@register_model
def mobileformer_294m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-294M (official): 11.4 M params, 294 M FLOPs, 77.9 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_294m", pretrained, **kwargs)


@register_model
def mobileformer_214m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-214M (official): 9.4 M params, 214 M FLOPs, 76.7 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_214m", pretrained, **kwargs)


@register_model
def mobileformer_151m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-151M (official): 7.6 M params, 151 M FLOPs, 75.2 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_151m", pretrained, **kwargs)


@register_model
def mobileformer_96m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-96M (official): 4.6 M params, 96 M FLOPs, 72.8 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_96m", pretrained, **kwargs)


@register_model
def mobileformer_52m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-52M (official): 3.5 M params, 52 M FLOPs, 68.7 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_52m", pretrained, **kwargs)


@register_model
def mobileformer_26m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-26M (official): the 52M layout with grouped 1×1 convs (4 groups) and channel
    shuffles; 3.2 M params, 26 M FLOPs, 64.0 % ImageNet top-1."""
    return _create_mobileformer("mobileformer_26m", pretrained, **kwargs)


@register_model
def mobileformer_qbheat_285m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Our stand-in for QB-Heat's encoder, "Mobile-Former, 5.8 M params, 285 M FLOPs" (not public).

    This is the MF-294M architecture under a second name (weights are interchangeable with
    ``mobileformer_294m``); use it headless (``num_classes=0``) as the QB-Heat encoder.

    How it was chosen (reference section B.5; measured here with FlopCounterMode, convs and matmuls
    only, MACs at 224²): no public config has both figures.
      * MF-294M: 286.7 M MACs with its classifier, 271.4 M headless, i.e. the published compute within
        3–5 %; but 11.4 M params with the classifier and 6.69 M headless (15 % above 5.8 M).
      * MF-214M headless has 5.82 M params (the 5.8 M exactly) but 197 M MACs (31 % short).
      * The 294M layout with 6×168 tokens would fit both numbers (≈ 5.8 M, ≈ 270 M MACs), but no
        Mobile-Former config uses d = 168: that is a curve fit, not evidence.
    Compute is what QB-Heat's comparisons hold fixed, and MF-294M is a published, ImageNet-validated
    design, so this is the closest defensible choice. Its parameter count differs from the paper's;
    results with it must say so (open item in reference section D.1).
    """
    return _create_mobileformer("mobileformer_qbheat_285m", pretrained, **kwargs)


@register_model
def mobileformer_micro(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Our small Mobile-Former for 32–64 px images (Fashion-MNIST at 64 px; the quickstart model).

    Not a published config: the MF-52M pattern (stem 8, lite bottleneck at stride 2, 3 tokens) with
    one block per stage after the downsampling block and 96-d tokens, so that the stride-8/16/32
    levels exist at 64 px (8×8, 4×4, 2×2). 1.27 M params with its 10-class head (0.86 M without the
    merge classifier), 4.5 M MACs at 64². Defaults to 10 classes and 64 px input.
    """
    return _create_mobileformer("mobileformer_micro", pretrained, **kwargs)


def config_dict(name: str) -> Dict[str, Any]:
    """The architecture of a registered Mobile-Former as plain values (for model cards and reports)."""
    if name not in MOBILEFORMER_CONFIGS:
        raise QBHeatError(f"unknown Mobile-Former config {name!r}; choose one of {sorted(MOBILEFORMER_CONFIGS)}.")
    return asdict(MOBILEFORMER_CONFIGS[name])
