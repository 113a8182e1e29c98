"""HSSL: the base model learns from a heterogeneous auxiliary head, taught by a momentum teacher.

Li, Yin, Liu, Liu, Cheng, "Enhancing Representations through Heterogeneous Self-Supervised
Learning", TPAMI 2025 (arXiv 2310.05108). Facts and evidence tags are in
``/work/shared/reference/other_seeds.md`` §2; the loss follows the authors' code (Jittor port of
their iBOT-based ``main_hssl.py``), written here from that description:

- [P] An auxiliary head whose architecture differs from the base sits on the base's last feature
  map: a **transformer head on a CNN / Mobile-Former base**, a **convolutional (ConvNeXt) head on a
  transformer base**. It is dropped after pre-training, so the deployed backbone is unchanged.
- [P-code] Depth 3; the first head block has **no identity shortcut** (it "enlarges the
  discrepancy"); the head's pooled output is global average pooling followed by LayerNorm.
- [P-code] Separate 3-layer projection MLPs (hidden 2048, bottleneck 256, GELU, ℓ2-normalised
  output) for base and head, one shared weight-normalised prototype layer (8192 outputs, gain 1).
- [P-code] The teacher is an EMA of every student part, head included (momentum 0.996 → 1,
  cosine). Its **auxiliary head's** output, centred and sharpened (DINO: τ_t 0.04 → 0.07 over half
  the schedule, centre momentum 0.9), is the target of both the student's base (L_base: the base
  learns from the heterogeneous head) and the student's head (L_aux: the head itself is trained by
  the same objective); τ_s = 0.1. L_HSSL = ½ (L_base + L_aux).

How it composes with QB-Heat and MoCo-v2 (our design; the paper's general recipe for other
methods was not retrieved): HSSL is an **additive term**, switched on by ``hssl.enabled``
(``qbheat pretrain --hssl``): ``loss = method_loss + weight · L_HSSL``. The method keeps its own
loss (QB-Heat's reconstruction, MoCo-v2's InfoNCE), as iBOT keeps its MIM loss in the authors'
code, and HSSL replaces nothing. Per online view the method hands over its encoder output
(``out["features"]``), its pooled embedding (``out["embeddings"]``) and the input its teacher
should encode (``out["target_inputs"]``): for MoCo-v2 the key view (cross-view, as DINO pairs
q ≠ v), for QB-Heat the same visible quarter (it has one view; a choice that keeps the teacher
cheap). HSSL keeps its own EMA teacher backbone, also with MoCo-v2 (whose key encoder follows its
own momentum), and encodes with ``method.features`` so the teacher reads the same level as the
student. Not implemented: the head search (§2.6) and freezing the prototypes early in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qbheat import distributed
from qbheat.additions import register_addition
from qbheat.errors import QBHeatError
from qbheat.methods._momentum import momentum_at, momentum_copy, momentum_update_

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

AUXILIARY_HEADS = ("auto", "transformer", "conv")
MOMENTUM_SCHEDULES = ("constant", "cosine")


@dataclass
class HSSLConfig:
    """HSSL options; defaults from the authors' code (docs/HSSL.md recipe) unless marked."""

    enabled: bool = False  # add the HSSL term to the method's loss
    head: str = "auto"  # "auto": transformer head on a CNN / Mobile-Former base, conv head on a transformer
    depth: int = 3  # --auxiliary_depth 3
    dim: int | None = None  # transformer-head width; None: the base's channels (choice; the conv head keeps them)
    num_heads: int | None = None  # None: about one head per 64 channels (choice)
    mlp_ratio: float = 4.0  # ConvNeXt / ViT blocks
    kernel_size: int = 7  # ConvNeXt depthwise kernel
    first_block_shortcut: bool = False  # the authors' head has none in its first block
    hidden_dim: int = 2048  # projection MLP
    bottleneck_dim: int = 256
    out_dim: int = 8192  # shared prototypes
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    teacher_temperature_warmup: float = 0.5  # share of training: 50 of 100 epochs in the recipe
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA, rising to 1 along a half cosine
    momentum_schedule: str = "cosine"
    weight: float = 1.0  # λ on ½ (L_base + L_aux) (the authors: λ1 = λ2 = 1)

    def problems(self) -> list[str]:
        out = []
        if self.head not in AUXILIARY_HEADS:
            out.append(f"hssl.head must be one of {list(AUXILIARY_HEADS)}, not {self.head!r}")
        if self.depth < 1:
            out.append(f"hssl.depth must be ≥ 1, not {self.depth}")
        if (self.dim is not None and self.dim < 1) or (self.num_heads is not None and self.num_heads < 1):
            out.append("hssl.dim and hssl.num_heads must be positive or null")
        if self.dim is not None and self.num_heads is not None and self.dim % self.num_heads:
            out.append(f"hssl.dim ({self.dim}) must be a multiple of hssl.num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            out.append("hssl.mlp_ratio must be positive and hssl.kernel_size an odd number ≥ 1")
        if min(self.hidden_dim, self.bottleneck_dim, self.out_dim) < 1:
            out.append("hssl.hidden_dim, hssl.bottleneck_dim and hssl.out_dim must be positive")
        if min(self.student_temperature, self.teacher_temperature, self.warmup_teacher_temperature) <= 0:
            out.append("hssl temperatures must be positive")
        if not 0 <= self.teacher_temperature_warmup <= 1:
            out.append(f"hssl.teacher_temperature_warmup must lie in [0, 1], not {self.teacher_temperature_warmup}")
        if not 0 <= self.center_momentum <= 1 or not 0 <= self.momentum <= 1:
            out.append("hssl.center_momentum and hssl.momentum must lie in [0, 1]")
        if self.momentum_schedule not in MOMENTUM_SCHEDULES:
            out.append(f"hssl.momentum_schedule must be one of {list(MOMENTUM_SCHEDULES)}")
        if self.weight < 0:
            out.append(f"hssl.weight must be ≥ 0, not {self.weight}")
        return out


# ---------------------------------------------------------------------------------------------
# Loss as pure functions (DINO's self-distillation, as HSSL's code uses it).
# ---------------------------------------------------------------------------------------------

def teacher_temperature_at(progress: float, warmup_temperature: float, temperature: float, warmup: float) -> float:
    """τ_t: linear from ``warmup_temperature`` to ``temperature`` over the first ``warmup`` of training."""
    if warmup <= 0 or progress >= warmup:
        return temperature
    return warmup_temperature + (temperature - warmup_temperature) * max(progress, 0.0) / warmup


def teacher_distribution(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centred, sharpened teacher targets: softmax((t − c) / τ_t), B×K (DINO)."""
    return F.softmax((logits.float() - center.float()) / temperature, dim=-1)


def distillation_loss(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy −Σ_k P_t,k log softmax(s / τ_s)_k, mean over the batch."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Heads.
# ---------------------------------------------------------------------------------------------

class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN x), then + MLP(LN ·). ``shortcut=False`` drops the
    identity around the attention (our reading of the authors' shortcut-free first block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, shortcut: bool = True):
        super().__init__()
        self.num_heads, self.shortcut = num_heads, shortcut
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # B×N×D tokens
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = x + y if self.shortcut else y
        return x + self.mlp(self.norm2(x))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block as in the authors' head: depthwise k×k → LN → Linear 4C → GELU → Linear C,
    plus the identity unless ``shortcut=False`` (no layer scale, no drop path)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # B×C×h×w
        return x + y if self.shortcut else y


class TransformerAuxHead(nn.Module):
    """Auxiliary head for a CNN / Mobile-Former base: the map's cells as tokens → ``depth`` blocks →
    LayerNorm of their average. No position embedding (a choice: the map size follows the input)."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, first_shortcut: bool):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        self.blocks = nn.ModuleList([AttentionBlock(dim, num_heads, mlp_ratio, shortcut=i > 0 or first_shortcut)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.embed(fmap.flatten(2).transpose(1, 2))  # B×hw×D
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x.mean(dim=1))  # B×D


class ConvAuxHead(nn.Module):
    """Auxiliary head for a transformer base: patch tokens as a map → ``depth`` ConvNeXt blocks →
    LayerNorm of the global average (the authors' ``norm2`` on the pooled "CLS")."""

    def __init__(self, dim: int, depth: int, kernel_size: int, mlp_ratio: float, first_shortcut: bool):
        super().__init__()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, kernel_size, mlp_ratio, shortcut=i > 0 or first_shortcut)
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(fmap).mean(dim=(2, 3)))  # B×C


class ProjectionHead(nn.Module):
    """HSSL's (iBOT's) projection MLP: Linear → GELU → Linear → GELU → Linear(bottleneck), ℓ2-normalised."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x).float(), dim=-1)


class Prototypes(nn.Module):
    """Weight-normalised Linear(bottleneck → K, no bias) with the gain fixed at 1 (``norm_last_layer``):
    cosine similarities to K learned prototypes."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), F.normalize(self.weight.float(), dim=1))  # B×K


# ---------------------------------------------------------------------------------------------
# Encoder outputs → feature maps.
# ---------------------------------------------------------------------------------------------

def as_feature_map(features: Any, num_prefix_tokens: int = 0) -> tuple[torch.Tensor, str]:
    """(B×C×h×w map, "cnn" | "transformer") from an encoder output.

    A B×C×h×w map (CNN) or a (map, tokens) pair (Mobile-Former) is a CNN output; B×N×C tokens
    (ViT) are a transformer's, whose patch tokens (after ``num_prefix_tokens``) must form a square grid.
    """
    if isinstance(features, (tuple, list)):
        features = features[0]
    if features.ndim == 4:
        return features, "cnn"
    if features.ndim == 3:
        patches = features[:, num_prefix_tokens:]
        b, n, c = patches.shape
        side = math.isqrt(n)
        if side * side != n:
            raise QBHeatError(f"HSSL needs a square grid of patch tokens, got {n}; use square images.")
        return patches.transpose(1, 2).reshape(b, c, side, side), "transformer"
    raise QBHeatError(f"HSSL cannot read an encoder output of shape {tuple(features.shape)}; it needs a map or tokens.")


def _heads_for(dim: int) -> int:
    target = max(1, round(dim / 64))
    return next(h for h in range(target, 0, -1) if dim % h == 0)


# ---------------------------------------------------------------------------------------------
# The additive HSSL term.
# ---------------------------------------------------------------------------------------------

@register_addition("hssl", kind="head")  # switched on by ``hssl.enabled``
class HSSL(nn.Module):
    """HSSL's auxiliary head, projections, prototypes and EMA teacher around a method (see module doc).

    ``forward(out)`` reads ``out["features"]``, ``out["embeddings"]`` and ``out["target_inputs"]``
    and returns {"loss" (weighted), "base", "aux" (unweighted CE terms), "teacher_temperature"}.
    State that resumes: the teacher, ``center`` and ``progress`` (buffers).
    """

    Config = HSSLConfig
    center: torch.Tensor
    progress: torch.Tensor

    def __init__(self, cfg: HSSLConfig, method: nn.Module, image_size: int):
        super().__init__()
        bad = cfg.problems()
        if bad:
            raise QBHeatError(bad[0] + ".")
        self.cfg = cfg
        backbone = method.backbone
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        channels, self.base_kind = self._probe(method, image_size)
        self.head_kind = cfg.head if cfg.head != "auto" else ("transformer" if self.base_kind == "cnn" else "conv")
        if self.head_kind == "transformer":
            dim = cfg.dim or channels
            heads = cfg.num_heads or _heads_for(dim)
            if dim % heads:
                raise QBHeatError(f"hssl.num_heads {heads} does not divide the head width {dim}; set hssl.dim or hssl.num_heads.")
            self.aux_head: nn.Module = TransformerAuxHead(channels, dim, cfg.depth, heads, cfg.mlp_ratio, cfg.first_block_shortcut)
        else:
            self.aux_head = ConvAuxHead(channels, cfg.depth, cfg.kernel_size, cfg.mlp_ratio, cfg.first_block_shortcut)
        self.base_projector = ProjectionHead(int(method.embedding_dim), cfg.hidden_dim, cfg.bottleneck_dim)
        self.aux_projector = ProjectionHead(self.aux_head.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.prototypes = Prototypes(cfg.bottleneck_dim, cfg.out_dim)  # shared by base and head
        # the teacher: an EMA of the student backbone and of everything on the auxiliary path
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_aux_head = momentum_copy(self.aux_head)
        self.teacher_aux_projector = momentum_copy(self.aux_projector)
        self.teacher_prototypes = momentum_copy(self.prototypes)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        # Not submodules: the method owns them (a tuple keeps nn.Module from registering them).
        self._online = (backbone, method.features)
        self.momentum = cfg.momentum

    @classmethod
    def from_config(cls, config: "PretrainConfig", method: nn.Module) -> "HSSL":
        return cls(config.hssl, method, config.image_size)

    @staticmethod
    @torch.no_grad()
    def _probe(method: nn.Module, image_size: int) -> tuple[int, str]:
        """Channels and kind of the encoder output the head will read, from one tiny forward pass."""
        size = method.encoder_input_size(image_size)
        backbone = method.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            feats, _ = method.features(torch.zeros(1, 3, size, size), backbone)
        finally:
            backbone.train(was_training)
        fmap, kind = as_feature_map(feats, int(getattr(backbone, "num_prefix_tokens", 0) or 0))
        return int(fmap.shape[1]), kind

    def _map(self, features: Any) -> torch.Tensor:
        return as_feature_map(features, self.num_prefix_tokens)[0]

    def teacher_temperature(self) -> float:
        c = self.cfg
        return teacher_temperature_at(float(self.progress), c.warmup_teacher_temperature, c.teacher_temperature,
                                      c.teacher_temperature_warmup)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's auxiliary-head prototype scores B×K for encoder input ``x``."""
        feats, _ = self._online[1](x, self.teacher_backbone)
        return self.teacher_prototypes(self.teacher_aux_projector(self.teacher_aux_head(self._map(feats)))).float()

    def forward(self, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        c, tau_t = self.cfg, self.teacher_temperature()
        loss_base = loss_aux = 0.0
        seen = []
        views = list(zip(out["features"], out["embeddings"], out["target_inputs"]))
        for feats, pooled, x_t in views:
            t_logits = self.teacher_logits(x_t)  # B×K
            seen.append(t_logits)
            targets = teacher_distribution(t_logits, self.center, tau_t)
            s_base = self.prototypes(self.base_projector(pooled))  # the base learns from the teacher's head
            s_aux = self.prototypes(self.aux_projector(self.aux_head(self._map(feats))))
            loss_base = loss_base + distillation_loss(targets, s_base, c.student_temperature)
            loss_aux = loss_aux + distillation_loss(targets, s_aux, c.student_temperature)
        loss_base, loss_aux = loss_base / len(views), loss_aux / len(views)
        if self.training:
            self._update_center(torch.cat(seen))
        return {"loss": c.weight * 0.5 * (loss_base + loss_aux), "base": loss_base.detach(), "aux": loss_aux.detach(),
                "teacher_temperature": torch.tensor(tau_t)}

    @torch.no_grad()
    def _update_center(self, logits: torch.Tensor) -> None:
        """c ← m c + (1 − m) · mean of the teacher scores over the global batch (DINO)."""
        batch_center = distributed.all_reduce_mean(logits.mean(dim=0, keepdim=True))
        self.center.mul_(self.cfg.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.cfg.center_momentum)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA update of the teacher (backbone and auxiliary path), after the optimizer step."""
        self.progress.fill_(progress)
        self.momentum = momentum_at(self.cfg.momentum, progress, self.cfg.momentum_schedule)
        momentum_update_(self.teacher_backbone, self._online[0], self.momentum)
        momentum_update_(self.teacher_aux_head, self.aux_head, self.momentum)
        momentum_update_(self.teacher_aux_projector, self.aux_projector, self.momentum)
        momentum_update_(self.teacher_prototypes, self.prototypes, self.momentum)
