"""Preprocessing and postprocessing as a deployed app does them, for the end-to-end timing.

Preprocessing follows the model card's ``preprocessing`` block (timm's eval transform): decode the
image (PIL), convert to RGB, resize the short side to ``H / crop_pct``, centre-crop H×W, scale
pixels by ``pixel_scale`` (1/255), normalise with ``mean``/``std``, lay out NCHW float32.
Postprocessing for a classifier is softmax + top-k; for embeddings an L2 normalisation; detector
outputs are passed through (their decode lives with the detector head). numpy and PIL only.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from ._errors import QBHeatError

IMAGENET = {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear", "crop_pct": 0.875, "color": "RGB", "pixel_scale": 1 / 255, "layout": "NCHW"}


def _pixel_scale(value: Any) -> float:
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/")
        return float(num) / float(den)
    return float(value)


def decode_and_crop(image: bytes | np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """JPEG/PNG bytes (or an H×W×3 uint8 array) → the centre crop, H×W×3 uint8."""
    try:
        from PIL import Image
    except ImportError:
        raise QBHeatError("end-to-end timing decodes images with Pillow; install it (pip install pillow) or pass --no-e2e.") from None
    img = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else Image.fromarray(image)
    img = img.convert("RGB")
    _, h, w = prep["input_size"]
    crop_pct = float(prep.get("crop_pct") or 1.0)
    short = int(math.floor(min(h, w) / crop_pct))
    iw, ih = img.size
    scale = short / min(iw, ih)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        str(prep.get("interpolation", "bilinear")).lower(), Image.BILINEAR)
    img = img.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), resample)
    iw, ih = img.size
    left, top = (iw - w) // 2, (ih - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)


def normalize(crop: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """H×W×3 (or N×H×W×3) uint8 → N×3×H×W float32, normalised."""
    x = crop.astype(np.float32) * np.float32(_pixel_scale(prep.get("pixel_scale", 1 / 255)))
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    x = np.moveaxis(x, -1, -3)
    return np.ascontiguousarray(x[None] if x.ndim == 3 else x)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def postprocess(outputs: dict[str, np.ndarray], head_type: str, labels: list[str] | None = None, k: int = 5) -> list[Any]:
    """What an app does with the outputs: top-k (label, probability) per image for a classifier."""
    first = next(iter(outputs.values()))
    if head_type == "classifier":
        probs = softmax(first.reshape(first.shape[0], -1).astype(np.float32))
        k = min(k, probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        return [[(labels[j] if labels and j < len(labels) else int(j), float(p[j])) for j in row] for p, row in zip(probs, top)]
    if head_type == "features":
        flat = first.reshape(first.shape[0], -1)
        return list(flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12))
    return [outputs]
