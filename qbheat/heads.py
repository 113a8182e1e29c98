"""Deployable heads on a frozen backbone, and ``DeployableModel``: backbone + head as one module.

One registry, ``HEAD_CLASSES``, maps a head type to a small ``nn.Module`` built from plain keyword
arguments, so that a checkpoint can store a trained head as ``{"type", "kwargs", "state"}``
(``head_spec`` / ``head_from_spec``) and export can rebuild it without pickled code.

Every head says which view of the backbone it reads (``head.consumes``); ``head_inputs`` computes
that view once, so a probe trainer can cache it and ``DeployableModel`` can chain the two:

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

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    "DeployableModel",
    "VARIANTS",
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


# ----------------------------------------------------------------------------------------------
# Detector: FCOS-style anchor-free head (Tian et al., ICCV 2019; "FCOS: A simple and strong
# anchor-free object detector", TPAMI 2020 for centre sampling and centerness on the box branch)
# ----------------------------------------------------------------------------------------------

def fcos_points(shapes: list[tuple[int, int]], strides: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of every feature cell in input pixels, level after level, row-major: N×2 (x, y).

    FCOS maps cell (i, j) at stride s to (j·s + s/2, i·s + s/2).
    """
    pts = []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return torch.cat(pts, dim=0)


def decode_boxes(points: torch.Tensor, ltrb: torch.Tensor, height, width) -> torch.Tensor:
    """Distances (l, t, r, b) from each point → boxes x1y1x2y2 in pixels, clipped to the image.

    points N×2, ltrb B×N×4 → B×N×4. No data-dependent control flow.
    """
    x, y = points[:, 0], points[:, 1]
    x1 = (x - ltrb[..., 0]).clamp(min=0.0, max=float(width))
    y1 = (y - ltrb[..., 1]).clamp(min=0.0, max=float(height))
    x2 = (x + ltrb[..., 2]).clamp(min=0.0, max=float(width))
    y2 = (y + ltrb[..., 3]).clamp(min=0.0, max=float(height))
    return torch.stack([x1, y1, x2, y2], dim=-1)


def box_iou_pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` (…×M×4) with every box in ``b`` (…×K×4) → …×M×K (xyxy)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-6)


def cluster_nms_keep(boxes: torch.Tensor, iterations: int, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS as a fixed number of matrix steps (Cluster-NMS; Zheng et al., "Enhancing Geometric
    Factors in Model Learning and Inference for Object Detection and Instance Segmentation", 2021).

    ``boxes``: B×M×4 sorted by decreasing score. Returns a float keep mask B×M (1 = kept).
    Each step keeps box i unless a box ranked above it that is *currently kept* overlaps it by more
    than ``iou_threshold``. The fixed point of this iteration is exactly greedy NMS; it is reached
    after at most as many steps as the longest chain "a suppresses b, whose suppression frees c, …"
    (``iterations`` ≥ M is always exact; real detections need a handful — the step count is ours).
    """
    iou = box_iou_pairwise(boxes, boxes)  # B×M×M
    upper = torch.triu(iou, diagonal=1)  # [j, i]: overlap of higher-ranked j with lower-ranked i
    over = (upper > iou_threshold).to(boxes.dtype)
    keep = torch.ones(boxes.shape[:2], dtype=boxes.dtype, device=boxes.device)  # B×M
    for _ in range(iterations):
        suppressed = (over * keep.unsqueeze(2)).amax(dim=1)  # B×M: some kept j above i overlaps i
        keep = 1.0 - suppressed
    return keep


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017, Eq. 5) summed over all elements; targets are 0/1 floats."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − GIoU (Rezatofighi et al., 2019) per box pair, boxes N×4 xyxy → N."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = (area_p + area_t - inter).clamp(min=1e-6)
    iou = inter / union
    enclose = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0).prod(dim=1)
    return 1 - (iou - (enclose - union) / enclose.clamp(min=1e-6))


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _tower(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(min(8, width), width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@register_head("detector")
class DetectorHead(nn.Module):
    """Light FCOS-style detector on frozen multi-scale features (strides 8/16/32 by default).

    Per level a 1×1 lateral conv brings C_l channels to ``width``; two towers shared by all levels
    (``tower_depth`` × [3×3 conv, GroupNorm, ReLU], FCOS uses 4 at width 256 — ours is lighter)
    feed the class logits (K), the box distances (l, t, r, b) and the centerness (on the box
    tower, as in FCOS v2). Distances are ``softplus(scale_l · x) · stride``: non-negative like
    FCOS's ``relu(scale·x)·stride`` but never stuck at 0 and, unlike ``exp``, safe in FP16 (ours).

    ``forward`` gives the raw per-point outputs; ``decode`` turns them into boxes (xyxy pixels)
    and scores √(σ(cls)·σ(ctr)) (FCOS inference); ``nms`` selects fixed-size detections.
    """

    task = "detector"
    consumes = "multiscale"

    def __init__(self, in_channels: list[int], num_classes: int, strides: tuple[int, ...] = (8, 16, 32),
                 width: int = 64, tower_depth: int = 2, prior_prob: float = 0.01,
                 size_ranges: tuple[float, ...] = (64.0, 128.0), center_radius: float = 1.5,
                 score_threshold: float = 0.05, iou_threshold: float = 0.6, pre_nms_topk: int = 200,
                 max_detections: int = 50, nms_iterations: int = 12):
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], tuple(int(s) for s in strides)
        if len(in_channels) != len(strides):
            raise QBHeatError(f"detector has {len(in_channels)} input levels but {len(strides)} strides.")
        if len(size_ranges) != len(strides) - 1:
            raise QBHeatError(f"detector needs {len(strides) - 1} size_ranges boundaries for {len(strides)} levels.")
        self.kwargs = {"in_channels": in_channels, "num_classes": int(num_classes), "strides": list(strides),
                       "width": int(width), "tower_depth": int(tower_depth), "prior_prob": float(prior_prob),
                       "size_ranges": [float(r) for r in size_ranges], "center_radius": float(center_radius),
                       "score_threshold": float(score_threshold), "iou_threshold": float(iou_threshold),
                       "pre_nms_topk": int(pre_nms_topk), "max_detections": int(max_detections),
                       "nms_iterations": int(nms_iterations)}
        self.num_classes, self.strides = int(num_classes), strides
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.cls_tower, self.box_tower = _tower(width, tower_depth), _tower(width, tower_depth)
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))  # RetinaNet prior
        bounds = [0.0, *[float(r) for r in size_ranges], float("inf")]
        self.register_buffer("_size_bounds", torch.tensor(bounds), persistent=False)

    @staticmethod
    def consumes_for(kwargs: dict[str, Any]) -> str:
        return "multiscale"

    def forward(self, feats: list[torch.Tensor]) -> dict[str, Any]:
        """Raw outputs: cls B×N×K logits, ltrb B×N×4 pixels, ctr B×N logits, plus level ``shapes``."""
        cls, box, ctr, shapes = [], [], [], []
        for lvl, f in enumerate(feats):
            x = self.lateral[lvl](f)
            b, _, h, w = x.shape
            shapes.append((h, w))
            c, r = self.cls_tower(x), self.box_tower(x)
            cls.append(self.cls_logits(c).flatten(2).transpose(1, 2))  # B×hw×K
            ltrb = F.softplus(self.scales[lvl](self.box_pred(r))) * self.strides[lvl]
            box.append(ltrb.flatten(2).transpose(1, 2))  # B×hw×4
            ctr.append(self.centerness(r).flatten(2).squeeze(1))  # B×hw
        return {"cls": torch.cat(cls, 1), "ltrb": torch.cat(box, 1), "ctr": torch.cat(ctr, 1), "shapes": shapes}

    def points(self, raw: dict[str, Any]) -> torch.Tensor:
        return fcos_points(raw["shapes"], self.strides, raw["ltrb"].device, raw["ltrb"].dtype)

    def decode(self, raw: dict[str, Any], height, width) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes B×N×4 (xyxy, input pixels, clipped) and per-class scores B×N×K = √(σ(cls)·σ(ctr))."""
        boxes = decode_boxes(self.points(raw), raw["ltrb"], height, width)
        scores = torch.sqrt(torch.sigmoid(raw["cls"]) * torch.sigmoid(raw["ctr"]).unsqueeze(2))
        return boxes, scores

    def nms(self, boxes: torch.Tensor, scores: torch.Tensor, height, width):
        """Class-aware NMS with fixed shapes: boxes B×D×4, scores B×D, labels B×D (int64), count B (int64).

        Top ``pre_nms_topk`` (class, point) pairs by score; boxes of different classes are moved
        apart by ``label × (max(H, W) + 1)`` so that one IoU matrix does per-class NMS (the
        ``batched_nms`` offset trick); ``cluster_nms_keep`` suppresses; the best ``max_detections``
        survivors above ``score_threshold`` are returned, padded with score 0, box 0, label −1.
        """
        b, n, k = scores.shape
        m = min(self.kwargs["pre_nms_topk"], n * k)
        top_scores, idx = scores.reshape(b, n * k).topk(m, dim=1)  # B×M, sorted
        # Gather from per-(point, class) copies rather than dividing idx by K: integer division
        # becomes a float op in some converters (Core ML) and then cannot index.
        pair_boxes = boxes.unsqueeze(2).expand(b, n, k, 4).reshape(b, n * k, 4)
        pair_labels = torch.arange(k, device=idx.device).repeat(n).unsqueeze(0).expand(b, n * k)
        cand = torch.gather(pair_boxes, 1, idx.unsqueeze(2).expand(b, m, 4))  # B×M×4
        labels = torch.gather(pair_labels, 1, idx)  # B×M
        offset = (labels.to(boxes.dtype) * (max(float(height), float(width)) + 1.0)).unsqueeze(2)
        keep = cluster_nms_keep(cand + offset, self.kwargs["nms_iterations"], self.kwargs["iou_threshold"])
        valid = keep * (top_scores > self.kwargs["score_threshold"]).to(scores.dtype)
        kept_scores = top_scores * valid
        d = min(self.kwargs["max_detections"], m)
        out_scores, sel = kept_scores.topk(d, dim=1)  # B×D
        out_valid = torch.gather(valid, 1, sel)
        out_boxes = torch.gather(cand, 1, sel.unsqueeze(2).expand(b, d, 4)) * out_valid.unsqueeze(2)
        out_labels = torch.where(out_valid > 0, torch.gather(labels, 1, sel), torch.full_like(sel, -1))
        count = out_valid.sum(dim=1).to(torch.int64)
        return out_boxes, out_scores, out_labels, count

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, raw: dict[str, Any], gt: list[dict[str, torch.Tensor]]):
        """FCOS assignment per point: class target B×N×K (0/1), box target B×N×4 (xyxy), positive mask B×N.

        A point is positive for a ground-truth box if it lies within ``center_radius``·stride of the
        box centre (centre sampling) and inside the box, and the box's largest distance max(l,t,r,b)
        falls in the level's size range; among several, the smallest box wins.
        """
        points = self.points(raw)  # N×2
        n = points.shape[0]
        level_stride = torch.cat([torch.full((h * w,), float(s)) for (h, w), s in zip(raw["shapes"], self.strides)]).to(points)
        level = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(raw["shapes"])]).to(points.device)
        lo, hi = self._size_bounds[level], self._size_bounds[level + 1]
        b = len(gt)
        cls_t = torch.zeros(b, n, self.num_classes, device=points.device)
        box_t = torch.zeros(b, n, 4, device=points.device)
        pos = torch.zeros(b, n, dtype=torch.bool, device=points.device)
        for i, t in enumerate(gt):
            gb, gl = t["boxes"].to(points), t["labels"].long().to(points.device)
            if gb.numel() == 0:
                continue
            x, y = points[:, 0:1], points[:, 1:2]  # N×1
            ltrb = torch.stack([x - gb[:, 0], y - gb[:, 1], gb[:, 2] - x, gb[:, 3] - y], dim=2)  # N×G×4
            inside = ltrb.amin(dim=2) > 0
            cx, cy = (gb[:, 0] + gb[:, 2]) / 2, (gb[:, 1] + gb[:, 3]) / 2
            r = self.kwargs["center_radius"] * level_stride[:, None]
            near = ((x - cx).abs() < r) & ((y - cy).abs() < r)
            extent = ltrb.amax(dim=2)
            in_range = (extent >= lo[:, None]) & (extent <= hi[:, None])
            ok = inside & near & in_range  # N×G
            area = ((gb[:, 2] - gb[:, 0]) * (gb[:, 3] - gb[:, 1]))[None].expand(n, -1)
            area = torch.where(ok, area, torch.full_like(area, float("inf")))
            best_area, best = area.min(dim=1)
            p = torch.isfinite(best_area)
            pos[i] = p
            box_t[i] = gb[best]
            cls_t[i, p, gl[best[p]]] = 1.0
        return cls_t, box_t, pos

    def loss(self, raw: dict[str, Any], gt: list[dict[str, torch.Tensor]], height, width) -> dict[str, torch.Tensor]:
        """FCOS loss: focal (classification) + GIoU (boxes, weighted by centerness target) + centerness BCE.

        ``gt``: one dict per image with ``boxes`` G×4 (xyxy pixels) and ``labels`` G. Normalised by
        the number of positives (≥ 1) as in FCOS; GIoU by the sum of centerness targets (FCOS v2).
        """
        cls_t, box_t, pos = self.targets(raw, gt)
        num_pos = max(float(pos.sum()), 1.0)
        loss_cls = sigmoid_focal_loss(raw["cls"], cls_t) / num_pos
        points = self.points(raw)
        if pos.any():
            pts = points.unsqueeze(0).expand(pos.shape[0], -1, -1)[pos]  # P×2
            tb = box_t[pos]
            t_ltrb = torch.stack([pts[:, 0] - tb[:, 0], pts[:, 1] - tb[:, 1], tb[:, 2] - pts[:, 0], tb[:, 3] - pts[:, 1]], 1)
            lr, tbm = t_ltrb[:, [0, 2]], t_ltrb[:, [1, 3]]
            ctr_t = torch.sqrt((lr.amin(1) / lr.amax(1).clamp(min=1e-6)) * (tbm.amin(1) / tbm.amax(1).clamp(min=1e-6)))
            pred_boxes = decode_boxes(points, raw["ltrb"], float("inf"), float("inf"))[pos]
            loss_box = (giou_loss(pred_boxes, tb) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
            loss_ctr = F.binary_cross_entropy_with_logits(raw["ctr"][pos], ctr_t, reduction="sum") / num_pos
        else:
            loss_box = raw["ltrb"].sum() * 0.0
            loss_ctr = raw["ctr"].sum() * 0.0
        return {"loss": loss_cls + loss_box + loss_ctr, "loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr,
                "num_pos": torch.tensor(num_pos)}


# ----------------------------------------------------------------------------------------------
# Backbone + head, as one exportable module
# ----------------------------------------------------------------------------------------------

VARIANTS = {
    "classifier": {"logits": ("logits",), "probabilities": ("probabilities",)},
    "features": {"embedding": ("embedding",)},
    "detector": {"decode": ("boxes", "scores"), "nms": ("boxes", "scores", "labels", "num_detections")},
}


class DeployableModel(nn.Module):
    """Frozen backbone + head with named outputs: the module that export converts.

    Input: a normalised image batch B×3×H×W (mean/std applied). Outputs (a tuple, names in
    ``output_names``) by head task and ``variant``:

        classifier  "logits"        logits B×K
                    "probabilities" softmax(logits) B×K (what Core ML's ClassifierConfig expects)
        features    "embedding"     embedding B×D
        detector    "decode"        boxes B×N×4 (xyxy input pixels), scores B×N×K (every point, every class)
                    "nms"           boxes B×D×4, scores B×D, labels B×D (int64, −1 = padding), num_detections B
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, variant: str | None = None):
        super().__init__()
        task = getattr(head, "task", None)
        if task not in VARIANTS:
            raise QBHeatError(f"{type(head).__name__} is not a qbheat head (task {task!r}).")
        variant = variant or next(iter(VARIANTS[task]))
        if variant not in VARIANTS[task]:
            raise QBHeatError(f"a {task} head has the variants {sorted(VARIANTS[task])}, not {variant!r}.")
        self.backbone, self.head, self.task, self.variant = backbone, head, task, variant
        self.output_names = VARIANTS[task][variant]
        self.strides = tuple(getattr(head, "strides", (8, 16, 32)))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DeployableModel":
        # Frozen by construction: BatchNorm statistics and dropout never switch to training here.
        return super().train(False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image  # B×3×H×W, normalised; the argument's name is the exported input's name
        feats = head_inputs(self.backbone, x, self.head.consumes, self.strides)
        if self.task == "classifier":
            logits = self.head(feats)
            return (logits.softmax(dim=-1),) if self.variant == "probabilities" else (logits,)
        if self.task == "features":
            return (self.head(feats),)
        height, width = x.shape[-2], x.shape[-1]
        raw = self.head(feats)
        boxes, scores = self.head.decode(raw, height, width)
        if self.variant == "decode":
            return boxes, scores
        return self.head.nms(boxes, scores, height, width)
