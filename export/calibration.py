"""Calibration and parity images, preprocessed exactly as the model card says.

``Preprocessing`` (``qbheat_contract.preprocessing``) is the card's ``preprocessing`` block: resize the
short side to ``input_size / crop_pct``, centre-crop ``input_size``, scale to [0, 1], subtract ``mean``,
divide by ``std`` (timm's eval transform). Images come from a folder (``--calibration DIR``) or, by default,
from the photographs bundled with scikit-image (``qbheat.data.samples``): real images, no download.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbheat_contract.errors import QBHeatError
from qbheat_contract.preprocessing import Preprocessing

__all__ = ["ImageSet", "Preprocessing", "calibration_and_parity", "load_images", "parity_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_COUNT = 16  # NNCF's default subset is 300; 16 keeps a 2-core export under a minute (ours)


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

        u8 = sample_images(count, pre.height, seed=seed)
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

    u8 = sample_images(len(NAMES) + batch, pre.height, seed=1234)[-batch:]  # random crops, not the centre crops
    return ImageSet("skimage.data (random crops, seed 1234)", [f"crop{i}" for i in range(batch)], u8, pre.normalize(u8))


def calibration_and_parity(pre: Preprocessing, folder: str | Path | None, count: int, batch: int) -> tuple[ImageSet, ImageSet]:
    """An export's two image sets, ``load_images`` then ``parity_images`` held out from it, with the
    folder listed once (a folder of a dataset's images can hold many thousands of files)."""
    files = _image_files(Path(folder)) if folder is not None and Path(folder).is_dir() else None
    calib = load_images(pre, folder, count, files=files)
    return calib, parity_images(pre, batch, folder, skip=len(calib.names), files=files)
