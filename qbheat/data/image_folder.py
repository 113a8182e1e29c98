"""ImageFolder trees: every image file below a root folder, decoded with PIL.

``root/<class>/<image>`` gives labels (class = first-level folder, sorted); images directly under
``root`` (or a tree without a common class level) give ``labels = None``, which self-supervised
pre-training does not need. Images are decoded lazily; one that cannot be decoded raises a
QBHeatError naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qbheat.errors import QBHeatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


def find_images(root: str | Path) -> list[Path]:
    """Sorted image files below ``root`` (hidden files and folders skipped)."""
    root = Path(root)
    if not root.exists():
        raise QBHeatError(f"data folder {root} does not exist; pass an ImageFolder path, 'fashion-mnist' or 'synthetic'.")
    if not root.is_dir():
        raise QBHeatError(f"data path {root} is not a folder; pass a folder of images (ImageFolder layout).")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise QBHeatError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); add some or point --data elsewhere.")
    return files


def read_image(path: str | Path) -> torch.Tensor:
    """Decode one file to a uint8 3×H×W RGB tensor (grey and palette images become RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).split("\n")[0][:120] or type(e).__name__
        raise QBHeatError(f"image {path} cannot be read ({reason}); remove or replace it.") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderImages:
    """The images of an ImageFolder tree; ``[i]`` is a uint8 3×H×W tensor."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = find_images(self.root)
        top = [f.relative_to(self.root).parts for f in self.files]
        if all(len(parts) >= 2 for parts in top):
            self.classes = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels: np.ndarray | None = np.array([index[parts[0]] for parts in top], dtype=np.int64)
        else:
            self.classes, self.labels = [], None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_image(self.files[index])
