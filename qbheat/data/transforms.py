"""View-making augmentations on uint8 image tensors (3×h×w), built from ``torchvision.transforms.v2``.

- ``mocov2_augmentation``: MoCo v2's "aug+" (Chen et al., arXiv 2003.04297, §2, taken from SimCLR):
  RandomResizedCrop (scale 0.2–1), colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, greyscale with
  p = 0.2, Gaussian blur σ ∈ [0.1, 2] with p = 0.5, horizontal flip.
- ``mae_augmentation``: MAE's pre-training augmentation (He et al., 2021, §A.1): RandomResizedCrop
  (scale 0.2–1, bicubic) and horizontal flip. QB-Heat's own augmentation was not retrieved, so this
  is a choice.
- ``center_transform``: deterministic resize (short side) + centre crop, for evaluation.

Every transform ends with float32 conversion and mean/std normalisation. Randomness comes from
torch's global generator; ``qbheat.data.build.PretrainDataset`` seeds it per (epoch, image) so
views do not depend on worker count or on where a run was resumed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_STD


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's blur kernel: 10 % of the image side, made odd (23 at 224)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def mocov2_augmentation(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])


def mae_augmentation(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])


def center_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Callable:
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        *_finish(mean, std),
    ])


class MultiView:
    """Apply ``transform`` ``n`` times to one image: a tuple of n independent views (3×S×S each)."""

    def __init__(self, transform: Callable, n: int):
        self.transform, self.n = transform, n

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.transform(image) for _ in range(self.n))

    def __repr__(self) -> str:
        return f"MultiView(n={self.n}, {self.transform!r})"
