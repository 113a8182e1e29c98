"""Calibration and parity images, preprocessed exactly as the model card says.

``Preprocessing`` is the card's ``preprocessing`` block as a dataclass: resize the short side to
``input_size / crop_pct``, centre-crop ``input_size``, scale to [0, 1], subtract ``mean``, divide by
``std`` (timm's eval transform). Images come from a folder (``--calibration DIR``) or, by default,
from the photographs bundled with scikit-image (``qbheat.data.samples``): real images, no download.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qbheat.errors import QBHeatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_COUNT = 16  # NNCF's default subset is 300; 16 keeps a 2-core export under a minute (ours)


@dataclass
class Preprocessing:
    """Defaults: timm's ImageNet eval transform (mean/std of ImageNet, bicubic, crop_pct 0.875)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    extra: dict = field(default_factory=dict)

    def card(self) -> dict:
        """The model card's ``preprocessing`` block."""
        return {"input_size": [3, self.input_size, self.input_size], "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "color": "RGB",
                "pixel_scale": 1 / 255, "layout": "NCHW"}

    @classmethod
    def from_dict(cls, d: dict, input_size: int | None = None) -> "Preprocessing":
        size = input_size or d.get("input_size", 224)
        if isinstance(size, (list, tuple)):
            size = int(size[-1])
        return cls(input_size=int(size), mean=tuple(float(v) for v in d.get("mean", cls.mean)),
                   std=tuple(float(v) for v in d.get("std", cls.std)),
                   interpolation=str(d.get("interpolation", "bicubic")), crop_pct=float(d.get("crop_pct", 0.875) or 1.0))

    @classmethod
    def from_timm(cls, model, input_size: int | None = None) -> "Preprocessing":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        return cls.from_dict({"input_size": cfg.get("input_size", (3, 224, 224)), "mean": cfg.get("mean", cls.mean),
                              "std": cfg.get("std", cls.std), "interpolation": cfg.get("interpolation", "bicubic"),
                              "crop_pct": cfg.get("crop_pct", 0.875)}, input_size)

    def normalize(self, images_u8: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 → N×3×H×W float32, normalised."""
        x = images_u8.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        mean = np.asarray(self.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.std, np.float32)[None, :, None, None]
        return np.ascontiguousarray((x - mean) / std)

    def resize_crop(self, img) -> np.ndarray:
        """PIL image → input_size × input_size × 3 uint8 (short side to size/crop_pct, centre crop)."""
        from PIL import Image

        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
            self.interpolation, Image.BICUBIC)
        img = img.convert("RGB")
        w, h = img.size
        short = int(math.floor(self.input_size / self.crop_pct))
        scale = short / min(w, h)
        img = img.resize((max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))), resample)
        w, h = img.size
        left, top = (w - self.input_size) // 2, (h - self.input_size) // 2
        return np.asarray(img.crop((left, top, left + self.input_size, top + self.input_size)), dtype=np.uint8)


@dataclass
class ImageSet:
    """Images both as uint8 crops (for Core ML ImageType, golden files) and normalised tensors."""

    source: str
    names: list[str]
    images_u8: np.ndarray  # N×H×W×3 uint8
    inputs: np.ndarray  # N×3×H×W float32, normalised

    def card(self) -> dict:
        return {"source": self.source, "count": len(self.names), "sha256": hashlib.sha256(self.images_u8.tobytes()).hexdigest()}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_crops(pre: Preprocessing, folder: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    crops, names = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                crops.append(pre.resize_crop(im))
        except (UnidentifiedImageError, OSError) as e:
            raise QBHeatError(f"calibration image {p} cannot be read ({type(e).__name__}); remove it or fix it.") from None
        names.append(str(p.relative_to(folder)))
    return np.stack(crops), names


def load_images(pre: Preprocessing, folder: str | Path | None = None, count: int = DEFAULT_COUNT, seed: int = 0,
                files: list[Path] | None = None) -> ImageSet:
    """The first ``count`` images of ``folder`` (sorted, recursively; ``files`` if already listed) or
    scikit-image's bundled photos."""
    if folder is None:
        from qbheat.data.samples import NAMES, sample_images

        u8 = sample_images(count, pre.input_size, seed=seed)
        names = [NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f"#crop{i}") for i in range(count)]
        return ImageSet("skimage.data", names, u8, pre.normalize(u8))
    folder = Path(folder)
    if not folder.is_dir():
        raise QBHeatError(f"calibration folder {folder} does not exist; pass a folder of images or leave --calibration out.")
    files = _image_files(folder) if files is None else files
    if not files:
        raise QBHeatError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or leave --calibration out.")
    u8, names = _read_crops(pre, folder, files[:count])
    return ImageSet(str(folder), names, u8, pre.normalize(u8))


def parity_images(pre: Preprocessing, batch: int = 4, folder: str | Path | None = None, skip: int = 0,
                  files: list[Path] | None = None) -> ImageSet:
    """Real images for parity, never the ones calibration used.

    With a calibration ``folder`` that holds more than ``skip`` (= the calibration count) images, parity runs
    on ``batch`` of the remaining ones, spread evenly: the user's own data, so INT8 is judged in the
    distribution it was calibrated for. Otherwise scikit-image's photos (random crops, seeded apart from the
    default calibration set).
    """
    if folder is not None:
        folder = Path(folder)
        rest = (_image_files(folder) if files is None else files)[skip:] if folder.is_dir() else []
        if len(rest) >= batch:
            pick = [rest[round(i * (len(rest) - 1) / max(batch - 1, 1))] for i in range(batch)]
            u8, names = _read_crops(pre, folder, pick)
            return ImageSet(f"{folder} (held out from calibration)", names, u8, pre.normalize(u8))
    from qbheat.data.samples import NAMES, sample_images

    u8 = sample_images(len(NAMES) + batch, pre.input_size, seed=1234)[-batch:]  # random crops, not the centre crops
    return ImageSet("skimage.data (random crops, seed 1234)", [f"crop{i}" for i in range(batch)], u8, pre.normalize(u8))


def calibration_and_parity(pre: Preprocessing, folder: str | Path | None, count: int, batch: int) -> tuple[ImageSet, ImageSet]:
    """An export's two image sets, ``load_images`` then ``parity_images`` held out from it, with the
    folder listed once (a folder of a dataset's images can hold many thousands of files)."""
    files = _image_files(Path(folder)) if folder is not None and Path(folder).is_dir() else None
    calib = load_images(pre, folder, count, files=files)
    return calib, parity_images(pre, batch, folder, skip=len(calib.names), files=files)
