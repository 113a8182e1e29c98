"""View-making augmentations, applied to a whole batch at once on the batch's device.

A view augmentation takes a uint8 batch ``B×3×h×w`` and a ``torch.Generator`` on the same device
and returns float32 views ``B×3×S×S``, normalised with mean/std. Every random draw (crop boxes,
flips, jitter factors, blur widths) is made per image from that generator, so one batch costs a
handful of tensor ops instead of B per-image PIL or torchvision calls, and on a GPU the
augmentation runs where the model does. The trainer seeds the generator from (seed, step) and each rank takes its rows of the global batch's draws,
so views do not depend on the number of loader workers or on where a run was resumed.

- ``mocov2_augmentation``: MoCo v2's "aug+" (Chen et al., arXiv 2003.04297, §2, taken from SimCLR):
  RandomResizedCrop (scale 0.2–1), colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, greyscale with
  p = 0.2, Gaussian blur σ ∈ [0.1, 2] with p = 0.5, horizontal flip.
- ``mae_augmentation``: MAE's pre-training augmentation (He et al., 2021, §A.1): RandomResizedCrop
  (scale 0.2–1, bicubic) and horizontal flip. QB-Heat's own augmentation was not retrieved, so this
  is a choice.
- ``center_transform``: deterministic resize + centre crop, for evaluation-style views.

Differences from torchvision's per-image transforms, all choices made for batching: the crop is
resampled with ``grid_sample`` (bicubic or bilinear, no antialias filter, so a crop shrunk by more
than about 2× aliases; pre-training crops here are enlarged or shrunk by less than that), and
colour jitter applies its four adjustments in one random order per batch rather than per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from qbheat_contract.preprocessing import IMAGENET_MEAN, IMAGENET_STD

_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's blur kernel: 10 % of the image side, made odd (23 at 224)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=g.device)


def _coin(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


# ---------------------------------------------------------------------------------------------
# Geometry: random resized crop + flip, as one affine resampling per image.
# ---------------------------------------------------------------------------------------------

def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                              ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """Crop boxes (top, left, h, w) as an n×4 float tensor, by torchvision's RandomResizedCrop rule.

    Per image: up to ``attempts`` draws of an area fraction in ``scale`` and a log-uniform aspect
    ratio; the first box that fits is taken, else the largest centred box within ``ratio``.
    """
    area = height * width
    target = area * _uniform(n * attempts, scale[0], scale[1], g).view(attempts, n)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), g).view(attempts, n)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # attempts×n
    first = torch.where(fits.any(0), fits.float().argmax(0), torch.full((n,), -1, device=g.device))
    # fallback: centred crop of the whole image, aspect clamped into ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    pick = first.clamp(min=0)[None]
    bw = torch.where(first >= 0, w.gather(0, pick)[0], torch.full((n,), float(fw), device=g.device))
    bh = torch.where(first >= 0, h.gather(0, pick)[0], torch.full((n,), float(fh), device=g.device))
    # top/left uniform over the integer positions that keep the box inside
    top = torch.floor(torch.rand(n, generator=g, device=g.device) * (height - bh + 1))
    left = torch.floor(torch.rand(n, generator=g, device=g.device) * (width - bw + 1))
    top = torch.where(first >= 0, top, torch.full_like(top, float((height - fh) // 2)))
    left = torch.where(first >= 0, left, torch.full_like(left, float((width - fw) // 2)))
    return torch.stack([top, left, bh, bw], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
                mode: str = "bicubic") -> torch.Tensor:
    """Resample box (top, left, h, w) of each image to size×size, mirrored where ``flip``: float in [0, 1].

    images: B×C×H×W (uint8 or float in [0, 255] / [0, 1] — uint8 is scaled to [0, 1]).
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    b, _, height, width = x.shape
    top, left, bh, bw = boxes.to(x.device, x.dtype).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    sx = bw / width
    theta[:, 0, 0] = sx if flip is None else torch.where(flip.to(x.device), -sx, sx)
    theta[:, 0, 2] = (2 * left + bw) / width - 1
    theta[:, 1, 1] = bh / height
    theta[:, 1, 2] = (2 * top + bh) / height - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Colour: per-image jitter, greyscale and Gaussian blur on float images in [0, 1].
# ---------------------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """B×3×H×W → B×1×H×W luma (a B×1×H×W image is returned as it is)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, g: torch.Generator, brightness: float, contrast: float, saturation: float,
                 hue: float, rows: slice | None = None, total: int | None = None) -> torch.Tensor:
    """SimCLR/MoCo colour jitter with per-image factors; the order of the four is drawn once per batch.
    ``rows`` / ``total``: ``x`` is that slice of a batch of ``total`` images (factors drawn for all)."""
    n = total or x.shape[0]
    rows = rows or slice(0, n)
    order = torch.randperm(4, generator=g, device=g.device).tolist()
    factors = {
        0: _uniform(n, max(0.0, 1 - brightness), 1 + brightness, g)[rows],
        1: _uniform(n, max(0.0, 1 - contrast), 1 + contrast, g)[rows],
        2: _uniform(n, max(0.0, 1 - saturation), 1 + saturation, g)[rows],
        3: _uniform(n, -hue, hue, g)[rows],
    }
    grey = x.shape[1] == 1
    for op in order:
        f = factors[op]
        if grey and op >= 2:  # saturation and hue leave a grey image unchanged
            continue
        if op == 0:
            x = (x * f.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        elif op == 1:
            x = _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)
        elif op == 2:
            x = _blend(x, grayscale(x), f)
        else:
            x = adjust_hue(x, f)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one σ per image (reflect padding, as torchvision)."""
    b, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C)×k
    y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# The augmentations the methods use.
# ---------------------------------------------------------------------------------------------

@dataclass
class ViewAugmentation:
    """One random view per image of a uint8 batch: crop → flip → colour → normalise (see module doc)."""

    size: int
    crop_scale: tuple[float, float] | None = (0.2, 1.0)  # None: deterministic resize + centre crop
    flip: bool = True
    interpolation: str = "bicubic"
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grey_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor, g: torch.Generator, offset: int = 0, total: int | None = None) -> torch.Tensor:
        """uint8 B×3×H×W, or B×1×H×W for grey images (cheaper: one channel until normalisation) → B×3×S×S.

        ``offset`` / ``total``: ``images`` are rows [offset, offset + B) of a global batch of ``total``
        (one rank's share under DDP); every draw is made for the whole global batch and sliced, so a
        rank's views equal the single-process run's rows.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a B×3×H×W or B×1×H×W batch, got {tuple(images.shape)}")
        grey = images.shape[1] == 1
        n, _, h, w = images.shape
        total = total or n
        rows = slice(offset, offset + n)
        if self.crop_scale is None:
            side = min(h, w)
            boxes = torch.tensor([[(h - side) // 2, (w - side) // 2, side, side]], device=images.device).expand(n, 4)
        else:
            boxes = random_resized_crop_boxes(total, h, w, tuple(self.crop_scale), g)[rows]
        flip = _coin(total, 0.5, g)[rows] if self.flip else None
        x = crop_resize(images, boxes, self.size, flip, self.interpolation)  # B×3×S×S in [0, 1]
        if self.jitter is not None:
            on = _coin(total, self.jitter_p, g)[rows].view(-1, 1, 1, 1)
            x = torch.where(on, color_jitter(x, g, *self.jitter, rows=rows, total=total), x)
        if self.grey_p > 0:
            on = _coin(total, self.grey_p, g)[rows].view(-1, 1, 1, 1)
            if not grey:  # a grey image is its own greyscale (the draw is still made, so views match)
                x = torch.where(on, grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            on = _coin(total, self.blur_p, g)[rows].view(-1, 1, 1, 1)
            sigma = _uniform(total, *self.blur_sigma, g)[rows]
            x = torch.where(on, gaussian_blur(x, sigma, blur_kernel_size(self.size)), x)
        if grey:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def mocov2_augmentation(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ViewAugmentation:
    return ViewAugmentation(image_size, crop_scale, flip=True, interpolation="bilinear", jitter=(0.4, 0.4, 0.4, 0.1),
                            jitter_p=0.8, grey_p=0.2, blur_p=0.5, mean=mean, std=std)


def mae_augmentation(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ViewAugmentation:
    return ViewAugmentation(image_size, crop_scale, flip=True, interpolation="bicubic", mean=mean, std=std)


def center_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> ViewAugmentation:
    return ViewAugmentation(image_size, None, flip=False, interpolation="bilinear", mean=mean, std=std)


class MultiView:
    """Apply ``augmentation`` ``n`` times to one batch: a tuple of n independent views (B×3×S×S each)."""

    def __init__(self, augmentation: ViewAugmentation, n: int):
        self.augmentation, self.n = augmentation, n

    def __call__(self, images: torch.Tensor, g: torch.Generator, offset: int = 0,
                 total: int | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(self.augmentation(images, g, offset, total) for _ in range(self.n))

    def __repr__(self) -> str:
        return f"MultiView(n={self.n}, {self.augmentation!r})"
