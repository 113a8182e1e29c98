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
