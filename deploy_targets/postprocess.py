"""Postprocessing as a deployed app does it, for the end-to-end timing.

(Preprocessing — decode, resize, crop, normalise — is the model card's block, applied by
``qbheat_contract.preprocessing.Preprocessing``.) Postprocessing for a classifier is softmax + top-k;
for embeddings an L2 normalisation; detector outputs are passed through (their decode lives with the
detector head). numpy only.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def postprocess(outputs: dict[str, np.ndarray], head_type: str, labels: list[str] | None = None, k: int = 5) -> list[Any]:
    """What an app does with the outputs: top-k (label, probability) per image for a classifier."""
    first = next(iter(outputs.values()))
    if head_type == "classifier":
        probs = softmax(first.reshape(first.shape[0], -1).astype(np.float32))
        k = min(k, probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        return [[(labels[j] if labels and j < len(labels) else int(j), float(p[j])) for j in row] for p, row in zip(probs, top)]
    if head_type == "features":
        flat = first.reshape(first.shape[0], -1)
        return list(flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12))
    return [outputs]
