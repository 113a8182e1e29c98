"""A method's default optimisation recipe; ``PretrainConfig`` fields left at None fall back to it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimRecipe:
    optimizer: str  # "adamw" or "sgd"
    base_lr: float  # learning rate for a global batch of 256; scaled linearly (Goyal et al., 2017)
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    momentum: float = 0.9  # SGD only
    warmup_fraction: float = 0.0  # share of the steps spent in linear warm-up
    grad_clip: float = 0.0  # max global gradient norm; 0 disables clipping
    decay_1d: bool = False  # also decay biases and normalisation parameters

    def lr_for(self, batch_size: int) -> float:
        return self.base_lr * batch_size / 256
