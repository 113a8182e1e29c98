"""Labelled evaluation images for ``qbheat-export eval`` and the export's accuracy gate.

``SOURCE`` is ``fashion-mnist`` (its 10,000 test images, from Debian's dataset-fashion-mnist) or an
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


@dataclass
class EvalSet:
    source: str
    images: np.ndarray  # N×H×W grey or N×3×H×W uint8, as stored (not yet resized)
    labels: np.ndarray  # N int64, in the model's class indices
    classes: list[str]  # the data's class names
    preprocessing: dict
    cropped: bool = False  # images already resized and centre-cropped to the input size (only normalised per batch)

    def __len__(self) -> int:
        return len(self.labels)

    def card(self) -> dict:
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return {"source": self.source, "count": len(self), "sha256": h.hexdigest()}

    def batches(self, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, N×3×H×W float32 normalised) in order."""
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
    cropped = source != "fashion-mnist"
    if source == "fashion-mnist":
        from qbheat.data import fashion_mnist

        images, labels = fashion_mnist.load("test")
        classes, name = list(fashion_mnist.CLASSES), "fashion-mnist (test split)"
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
