"""Frozen-backbone object detection: train the light ``detector`` head, score it with COCO mAP.

[paper] QB-Heat's detection claim (+7.9 AP over MoCo-v2) keeps the backbone frozen; the detector,
data set and schedule are not published (reference §C). Here (our choices):

- Data: a COCO-format set (``qbheat.data.detection_canvas`` writes Fashion-MNIST canvases in that
  layout): ``root/annotations/instances_<split>.json`` and ``root/<split>/<file_name>``.
- Features: the backbone's stride-8/16/32 maps (``qbheat.heads.head_inputs(..., "multiscale")``),
  extracted once in eval mode (BatchNorm frozen) and cached: there is no augmentation, so every
  epoch sees the same features.
- Head: ``qbheat.heads.DetectorHead`` (FCOS-style, anchor-free) with its size ranges scaled to the
  image (``size_ranges`` = image side × (1/6, 1/3): 16 and 32 px at 96 px, where FCOS uses 64/128
  at 800 px). AdamW, cosine schedule with a one-epoch warm-up, batch 32.
- The learning rate is chosen among ``lrs`` by mAP on the ``val`` split; the test split is scored
  once with the chosen head.
- Score: COCO bbox mAP@[.5:.95] (and AP50, AP75) from pycocotools on the head's own in-graph
  decoding and NMS, i.e. exactly what export ships.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qbheat.errors import QBHeatError
from qbheat.evaluation.features import ProbePreprocessing, as_uint8_chw


@dataclass
class DetectionConfig:
    """Detector training settings (ours)."""

    strides: tuple[int, ...] = (8, 16, 32)
    width: int = 64  # detector tower width (qbheat.heads default)
    tower_depth: int = 2
    size_ranges_frac: tuple[float, float] = (1 / 6, 1 / 3)  # × image side: FCOS's level boundaries, rescaled
    lrs: tuple[float, ...] = (1e-3, 3e-3)  # AdamW learning rates tried on the val split
    weight_decay: float = 1e-4
    epochs: int = 12
    batch_size: int = 32
    seed: int = 0


@dataclass
class CocoSplit:
    """A COCO detection split in memory: uint8 images N×H×W(×3), xyxy boxes and 0-based labels per image."""

    images: np.ndarray
    boxes: list[torch.Tensor]  # per image G×4, xyxy pixels
    labels: list[torch.Tensor]  # per image G, 0-based (category index in ``categories``)
    image_ids: list[int]
    categories: list[dict[str, Any]]  # COCO categories, in label order
    coco: dict[str, Any]  # the annotation dict (for pycocotools)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]


def load_coco_split(root: str | Path, split: str, limit: int | None = None) -> CocoSplit:
    """Read ``root/annotations/instances_<split>.json`` and its images (the first ``limit`` images if given)."""
    from PIL import Image

    root = Path(root)
    ann_path = root / "annotations" / f"instances_{split}.json"
    if not ann_path.is_file():
        raise QBHeatError(f"no COCO annotations at {ann_path}; write a canvas set with 'qbheat detect make-data' or point --data at a COCO folder.")
    try:
        coco = json.loads(ann_path.read_text())
        imgs, anns, cats = coco["images"], coco["annotations"], sorted(coco["categories"], key=lambda c: c["id"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise QBHeatError(f"{ann_path} is not a COCO annotation file (needs images, annotations, categories).") from None
    if limit is not None:
        imgs = imgs[:limit]
        keep = {im["id"] for im in imgs}
        anns = [a for a in anns if a["image_id"] in keep]
        coco = {**coco, "images": imgs, "annotations": anns}
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in imgs}
    for a in anns:
        if not a.get("iscrowd", 0):
            per_image[a["image_id"]].append(a)
    images, boxes, labels = [], [], []
    for im in imgs:
        path = root / split / im["file_name"]
        if not path.is_file():
            raise QBHeatError(f"image {path} named in {ann_path} is missing.")
        arr = np.asarray(Image.open(path).convert("RGB"))
        images.append(arr)
        b = torch.tensor([a["bbox"] for a in per_image[im["id"]]], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]  # xywh → xyxy
        boxes.append(b)
        labels.append(torch.tensor([cat_index[a["category_id"]] for a in per_image[im["id"]]], dtype=torch.long))
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise QBHeatError(f"images in {root / split} differ in size {sorted(shapes)[:3]}; the detector here needs one size.")
    return CocoSplit(np.stack(images), boxes, labels, [im["id"] for im in imgs], cats, coco)


# ---------------------------------------------------------------------------------------------
# COCO evaluation
# ---------------------------------------------------------------------------------------------

def coco_map(coco_gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO bbox metrics of ``detections`` ([{image_id, category_id, bbox: xywh, score}]) against ``coco_gt``.

    Returns {"mAP": AP@[.5:.95], "AP50", "AP75"} in 0–1 (pycocotools' COCOeval; its printout is swallowed).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: v for k, v in coco_gt.items() if k in ("images", "annotations", "categories", "info")}
        gt.dataset.setdefault("info", {})
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = [im["id"] for im in coco_gt["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"mAP": max(0.0, float(s[0])), "AP50": max(0.0, float(s[1])), "AP75": max(0.0, float(s[2]))}


# ---------------------------------------------------------------------------------------------
# Frozen multi-scale features, detector training and inference
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_multiscale(backbone: nn.Module, images: np.ndarray, preprocessing: ProbePreprocessing,
                       strides: tuple[int, ...] = (8, 16, 32), batch_size: int = 128, progress: bool = True,
                       desc: str = "multiscale features") -> list[torch.Tensor]:
    """Frozen stride-s maps of every image (eval mode), one N×C_l×H/s×W/s tensor per level."""
    from tqdm import tqdm

    from qbheat.heads import head_inputs

    x_all = as_uint8_chw(images)
    was_training = backbone.training
    backbone.eval()
    levels: list[list[torch.Tensor]] = [[] for _ in strides]
    try:
        for start in tqdm(range(0, len(x_all), batch_size), desc=desc, disable=not progress, leave=False):
            feats = head_inputs(backbone, preprocessing(x_all[start:start + batch_size]), "multiscale", tuple(strides))
            for lvl, f in enumerate(feats):
                levels[lvl].append(f.float().cpu())
    finally:
        backbone.train(was_training)
    return [torch.cat(lv) for lv in levels]


def _scale_boxes(boxes: list[torch.Tensor], sx: float, sy: float) -> list[torch.Tensor]:
    s = torch.tensor([sx, sy, sx, sy])
    return [b * s for b in boxes]


def build_detector(feats: list[torch.Tensor], num_classes: int, image_size: int, cfg: DetectionConfig) -> nn.Module:
    from qbheat.heads import create_head

    lo, hi = cfg.size_ranges_frac
    return create_head("detector", in_channels=[int(f.shape[1]) for f in feats], num_classes=num_classes,
                       strides=tuple(cfg.strides), width=cfg.width, tower_depth=cfg.tower_depth,
                       size_ranges=(round(lo * image_size, 2), round(hi * image_size, 2)))


def train_detector(feats: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int,
                   image_size: int, cfg: DetectionConfig, lr: float, progress: bool = False) -> nn.Module:
    """Train a fresh detector head on cached features; ``boxes`` are xyxy in input-image pixels."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    head = build_detector(feats, num_classes, image_size, cfg)
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    n = feats[0].shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    g = torch.Generator().manual_seed(cfg.seed)
    head.train()
    for _ in tqdm(range(cfg.epochs), desc=f"detector lr={lr:g}", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            raw = head([f[idx] for f in feats])
            gt = [{"boxes": boxes[j], "labels": labels[j]} for j in idx.tolist()]
            loss = head.loss(raw, gt, image_size, image_size)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 10.0)
            opt.step()
            sched.step()
    head.eval()
    return head


@torch.no_grad()
def detect(head: nn.Module, feats: list[torch.Tensor], image_size: int, batch_size: int = 256):
    """Per image (boxes D×4 xyxy, scores D, labels D) after the head's decoding and NMS (padding removed)."""
    head.eval()
    out = []
    for i in range(0, feats[0].shape[0], batch_size):
        raw = head([f[i:i + batch_size] for f in feats])
        boxes, scores = head.decode(raw, image_size, image_size)
        b, s, l, c = head.nms(boxes, scores, image_size, image_size)
        for j in range(b.shape[0]):
            k = int(c[j])
            out.append((b[j, :k], s[j, :k], l[j, :k]))
    return out


def to_coco_detections(dets, image_ids: list[int], categories: list[dict[str, Any]], scale: tuple[float, float]):
    """COCO result entries from ``detect`` output; ``scale`` maps input pixels back to original image pixels."""
    sx, sy = scale
    res = []
    for (b, s, l), image_id in zip(dets, image_ids):
        for box, score, lab in zip(b.tolist(), s.tolist(), l.tolist()):
            x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            res.append({"image_id": image_id, "category_id": categories[lab]["id"],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return res


@dataclass
class DetectionResult:
    head: nn.Module
    lr: float
    val: dict[str, float]
    grid: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        return {"lr": self.lr, "val": self.val, "test": self.test, "grid": self.grid, "head_kwargs": dict(self.head.kwargs)}


def evaluate_detector(head: nn.Module, feats: list[torch.Tensor], split: CocoSplit, image_size: int) -> dict[str, float]:
    """COCO metrics of ``head`` on one split's cached features."""
    h, w = split.images.shape[1:3]
    dets = detect(head, feats, image_size)
    return coco_map(split.coco, to_coco_detections(dets, split.image_ids, split.categories, (w / image_size, h / image_size)))


def run_detection(backbone: nn.Module, train: CocoSplit, val: CocoSplit, test: CocoSplit | None,
                  preprocessing: ProbePreprocessing, cfg: DetectionConfig | None = None, progress: bool = True) -> DetectionResult:
    """Cache frozen features of each split, train one head per lr, choose by val mAP, score test once."""
    cfg = cfg or DetectionConfig()
    size = preprocessing.input_size[1]
    if preprocessing.input_size[1] != preprocessing.input_size[2] or preprocessing.crop_pct != 1.0:
        raise QBHeatError("detection needs a square input size and crop_pct 1.0 (boxes are rescaled, not cropped).")
    num_classes = len(train.categories)

    def feats_and_boxes(split: CocoSplit, name: str):
        h, w = split.images.shape[1:3]
        f = extract_multiscale(backbone, split.images, ProbePreprocessing(**{**preprocessing.__dict__}), cfg.strides,
                               progress=progress, desc=f"{name} features")
        return f, _scale_boxes(split.boxes, size / w, size / h)

    f_train, b_train = feats_and_boxes(train, "train")
    f_val, _ = feats_and_boxes(val, "val")
    best, grid = None, []
    for lr in cfg.lrs:
        head = train_detector(f_train, b_train, train.labels, num_classes, size, cfg, lr, progress)
        m = evaluate_detector(head, f_val, val, size)
        grid.append({"lr": lr, **{f"val_{k}": v for k, v in m.items()}})
        if best is None or m["mAP"] > best[2]["mAP"]:
            best = (head, lr, m)
    result = DetectionResult(best[0], best[1], best[2], grid)
    if test is not None:
        f_test, _ = feats_and_boxes(test, "test")
        result.test = evaluate_detector(result.head, f_test, test, size)
    return result
