"""Natural sample images from scikit-image, for calibration, golden inputs and parity checks.

These are real photographs bundled inside the scikit-image wheel (no download). Those that
scikit-image fetches on demand (eagle, lily, ...) are deliberately absent.
"""
from __future__ import annotations

import numpy as np

from qbheat.errors import QBHeatError

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry",
         "hubble_deep_field", "retina", "camera", "coins", "moon", "page", "brick", "grass", "gravel", "clock")


def _load(name: str) -> np.ndarray:
    try:
        import skimage.data as sd
    except ImportError:
        raise QBHeatError("scikit-image is needed for the bundled sample images; install qbheat[data].") from None
    img = sd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sd, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def sample_images(n: int = 8, size: int = 224, seed: int = 0) -> np.ndarray:
    """Return ``n`` RGB crops, n×size×size×3 uint8: each image resized (short side = size) and centre-cropped,
    then further random crops of the same images once the list is exhausted (deterministic in ``seed``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(_load(NAMES[i % len(NAMES)]))
        w, h = img.size
        if i < len(NAMES):
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
        else:
            crop = int(min(w, h) * rng.uniform(0.4, 1.0))
            left, top = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
            img = img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BILINEAR)
            left = top = 0
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return np.stack(out)


def write_crop_folder(root, n_per_class: int = 40, size: int = 64, seed: int = 0,
                      splits: dict[str, float] | None = None) -> dict[str, int]:
    """Write a small labelled ImageFolder tree of random crops of the bundled photographs.

    The class of a crop is the photograph it was cut from ("astronaut", "coffee", ...): a real,
    if easy, recognition task that needs nothing beyond scikit-image. This is the quickstart's
    fallback when Debian's Fashion-MNIST is not installed. Layout: ``root/<split>/<class>/NNNN.png``
    with splits ``train`` and ``test`` (80/20 by default). Returns the number of images per split.
    """
    from pathlib import Path

    from PIL import Image

    splits = splits or {"train": 0.8, "test": 0.2}
    rng = np.random.default_rng(seed)
    counts = {s: 0 for s in splits}
    root = Path(root)
    for name in NAMES:
        img = Image.fromarray(_load(name))
        w, h = img.size
        for i in range(n_per_class):
            crop = int(min(w, h) * rng.uniform(0.3, 0.9))
            left, top = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
            tile = img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BILINEAR)
            split = "train" if i < round(n_per_class * splits["train"]) else "test"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            tile.save(folder / f"{i:04d}.png")
            counts[split] += 1
    return counts
