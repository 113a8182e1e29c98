"""The ``preprocessing`` block: how an image becomes the model's input, for probes, export and devices.

timm's eval transform: convert to RGB, resize the short side to ``H / crop_pct`` (``interpolation``),
centre-crop H×W, scale pixels by 1/255, subtract ``mean``, divide by ``std``, lay out NCHW float32.
A checkpoint records it (``checkpoint["preprocessing"]``), the model card ships it, calibration and
parity images follow it, and a device bundle's end-to-end timing does it again with Pillow.

Defaults are timm's for a model without a pretrained config (``timm.data.resolve_data_config``:
224 px, ImageNet mean/std, bicubic, crop 0.875); a recipe that differs says so where it is made
(the probes' recipe is ``qbheat.evaluation.features.ProbePreprocessing``).
This module is numpy-only; Pillow is imported where an image is decoded or resized.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_STD
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
PIXEL_SCALE = 1 / 255


@dataclass
class Preprocessing:
    """One image recipe. ``input_size`` is C×H×W (an int n means 3×n×n)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # resize the short side to size / crop_pct, then centre-crop size

    def __post_init__(self):
        size = self.input_size
        self.input_size = (3, int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
        if len(self.input_size) != 3:
            raise QBHeatError(f"input_size must be C×H×W (e.g. [3, 224, 224]), not {list(self.input_size)}.")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.interpolation = str(self.interpolation).lower()
        if self.interpolation not in INTERPOLATIONS:
            raise QBHeatError(f"interpolation must be one of {list(INTERPOLATIONS)}, not {self.interpolation!r}.")
        self.crop_pct = float(self.crop_pct or 1.0)

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    @classmethod
    def from_dict(cls, d: dict[str, Any], image_size: int | None = None) -> "Preprocessing":
        """From a checkpoint's or card's ``preprocessing`` block (missing keys take this class's
        defaults); ``image_size`` overrides its H and W."""
        size = d.get("input_size", cls.input_size)
        if image_size is not None:
            size = image_size
        keys = ("mean", "std", "interpolation", "crop_pct")
        return cls(input_size=size, **{k: d[k] for k in keys if d.get(k) is not None})

    @classmethod
    def from_timm(cls, model, image_size: int | None = None) -> "Preprocessing":
        """From a timm model's ``pretrained_cfg`` (what its weights were trained with)."""
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        return cls.from_dict({k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in cfg},
                             image_size)

    def to_dict(self) -> dict[str, Any]:
        """The five recipe keys as plain JSON (what a checkpoint stores)."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    def card(self) -> dict[str, Any]:
        """The model card's ``preprocessing`` block: the recipe plus what a device app needs to know."""
        return {**self.to_dict(), "color": "RGB", "pixel_scale": PIXEL_SCALE, "layout": "NCHW"}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of an image of ``height`` × ``width`` after the short-side resize (never below the crop)."""
        h, w = self.height, self.width
        scale = math.floor(min(h, w) / self.crop_pct) / min(height, width)
        return max(h, round(height * scale)), max(w, round(width * scale))

    def resize_crop(self, img) -> np.ndarray:
        """PIL image → H×W×3 uint8: RGB, short side to size / crop_pct, centre crop."""
        from PIL import Image

        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[self.interpolation]
        img = img.convert("RGB")
        rh, rw = self.resized_size(img.size[1], img.size[0])
        img = img.resize((rw, rh), resample)
        top, left = (rh - self.height) // 2, (rw - self.width) // 2
        return np.asarray(img.crop((left, top, left + self.width, top + self.height)), dtype=np.uint8)

    def decode_and_crop(self, image: bytes | np.ndarray) -> np.ndarray:
        """JPEG/PNG bytes (or an H×W×3 uint8 array) → the centre crop, H×W×3 uint8."""
        try:
            from PIL import Image
        except ImportError:
            raise QBHeatError("decoding images needs Pillow; install it (pip install pillow) or pass --no-e2e.") from None
        img = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else Image.fromarray(image)
        return self.resize_crop(img)

    def normalize(self, images_u8: np.ndarray) -> np.ndarray:
        """H×W×3 or N×H×W×3 uint8 → N×3×H×W float32, scaled by 1/255 and normalised."""
        x = images_u8.astype(np.float32) / np.float32(255.0)  # = × pixel_scale
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        x = np.moveaxis(x, -1, -3)
        return np.ascontiguousarray(x[None] if x.ndim == 3 else x)
