"""A small synthetic image set for tests and smoke runs (no files, no download).

Each image is a deterministic function of (seed, index): a coloured sinusoidal grating whose
orientation encodes the class (``index % num_classes``), plus two soft Gaussian blobs and a
little noise. Gratings continue smoothly across the image, so a quarter block does carry
information about the other three; blobs give local structure.
"""
from __future__ import annotations

import numpy as np
import torch


class SyntheticImages:
    """``len`` images, each a uint8 3×size×size tensor; ``labels[i]`` is its orientation class."""

    def __init__(self, n: int = 512, size: int = 64, num_classes: int = 4, seed: int = 0):
        if n < 1 or size < 4 or num_classes < 1:
            raise ValueError("synthetic set needs n ≥ 1, size ≥ 4, num_classes ≥ 1")
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed
        self.labels = np.arange(n, dtype=np.int64) % num_classes
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self._grid = (yy, xx)

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> np.ndarray:
        """H×W×3 float32 in [0, 1]."""
        rng = np.random.default_rng([self.seed, index])
        yy, xx = self._grid
        angle = np.pi * (self.labels[index] + rng.uniform(-0.15, 0.15)) / self.num_classes
        freq = rng.uniform(2.0, 5.0)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        colour_a, colour_b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = wave[..., None] * colour_a + (1 - wave[..., None]) * colour_b
        for _ in range(2):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + blob * rng.uniform(0, 1, 3)
        img = img + rng.normal(0, 0.02, img.shape)
        return np.clip(img, 0, 1).astype(np.float32)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return torch.from_numpy((self.image(index) * 255 + 0.5).astype(np.uint8)).permute(2, 0, 1).contiguous()
