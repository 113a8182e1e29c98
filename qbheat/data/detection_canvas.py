"""A detection set with real object appearance: Fashion-MNIST items placed on canvases, in COCO format.

Each canvas is a deterministic function of (seed, split, index): a dark, slightly noisy background
with 1–4 Fashion-MNIST items, each resized to a random side length and pasted at a random position
(pixel-wise maximum, so an item's black surround never hides a neighbour). An item's box is the
tight box of its visible pixels (grey level > ``ink_threshold``) in canvas coordinates, so boxes are
never degenerate and always lie inside the image. Placements whose box overlaps an earlier box by
more than ``max_iou`` are redrawn (up to 50 tries; the item is dropped after that, but a canvas
always keeps its first item).

Splits take items from the matching Fashion-MNIST split: ``train`` from training images
0–49,999, ``val`` from training images 50,000–59,999 (a held-out split for choosing detector
settings), ``test`` from the 10,000 test images. The layout of canvas i does not depend on how many
canvases are made, so a bigger set extends a smaller one.

``write_coco(root, split, n)`` writes ``root/<split>/<id>.png`` (8-bit grey) and
``root/annotations/instances_<split>.json`` (COCO: images, annotations with ``bbox`` = [x, y, w, h],
``area``, ``iscrowd``, categories 1–10 named after the Fashion-MNIST classes), atomically: the split
is built in a temporary folder and renamed into place. All the numbers below are our choices.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbheat.errors import QBHeatError

SPLITS = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}
_SPLIT_SALT = {"train": 11, "val": 23, "test": 37}


@dataclass
class CanvasConfig:
    """How canvases are drawn (all choices of ours)."""

    canvas_size: int = 96  # px, square; 3 strides of 8/16/32 give 12/6/3 cells
    min_items: int = 1
    max_items: int = 4
    min_item_size: int = 24  # px side of a pasted (square) item; Fashion-MNIST is 28 px
    max_item_size: int = 56
    max_iou: float = 0.2  # redraw a placement that overlaps an earlier box more than this
    noise_std: float = 6.0  # grey levels of background noise
    ink_threshold: int = 24  # a pixel above this grey level belongs to the item's box
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.canvas_size < 16:
            out.append(f"canvas_size must be ≥ 16, not {self.canvas_size}")
        if not 1 <= self.min_items <= self.max_items:
            out.append(f"items must satisfy 1 ≤ min_items ≤ max_items, not {self.min_items}..{self.max_items}")
        if not 8 <= self.min_item_size <= self.max_item_size <= self.canvas_size:
            out.append("item sizes must satisfy 8 ≤ min_item_size ≤ max_item_size ≤ canvas_size")
        if not 0 <= self.max_iou <= 1:
            out.append(f"max_iou must lie in [0, 1], not {self.max_iou}")
        return out

    def validate(self) -> "CanvasConfig":
        bad = self.problems()
        if bad:
            raise QBHeatError(f"canvas config: {bad[0]}.")
        return self


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR), dtype=np.uint8)


class CanvasGenerator:
    """``gen.canvas(split, i)`` → (image H×W uint8, boxes K×4 float [x, y, w, h], labels K int64 in 0..9)."""

    def __init__(self, config: CanvasConfig | None = None):
        from qbheat.data import fashion_mnist

        self.config = (config or CanvasConfig()).validate()
        self._fm = fashion_mnist
        self.classes = list(fashion_mnist.CLASSES)

    def canvas(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise QBHeatError(f"canvas split must be one of {list(SPLITS)}, not {split!r}.")
        c = self.config
        fm_split, lo, hi = SPLITS[split]
        images, labels = self._fm.load(fm_split)
        rng = np.random.default_rng([c.seed, _SPLIT_SALT[split], index])
        s = c.canvas_size
        canvas = np.clip(rng.normal(0.0, c.noise_std, (s, s)), 0, 255)  # H×W float
        boxes: list[tuple[float, float, float, float]] = []
        cats: list[int] = []
        for k in range(int(rng.integers(c.min_items, c.max_items + 1))):
            j = int(rng.integers(lo, hi))
            for _ in range(50):
                size = int(rng.integers(c.min_item_size, c.max_item_size + 1))
                x0, y0 = int(rng.integers(0, s - size + 1)), int(rng.integers(0, s - size + 1))
                item = _resize(np.asarray(images[j]), size)  # size×size
                ys, xs = np.nonzero(item > c.ink_threshold)
                if len(xs) == 0:
                    continue
                box = (float(x0 + xs.min()), float(y0 + ys.min()),
                       float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
                if box[2] < 2 or box[3] < 2:
                    continue
                if all(_iou(box, b) <= c.max_iou for b in boxes):
                    canvas[y0:y0 + size, x0:x0 + size] = np.maximum(canvas[y0:y0 + size, x0:x0 + size], item)
                    boxes.append(box)
                    cats.append(int(labels[j]))
                    break
        return (np.round(canvas).astype(np.uint8), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(cats, dtype=np.int64))

    def coco_header(self, split: str) -> dict[str, Any]:
        """COCO ``info`` and ``categories`` (ids 1–10 = Fashion-MNIST classes 0–9), no images yet."""
        return {
            "info": {"description": f"Fashion-MNIST canvases, split {split}", "generator": "qbheat.data.detection_canvas",
                     "config": asdict(self.config)},
            "images": [], "annotations": [],
            "categories": [{"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(self.classes)],
        }


def _add_image(coco: dict[str, Any], i: int, shape: tuple[int, ...], boxes: np.ndarray, cats: np.ndarray) -> None:
    """Append canvas i (image id i + 1, file ``<i:06d>.png``) and its boxes to a COCO dict."""
    coco["images"].append({"id": i + 1, "file_name": f"{i:06d}.png", "height": int(shape[0]), "width": int(shape[1])})
    for box, cat in zip(boxes.tolist(), cats.tolist()):
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": cat + 1,
                                    "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2),
                                    "iscrowd": 0})


def write_coco(root: str | os.PathLike, split: str, n: int, config: CanvasConfig | None = None, *,
               progress: bool = False) -> Path:
    """Write ``n`` canvases of ``split`` under ``root`` in COCO layout; return the annotation file's path.

    Images go to ``root/<split>/`` and annotations to ``root/annotations/instances_<split>.json``.
    An existing split with the same config and size is left as it is (the generator is deterministic).
    """
    from PIL import Image
    from tqdm import tqdm

    if n < 1:
        raise QBHeatError(f"a canvas split needs at least one image, not {n}.")
    root = Path(root)
    ann_path = root / "annotations" / f"instances_{split}.json"
    gen = CanvasGenerator(config)
    if ann_path.is_file() and (root / split).is_dir():
        try:
            old = json.loads(ann_path.read_text())
            if old["info"]["config"] == asdict(gen.config) and len(old["images"]) == n:
                return ann_path
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=root))
    try:
        coco = gen.coco_header(split)
        for i in tqdm(range(n), desc=f"canvases {split}", disable=not progress):
            image, boxes, cats = gen.canvas(split, i)
            Image.fromarray(image, mode="L").save(tmp / f"{i:06d}.png")
            _add_image(coco, i, image.shape, boxes, cats)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        ann_tmp = ann_path.with_name(f".{ann_path.name}.tmp")
        ann_tmp.write_text(json.dumps(coco))
        final = root / split
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        os.replace(ann_tmp, ann_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ann_path
