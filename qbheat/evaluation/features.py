"""Frozen-backbone feature extraction: what every probe reads.

``extract_features(backbone, images, preprocessing)`` runs the backbone in eval mode (BatchNorm
uses its running statistics, dropout is off, no gradients), batch by batch with a progress bar,
and returns a ``FeatureSet``:

    pooled   N×D    the view ``qbheat.heads`` calls "pooled" (global average of the last map,
                    concatenated with global token 0 on Mobile-Former) or "embedding" (timm's
                    pre-logits); the linear probe and kNN read it
    fmap     N×C×h×w  the last feature map (``spatial=True``), for the non-linear probe
    tokens   N×T×d  Mobile-Former's global tokens, or None for a CNN (``spatial=True``)

Images come in as uint8 (N×H×W grey, N×H×W×3, or N×3×H×W); ``ProbePreprocessing`` resizes the short
side to the input size (bilinear or bicubic, antialiased), centre-crops, scales to [0, 1] and
normalises with mean/std: exactly the recipe a probe checkpoint records for export to ship.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qbheat.errors import QBHeatError
from qbheat_contract.preprocessing import Preprocessing

TORCH_INTERPOLATIONS = ("bilinear", "bicubic")  # what F.interpolate antialiases


@dataclass
class ProbePreprocessing(Preprocessing):
    """The probes' image recipe (``qbheat_contract.preprocessing.Preprocessing`` applied to torch batches).

    Its defaults are the Fashion-MNIST reproduction's, not timm's: 64 px, bilinear, no crop margin
    (crop_pct 1.0: 28-px items fill the frame); a probe checkpoint records them for export to ship."""

    input_size: tuple[int, int, int] = (3, 64, 64)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.interpolation not in TORCH_INTERPOLATIONS:
            raise QBHeatError(f"interpolation must be one of {list(TORCH_INTERPOLATIONS)}, not {self.interpolation!r}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any], image_size: int | None = None) -> "ProbePreprocessing":
        """From a checkpoint's ``preprocessing`` entry; ``image_size`` overrides its input size (an
        interpolation torch cannot antialias falls back to bilinear)."""
        if d.get("interpolation") is not None and str(d["interpolation"]).lower() not in TORCH_INTERPOLATIONS:
            d = {**d, "interpolation": "bilinear"}
        return super().from_dict(d, image_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B×3×H×W → float32 B×3×h×w, normalised."""
        _, h, w = self.input_size
        x = images.float() / 255.0
        short = min(x.shape[-2:])
        scale = max(h, w) / self.crop_pct / short
        size = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        x = x[..., top:top + h, left:left + w]
        if self.interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def as_uint8_chw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """N×H×W (grey), N×H×W×3 or N×3×H×W uint8 → a uint8 N×3×H×W tensor (grey repeated; no copy when possible)."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        a = np.asarray(images)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # read-only arrays (the cached dataset) are copied
    if x.dtype != torch.uint8:
        raise QBHeatError(f"images must be uint8, not {x.dtype}.")
    if x.ndim == 3:
        return x.unsqueeze(1).expand(-1, 3, -1, -1)
    if x.ndim == 4 and x.shape[1] == 3:
        return x
    if x.ndim == 4 and x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)
    raise QBHeatError(f"images must be N×H×W, N×H×W×3 or N×3×H×W, not {tuple(x.shape)}.")


@dataclass
class FeatureSet:
    """Frozen features of N images (see the module docstring), with their labels if known."""

    pooled: torch.Tensor  # N×D
    labels: torch.Tensor | None = None  # N int64
    fmap: torch.Tensor | None = None  # N×C×h×w
    tokens: torch.Tensor | None = None  # N×T×d
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def subset(self, index: torch.Tensor | Sequence[int]) -> "FeatureSet":
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return FeatureSet(self.pooled[index], pick(self.labels), pick(self.fmap), pick(self.tokens), dict(self.meta))


def pool_features(fmap: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The "pooled" view of ``qbheat.heads``: mean over h×w, then global token 0 appended if any."""
    pooled = fmap.mean(dim=(2, 3))  # B×C
    return pooled if tokens is None else torch.cat([pooled, tokens[:, 0]], dim=1)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray | torch.Tensor, preprocessing: ProbePreprocessing,
                     labels: np.ndarray | torch.Tensor | None = None, *, batch_size: int = 256, spatial: bool = False,
                     pool: str = "pooled", progress: bool = True, desc: str = "features") -> FeatureSet:
    """Frozen features of ``images`` (uint8) with ``backbone`` in eval mode; the training mode is restored after.

    ``pool``: "pooled" (default; see ``qbheat.heads``) or "embedding" (timm pre-logits).
    ``spatial=True`` also keeps the last feature map and global tokens (float32, on the CPU).
    """
    from tqdm import tqdm

    from qbheat.models import spatial_features

    if pool not in ("pooled", "embedding"):
        raise QBHeatError(f"pool must be 'pooled' or 'embedding', not {pool!r}.")
    x_all = as_uint8_chw(images)
    n = x_all.shape[0]
    if n == 0:
        raise QBHeatError("no images to extract features from.")
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    pooled, fmaps, tokens = [], [], []
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            x = preprocessing(x_all[start:start + batch_size]).to(device)
            if pool == "pooled" or spatial:
                fmap, tok = spatial_features(backbone, x)  # B×C×h×w, B×T×d | None
            if pool == "pooled":
                pooled.append(pool_features(fmap, tok).float().cpu())
            else:
                out = backbone.forward_features(x)
                pooled.append(backbone.forward_head(out, pre_logits=True).float().cpu())
            if spatial:
                fmaps.append(fmap.float().cpu())
                if tok is not None:
                    tokens.append(tok.float().cpu())
    finally:
        backbone.train(was_training)
    lab = None if labels is None else torch.as_tensor(np.array(labels), dtype=torch.long)
    if lab is not None and lab.shape[0] != n:
        raise QBHeatError(f"{n} images but {lab.shape[0]} labels.")
    return FeatureSet(
        pooled=torch.cat(pooled),
        labels=lab,
        fmap=torch.cat(fmaps) if spatial else None,
        tokens=torch.cat(tokens) if spatial and tokens else None,
        meta={"pool": pool, "input_size": list(preprocessing.input_size)},
    )


@torch.no_grad()
def recalibrate_untracked_batchnorm(backbone: nn.Module, images: np.ndarray | torch.Tensor, preprocessing: ProbePreprocessing,
                                    *, max_images: int = 2048, batch_size: int = 256, progress: bool = True,
                                    every_layer: bool = False) -> list[str]:
    """Estimate running statistics for the BatchNorm layers that pre-training never updated; return their names.

    With ``every_layer`` all BatchNorm layers get statistics of the probe's own inputs: QB-Heat's encoder
    trains on half-size quarter blocks, so its running statistics describe another resolution than the
    full images a probe or an exported head sees (weights stay untouched either way).

    A pretext task may leave part of the backbone unused: QB-Heat extrapolating stride-16 features never
    runs the last stage, so its BatchNorm layers keep their initial mean 0 / variance 1 whatever their inputs
    are. Frozen as they are, those layers pass on features whose scale is arbitrary, and a linear head fitted on
    them gets huge weights that INT8 and FP16 artifacts cannot reproduce. This pass (label-free, training images
    only) gives exactly those layers (``num_batches_tracked == 0``) the cumulative mean and variance of their
    inputs over up to ``max_images`` images; every other layer, and every weight, is left untouched.
    """
    from tqdm import tqdm

    bns = {name: m for name, m in backbone.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.num_batches_tracked is not None and (every_layer or int(m.num_batches_tracked) == 0)}
    if not bns:
        return []
    x_all = as_uint8_chw(images)[:max_images]
    if x_all.shape[0] == 0:
        raise QBHeatError("no images to recalibrate BatchNorm statistics with.")
    device = next(backbone.parameters()).device
    was_training, momenta = backbone.training, {n: m.momentum for n, m in bns.items()}
    backbone.eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for start in tqdm(range(0, x_all.shape[0], batch_size), desc="BatchNorm statistics", disable=not progress,
                          leave=False, dynamic_ncols=True):
            out = backbone.forward_features(preprocessing(x_all[start:start + batch_size]).to(device))
            backbone.forward_head(out, pre_logits=True)
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        backbone.train(was_training)
    return sorted(bns)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held_out) of a random split of ``n`` training items; the held-out part chooses hyper-parameters."""
    if not 0 < fraction < 1:
        raise QBHeatError(f"held-out fraction must lie in (0, 1), not {fraction}.")
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise QBHeatError(f"{n} training items are too few to hold out {fraction:.0%} of them.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
