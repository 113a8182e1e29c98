"""Labelled evaluation images for ``qbheat-export eval`` and the export's accuracy gate.

``SOURCE`` is ``fashion-mnist`` (its 10,000 test images, from Debian's dataset-fashion-mnist),
``fashion-mnist-train`` (its 60,000 training images: ``--int8-scope auto``'s default validation set,
kept apart from the reported test split) or an
ImageFolder tree (``val/`` or ``test/`` of class sub-folders if it has one, else its own class
sub-folders). Images are preprocessed as the model card says, with the probes' own transform
(``qbheat.evaluation.features.ProbePreprocessing``: short side to size / crop_pct, centre crop,
normalise), so the PyTorch number here is the probe's number.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qbheat.errors import QBHeatError

CACHE_BYTES = 1 << 30  # keep the preprocessed evaluation set in memory up to this size
FASHION_MNIST = {"fashion-mnist": ("test", "fashion-mnist (test split)"), "fashion-mnist-train": ("train", "fashion-mnist (training split)")}


@dataclass
class EvalSet:
    source: str
    images: np.ndarray  # N×H×W grey or N×3×H×W uint8, as stored (not yet resized)
    labels: np.ndarray  # N int64, in the model's class indices
    classes: list[str]  # the data's class names
    preprocessing: dict
    cropped: bool = False  # images already resized and centre-cropped to the input size (only normalised per batch)
    _cache: dict | None = None  # batch size → the preprocessed batches (see ``batches``)

    def __len__(self) -> int:
        return len(self.labels)

    def card(self) -> dict:
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return {"source": self.source, "count": len(self), "sha256": h.hexdigest()}

    def batches(self, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, N×3×H×W float32 normalised) in order.

        The preprocessed set is kept after the first pass when it fits in ``CACHE_BYTES`` (10k
        Fashion-MNIST images at 64 px: 492 MB), so PyTorch and every artifact share one resize and
        normalisation instead of repeating it per model."""
        if self._cache is not None and batch_size in self._cache:
            yield from self._cache[batch_size]
            return
        c, h, w = (int(v) for v in self.preprocessing["input_size"])
        keep = [] if len(self) * c * h * w * 4 <= CACHE_BYTES else None
        for rows, x in self._preprocessed(batch_size):
            if keep is not None:
                keep.append((rows, x))
            yield rows, x
        if keep is not None:
            self._cache = {batch_size: keep}

    def _preprocessed(self, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        from qbheat.evaluation.features import ProbePreprocessing, as_uint8_chw

        pre = ProbePreprocessing.from_dict(self.preprocessing)
        if self.cropped:
            pre.crop_pct = 1.0  # the short side already has the input size: no resize, no crop
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            yield rows, pre(as_uint8_chw(self.images[rows])).numpy()


def _map_labels(data_classes: list[str], model_labels: list[str] | None, where: str) -> np.ndarray:
    """Index of each data class among the model's labels (by name; by position for unnamed class_<i> labels)."""
    if not model_labels:
        raise QBHeatError("the model card lists no class labels, so accuracy cannot be measured; export a classifier head.")
    index = {name: i for i, name in enumerate(model_labels)}
    if all(c in index for c in data_classes):
        return np.array([index[c] for c in data_classes], np.int64)
    if model_labels == [f"class_{i}" for i in range(len(model_labels))] and len(data_classes) <= len(model_labels):
        return np.arange(len(data_classes), dtype=np.int64)
    missing = [c for c in data_classes if c not in index][:3]
    raise QBHeatError(f"the classes of {where} ({', '.join(missing)}, ...) are not among the model's labels "
                      f"({', '.join(model_labels[:4])}, ...); evaluate on data labelled like the model.")


def load_eval_set(source: str, card: dict, limit: int | None = None) -> EvalSet:
    """The labelled images of ``source`` with labels mapped to the card's classes; ``limit`` takes an even subset."""
    labels_of_model = (card.get("head") or {}).get("labels")
    cropped = source not in FASHION_MNIST
    if source in FASHION_MNIST:
        from qbheat.data import fashion_mnist

        split, name = FASHION_MNIST[source]
        images, labels = fashion_mnist.load(split)
        classes = list(fashion_mnist.CLASSES)
    else:
        images, labels, classes, name = _image_folder(source, card)
    mapping = _map_labels(classes, labels_of_model, name)
    if limit is not None:
        if limit < 1:
            raise QBHeatError(f"--limit must be at least 1, not {limit}.")
        pick = np.linspace(0, len(labels) - 1, min(limit, len(labels))).round().astype(int)
        images, labels = images[pick], labels[pick]
    return EvalSet(name, images, mapping[labels], classes, card["preprocessing"], cropped)


def _image_folder(source: str, card: dict) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    from qbheat.data.image_folder import ImageFolderImages
    from qbheat.evaluation.features import ProbePreprocessing

    root = Path(source).expanduser()
    if not root.is_dir():
        raise QBHeatError(f"--data {source} is neither 'fashion-mnist' nor an existing folder; pass an ImageFolder tree of class sub-folders.")
    folder = next((root / n for n in ("val", "test") if (root / n).is_dir()), root)
    images = ImageFolderImages(folder)
    if images.labels is None:
        raise QBHeatError(f"images in {folder} are not in class sub-folders, so they have no labels to measure accuracy with.")
    # Resize + centre-crop once to the model's size (uint8), so that images of any size stack; the
    # normalisation happens per batch (EvalSet.cropped).
    pre = ProbePreprocessing.from_dict(card["preprocessing"])
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    out = np.empty((len(images), 3, *pre.input_size[1:]), np.uint8)
    for i in range(len(images)):
        x = pre(images[i][None])
        out[i] = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)[0].numpy()
    return out, images.labels, list(images.classes), str(folder)
