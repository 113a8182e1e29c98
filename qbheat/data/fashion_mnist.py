"""Fashion-MNIST read from the files of Debian's ``dataset-fashion-mnist`` package.

Zalando's Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test images, 28×28
grey levels, 10 balanced classes. Debian ships the original IDX files, gzip-compressed; this
module parses them with numpy. Set ``QBHEAT_FASHION_MNIST_DIR`` to read them from elsewhere.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from qbheat.errors import QBHeatError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    return Path(os.environ.get("QBHEAT_FASHION_MNIST_DIR", DEFAULT_DIR))


def is_available() -> bool:
    return all((data_dir() / f).is_file() for pair in _FILES.values() for f in pair)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = int.from_bytes(raw[:4], "big")
    if header != magic:
        raise QBHeatError(f"{path} is not an IDX file of the expected kind (magic {header:#x}); reinstall dataset-fashion-mnist.")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images N×28×28 uint8, labels N int64) for ``split`` in {"train", "test"}."""
    if split not in _FILES:
        raise QBHeatError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}.")
    if not is_available():
        raise QBHeatError(
            f"Fashion-MNIST files are missing from {data_dir()}; install them with "
            "'sudo apt-get install dataset-fashion-mnist' (or set QBHEAT_FASHION_MNIST_DIR)."
        )
    img_name, lbl_name = _FILES[split]
    images = _read_idx(data_dir() / img_name, 0x00000803)
    labels = _read_idx(data_dir() / lbl_name, 0x00000801).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
