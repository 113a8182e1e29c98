"""Pre-training data: a source of images, per-image views, and a sampler indexed by global step.

``build_pretrain_dataset(spec, image_size, transform)`` where ``spec`` is

- a folder path: an ImageFolder tree (``qbheat.data.image_folder``); if it has a sub-folder named
  after the split (``train``, ``val``, ...) that sub-folder is used,
- ``"fashion-mnist"``: Debian's dataset-fashion-mnist files (``qbheat.data.fashion_mnist``),
- ``"synthetic"``: procedural images for tests (``qbheat.data.synthetic``).

Grey images become 3-channel; the transform resizes to ``image_size``.

Exact resume is a property of the data, not of the loop: ``GlobalStepSampler`` derives the
global batch of step s from (seed, epoch) alone, gives each rank its slice of it, and yields
(epoch, index) keys; ``PretrainDataset`` seeds the augmentation of each image from
(seed, epoch, index). A run resumed at step s therefore sees exactly the views an uninterrupted
run would, whatever the number of data-loader workers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from qbheat.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiView, center_transform
from qbheat.errors import QBHeatError

SPECS = ("fashion-mnist", "synthetic")


class FashionMNISTImages:
    """Fashion-MNIST as uint8 3×28×28 tensors (the grey channel repeated)."""

    def __init__(self, split: str = "train"):
        from qbheat.data import fashion_mnist

        self.images, self.labels = fashion_mnist.load(split)
        self.classes = list(fashion_mnist.CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[index])).unsqueeze(0).expand(3, -1, -1).contiguous()


def image_source(spec: str, split: str = "train", synthetic_size: int = 1024, seed: int = 0):
    """The images behind ``spec`` (indexable, ``len``, optional ``labels``)."""
    if spec == "fashion-mnist":
        return FashionMNISTImages(split)
    if spec == "synthetic":
        from qbheat.data.synthetic import SyntheticImages

        # The test split uses other seeds so that it shares no image with the training split.
        return SyntheticImages(n=synthetic_size, seed=seed if split == "train" else seed + 10_007)
    from qbheat.data.image_folder import ImageFolderImages

    path = Path(spec).expanduser()
    if (path / split).is_dir():  # ImageNet-style root/{train,val}/<class>/<image>
        path = path / split
    return ImageFolderImages(path)


def _view_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """Views of each image: ``dataset[(epoch, index)]`` → tuple of float32 3×S×S tensors.

    A plain integer index means epoch 0. The transform's randomness is seeded from
    (seed, epoch, index) inside a forked RNG, so the caller's RNG is left untouched.
    """

    def __init__(self, images, transform: Callable, seed: int = 0):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self):
        return getattr(self.images, "labels", None)

    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.images[index]  # uint8 3×h×w
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.seed, epoch, index))
            views = self.transform(image)
        return views if isinstance(views, tuple) else (views,)


def build_pretrain_dataset(spec: str, image_size: int, transform: Callable | None = None, *, seed: int = 0,
                           split: str = "train", synthetic_size: int = 1024,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> PretrainDataset:
    """The dataset for ``spec``; ``transform`` makes the views (default: one centre-cropped view)."""
    if not spec:
        raise QBHeatError("no data given; pass --data with a folder, 'fashion-mnist' or 'synthetic'.")
    images = image_source(spec, split=split, synthetic_size=synthetic_size, seed=seed)
    if len(images) == 0:
        raise QBHeatError(f"data {spec!r} holds no images; point --data at a non-empty source.")
    if transform is None:
        transform = MultiView(center_transform(image_size, mean, std), 1)
    return PretrainDataset(images, transform, seed=seed)


class GlobalStepSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) keys for steps [start_step, end_step) of one rank.

    The global batch of step s is slice ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``'s
    permutation (seeded by (seed, epoch)); the last incomplete batch of an epoch is dropped (as
    MoCo needs: the queue takes whole global batches). Rank r gets rows [r·b, (r+1)·b) of it.
    """

    def __init__(self, dataset_size: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, end_step: int | None = None):
        if global_batch % world_size:
            raise QBHeatError(f"batch_size {global_batch} does not split over {world_size} processes; use a multiple of {world_size}.")
        self.steps_per_epoch = dataset_size // global_batch
        if self.steps_per_epoch == 0:
            raise QBHeatError(f"the data holds {dataset_size} images, fewer than one batch of {global_batch}; lower batch_size or add images.")
        self.n, self.global_batch, self.rank, self.world_size, self.seed = dataset_size, global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.start_step, self.end_step = start_step, end_step
        self._perm_epoch, self._perm = -1, None

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_view_seed(self.seed, epoch, 2**62))  # 2**62: no image index
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        rows = self._permutation(epoch)[i * self.global_batch:(i + 1) * self.global_batch]
        mine = rows[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return [(epoch, int(j)) for j in mine]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an open-ended GlobalStepSampler has no length")
        return max(0, self.end_step - self.start_step)
