"""Deployable heads on a frozen backbone (``export.deployable.DeployableModel`` chains backbone and head).

One registry, ``HEAD_CLASSES``, maps a head type to a small ``nn.Module`` built from plain keyword
arguments, so that a checkpoint can store a trained head as ``{"type", "kwargs", "state"}``
(``head_spec`` / ``head_from_spec``) and export can rebuild it without pickled code.

Every head says which view of the backbone it reads (``head.consumes``); ``head_inputs`` computes
that view once, so a probe trainer can cache it and export's ``DeployableModel`` can chain the two:

    "pooled"      B×D  global average of the last feature map, concatenated with global token 0
                       when the backbone has tokens (Mobile-Former).           ← default
    "embedding"   B×D  the backbone's own pre-logits: ``forward_head(forward_features(x), pre_logits=True)``
    "spatial"     (map B×C×h×w, tokens B×T×d | None) from ``qbheat.models.spatial_features``
    "multiscale"  [B×C_l×H/s×W/s for s in strides] from ``qbheat.models.multiscale_features``

Choice (ours): classifiers and the features head default to "pooled", not "embedding". QB-Heat
pre-trains only ``forward_features``; the layers behind ``forward_head`` (MobileNetV3's 1280-wide
``conv_head``, Mobile-Former's 1920-wide projection) stay at their random initialisation after
QB-Heat, so probing their output would measure a random projection. MoCo-v2 in this repository
trains ``backbone(x)`` (= "embedding"); pass ``pool="embedding"`` to probe exactly that.

Heads:
  ``linear``             BN-free linear classifier (MAE/MoCo linear probes add a BatchNorm without
                         affine; we leave it out so that the exported graph is one Gemm).
  ``transformer_probe``  QB-Heat's non-linear probe: "a transformer block before the linear
                         classifier". The block's details are not published; ours is one pre-norm
                         ViT block over the flattened last map (plus Mobile-Former's tokens).
  ``detector``           a light FCOS-style anchor-free head on frozen stride-8/16/32 features,
                         with in-graph decoding and an export-friendly fixed-size NMS.
  ``features``           no parameters: the pooled embedding itself.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from qbheat.errors import QBHeatError

__all__ = [
    "HEAD_CLASSES",
    "CONSUMES",
    "register_head",
    "create_head",
    "build_head",
    "head_spec",
    "head_from_spec",
    "head_inputs",
    "LinearHead",
    "TransformerProbe",
    "FeaturesHead",
    "DetectorHead",
    "fcos_points",
    "decode_boxes",
    "box_iou_pairwise",
    "cluster_nms_keep",
    "sigmoid_focal_loss",
    "giou_loss",
]

HEAD_CLASSES: dict[str, type[nn.Module]] = {}
CONSUMES = ("pooled", "embedding", "spatial", "multiscale")


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEAD_CLASSES:
            raise ValueError(f"head {name!r} registered twice")
        cls.head_type = name
        HEAD_CLASSES[name] = cls
        return cls

    return deco


def create_head(type: str, **kwargs: Any) -> nn.Module:  # noqa: A002  (the checkpoint key is "type")
    """Build a head of a registered type from plain keyword arguments."""
    if type not in HEAD_CLASSES:
        raise QBHeatError(f"unknown head type {type!r}; choose one of {sorted(HEAD_CLASSES)}.")
    try:
        return HEAD_CLASSES[type](**kwargs)
    except TypeError as e:
        raise QBHeatError(f"head {type!r} cannot be built from {sorted(kwargs)} ({e}).") from None


def head_spec(head: nn.Module) -> dict[str, Any]:
    """``{"type", "kwargs", "state"}``: what a probe/detector checkpoint stores under ``head``."""
    return {"type": head.head_type, "kwargs": dict(head.kwargs),
            "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}


def head_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a head from ``head_spec`` output and load its weights strictly."""
    if not isinstance(spec, dict) or not {"type", "kwargs", "state"} <= set(spec):
        raise QBHeatError("the checkpoint's head entry lacks 'type', 'kwargs' or 'state'; re-save it with qbheat.heads.head_spec.")
    head = create_head(spec["type"], **dict(spec["kwargs"]))
    try:
        head.load_state_dict(spec["state"], strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise QBHeatError(f"the checkpoint's {spec['type']!r} head weights do not fit its kwargs ({lines[-1].strip()[:160]}).") from None
    return head


# ----------------------------------------------------------------------------------------------
# What a head reads from the backbone
# ----------------------------------------------------------------------------------------------

def head_inputs(backbone: nn.Module, x: torch.Tensor, consumes: str, strides: tuple[int, ...] = (8, 16, 32)):
    """The view of ``backbone`` on ``x`` that a head with ``head.consumes == consumes`` takes."""
    from qbheat.models import multiscale_features, spatial_features

    if consumes == "pooled":
        fmap, tokens = spatial_features(backbone, x)
        pooled = fmap.mean(dim=(2, 3))  # B×C
        return pooled if tokens is None else torch.cat([pooled, tokens[:, 0]], dim=1)  # B×(C+d)
    if consumes == "embedding":
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)  # B×D
    if consumes == "spatial":
        return spatial_features(backbone, x)
    if consumes == "multiscale":
        return list(multiscale_features(backbone, x, tuple(strides)))
    raise ValueError(f"unknown feature view {consumes!r}; one of {CONSUMES}")


@torch.no_grad()
def _probe_dims(backbone: nn.Module, consumes: str, image_size: int, strides=(8, 16, 32)) -> dict[str, Any]:
    was_training = backbone.training
    backbone.eval()
    try:
        out = head_inputs(backbone, torch.zeros(1, 3, image_size, image_size), consumes, strides)
    finally:
        backbone.train(was_training)
    if consumes in ("pooled", "embedding"):
        return {"in_features": int(out.shape[1])}
    if consumes == "spatial":
        fmap, tokens = out
        return {"in_channels": int(fmap.shape[1]), "token_dim": 0 if tokens is None else int(tokens.shape[2])}
    return {"in_channels": [int(f.shape[1]) for f in out]}


def build_head(type: str, backbone: nn.Module, *, image_size: int = 224, **kwargs: Any) -> nn.Module:  # noqa: A002
    """Create a head whose input widths are measured on ``backbone`` (one dry run at ``image_size``)."""
    if type not in HEAD_CLASSES:
        raise QBHeatError(f"unknown head type {type!r}; choose one of {sorted(HEAD_CLASSES)}.")
    cls = HEAD_CLASSES[type]
    consumes = cls.consumes_for(kwargs)
    dims = _probe_dims(backbone, consumes, image_size, tuple(kwargs.get("strides", (8, 16, 32))))
    return create_head(type, **{**dims, **kwargs})


def _check_pool(pool: str) -> str:
    if pool not in ("pooled", "embedding"):
        raise QBHeatError(f"pool must be 'pooled' or 'embedding', not {pool!r}.")
    return pool


# ----------------------------------------------------------------------------------------------
# Classifier heads
# ----------------------------------------------------------------------------------------------

@register_head("linear")
class LinearHead(nn.Module):
    """BN-free linear classifier on a pooled feature vector: logits = W·f + b (B×num_classes)."""

    task = "classifier"

    def __init__(self, in_features: int, num_classes: int, pool: str = "pooled"):
        super().__init__()
        self.kwargs = {"in_features": int(in_features), "num_classes": int(num_classes), "pool": _check_pool(pool)}
        self.consumes = pool
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # MAE linear probe init
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def consumes_for(kwargs: dict[str, Any]) -> str:
        return _check_pool(kwargs.get("pool", "pooled"))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class _Attention(nn.Module):
    """Multi-head self-attention written with plain matmuls (exports to every format, FP16-guardable)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise QBHeatError(f"probe width {dim} is not divisible by its {num_heads} heads.")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B×heads×N×hd
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # B×heads×N×N (scale q first: smaller FP16 range)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    """Pre-norm transformer block (ViT): x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_head("transformer_probe")
class TransformerProbe(nn.Module):
    """QB-Heat's non-linear probe: one transformer block, then a linear classifier.

    Tokens: the last feature map flattened to h·w tokens (B×hw×C) projected to ``width``, plus the
    backbone's global tokens (B×T×d, Mobile-Former) projected to ``width``, plus one class token.
    A learned type embedding tells map tokens from global tokens; there is no positional embedding
    (ours: it would tie the probe to one input size, and the map tokens are pooled anyway).
    Output: LayerNorm then linear on the class token (``pool="cls"``) or the token mean (``"mean"``).
    """

    task = "classifier"
    consumes = "spatial"

    def __init__(self, in_channels: int, num_classes: int, token_dim: int = 0, width: int = 256,
                 num_heads: int = 4, mlp_ratio: float = 2.0, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise QBHeatError(f"transformer_probe pool must be 'cls' or 'mean', not {pool!r}.")
        self.kwargs = {"in_channels": int(in_channels), "num_classes": int(num_classes), "token_dim": int(token_dim),
                       "width": int(width), "num_heads": int(num_heads), "mlp_ratio": float(mlp_ratio), "pool": pool}
        self.num_classes, self.pool = int(num_classes), pool
        self.map_proj = nn.Linear(in_channels, width)
        self.token_proj = nn.Linear(token_dim, width) if token_dim else None
        self.type_embed = nn.Parameter(torch.zeros(2, width))  # [map token, global token]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.block = _Block(width, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def consumes_for(kwargs: dict[str, Any]) -> str:
        return "spatial"

    def forward(self, spatial: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        fmap, tokens = spatial
        b = fmap.shape[0]
        seq = [self.cls_token.expand(b, -1, -1), self.map_proj(fmap.flatten(2).transpose(1, 2)) + self.type_embed[0]]
        if self.token_proj is not None:
            if tokens is None:
                raise QBHeatError("this transformer_probe was built for a backbone with global tokens, but got none.")
            seq.append(self.token_proj(tokens) + self.type_embed[1])
        x = self.block(torch.cat(seq, dim=1))  # B×(1+hw+T)×width
        x = self.norm(x)
        return self.fc(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1))


@register_head("features")
class FeaturesHead(nn.Module):
    """No parameters: the pooled embedding (``pool`` as for ``linear``) is the output."""

    task = "features"

    def __init__(self, in_features: int = 0, pool: str = "pooled"):
        super().__init__()
        self.kwargs = {"in_features": int(in_features), "pool": _check_pool(pool)}
        self.consumes = pool

    @staticmethod
    def consumes_for(kwargs: dict[str, Any]) -> str:
        return _check_pool(kwargs.get("pool", "pooled"))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled


# The detector (FCOS-style, ``qbheat.fcos``) registers here, so that the registry knows every head.
from qbheat.fcos import (  # noqa: E402
    DetectorHead,
    box_iou_pairwise,
    cluster_nms_keep,
    decode_boxes,
    fcos_points,
    giou_loss,
    sigmoid_focal_loss,
)

register_head("detector")(DetectorHead)
