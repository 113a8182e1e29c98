"""Pre-training data: a source of images, a sampler indexed by global step, and batches of uint8 images.

``build_pretrain_dataset(spec, image_size)`` where ``spec`` is

- a folder path: an ImageFolder tree (``qbheat.data.image_folder``); if it has a sub-folder named
  after the split (``train``, ``val``, ...) that sub-folder is used,
- ``"fashion-mnist"``: Debian's dataset-fashion-mnist files (``qbheat.data.fashion_mnist``),
- ``"synthetic"``: procedural images for tests (``qbheat.data.synthetic``).

The dataset hands out **uint8 images of one fixed size** (grey becomes 3-channel); the method's
view augmentation (``qbheat.data.transforms``) then runs on the whole batch, on the training
device. Fashion-MNIST stays one uint8 array in memory and a batch is one indexing operation
(``batch_iterator`` skips the DataLoader for such sources). ImageFolder images are decoded in
DataLoader workers and stored at ``store_size(image_size)``: short side resized to
image_size / 0.875, then centre-cropped square (a choice, as FFCV-style loaders store images at a
fixed size; the random resized crop then works inside that square).

Exact resume is a property of the data, not of the loop: ``GlobalStepSampler`` derives the
global batch of step s from (seed, epoch) alone and gives each rank its slice of it, and
``view_generator`` seeds the augmentation of step s from (seed, s); every rank draws for the whole
global batch and takes its rows, so the views do not depend on the number of processes. A run resumed at
step s therefore sees exactly the views an uninterrupted run would, whatever the number of
data-loader workers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from qbheat.errors import QBHeatError

SPECS = ("fashion-mnist", "synthetic")


class FashionMNISTImages:
    """Fashion-MNIST as uint8 3×28×28 tensors (the grey channel repeated), all in memory."""

    def __init__(self, split: str = "train"):
        from qbheat.data import fashion_mnist

        self.images, self.labels = fashion_mnist.load(split)
        self.classes = list(fashion_mnist.CLASSES)
        self._all = torch.from_numpy(self.images.copy())  # N×28×28 uint8, 47 MB for the training split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._all[index].unsqueeze(0).expand(3, -1, -1).contiguous()

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 B×1×28×28 for a 1-D index tensor: one gather, and grey stays one channel until the
        augmentation normalises it to three."""
        return self._all[indices].unsqueeze(1)


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


def store_size(image_size: int) -> int:
    """Side at which decoded ImageFolder images are kept: image_size / 0.875 (timm's crop_pct)."""
    return math.ceil(image_size / 0.875)


def resize_square(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 3×h×w → uint8 3×side×side: short side resized to ``side`` (bilinear, antialiased), centre crop."""
    h, w = image.shape[-2:]
    if (h, w) == (side, side):
        return image
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return x[:, top:top + side, left:left + side].round_().clamp_(0, 255).to(torch.uint8)


def view_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator the augmentation of global step ``step`` draws from (the same on every rank)."""
    return torch.Generator(device=device).manual_seed(_view_seed(seed, step, 2**63 - 1))  # 2**63 − 1: no epoch's permutation key


def _view_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """uint8 images of one size: ``dataset[key]`` → 3×S×S, for an index or an (epoch, index) key."""

    def __init__(self, images, side: int | None = None):
        self.images, self.side = images, side

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self):
        return getattr(self.images, "labels", None)

    @property
    def in_memory(self) -> bool:
        """True when a whole batch is one indexing operation (no loader workers needed)."""
        return hasattr(self.images, "batch") and self.side is None

    def __getitem__(self, key) -> torch.Tensor:
        index = key[1] if isinstance(key, tuple) else key
        image = self.images[index]  # uint8 3×h×w
        return image if self.side is None else resize_square(image, self.side)

    def batch(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        """uint8 B×3×S×S for a sampler batch of (epoch, index) keys."""
        index = torch.tensor([i for _, i in keys], dtype=torch.long)
        if self.in_memory:
            return self.images.batch(index)
        return torch.stack([self[int(i)] for i in index])


def build_pretrain_dataset(spec: str, image_size: int, *, seed: int = 0, split: str = "train",
                           synthetic_size: int = 1024) -> PretrainDataset:
    """The dataset for ``spec``: Fashion-MNIST and synthetic images at their own size, ImageFolder at ``store_size``."""
    if not spec:
        raise QBHeatError("no data given; pass --data with a folder, 'fashion-mnist' or 'synthetic'.")
    images = image_source(spec, split=split, synthetic_size=synthetic_size, seed=seed)
    if len(images) == 0:
        raise QBHeatError(f"data {spec!r} holds no images; point --data at a non-empty source.")
    side = None if spec in SPECS else store_size(image_size)
    return PretrainDataset(images, side)


def batch_iterator(dataset: PretrainDataset, sampler: "GlobalStepSampler", num_workers: int = 0,
                   pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """uint8 batches B×3×S×S in the sampler's order: indexed directly for in-memory sources, else a DataLoader."""
    if dataset.in_memory:
        return (dataset.batch(keys) for keys in sampler)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator(),  # keeps the loader from drawing on the global RNG
        persistent_workers=False,
    )
    return iter(loader)


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
