"""The light detector: an FCOS-style anchor-free head on frozen stride-8/16/32 features.

FCOS (Tian et al., ICCV 2019; "FCOS: A simple and strong anchor-free object detector", TPAMI 2020 for
centre sampling and centerness on the box branch), with in-graph box decoding and an export-friendly
fixed-size NMS. Registered as head type ``detector`` in ``qbheat.heads``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbheat.errors import QBHeatError


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
