"""Weighted k-nearest-neighbour classification on frozen embeddings (cosine similarity).

The protocol of Wu et al. 2018 ("Unsupervised feature learning via non-parametric instance
discrimination", §3.4), as DINO and solo-learn run it: embeddings are L2-normalised; each query's
k most similar training embeddings vote for their class with weight exp(s / T), s being the
cosine similarity; the class with the largest summed weight wins. Two settings are standard:
k = 20, T = 0.07 (InstDisc, DINO) and k = 200, T = 0.1 (InstDisc's ImageNet setting).
There is nothing to tune, so kNN uses the whole training set as its memory bank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qbheat.errors import QBHeatError

SETTINGS = ((20, 0.07), (200, 0.1))  # (k, T)


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, *, k: int, temperature: float,
                num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores Q×K of each query (row-normalised vote weights); argmax is the prediction.

    train N×D, train_labels N, queries Q×D. Queries run in chunks so the Q×N similarity never
    has to fit at once. Ties in similarity are broken by ``topk`` (lowest index first is not guaranteed).
    """
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise QBHeatError(f"kNN needs N×D train and Q×D query embeddings, got {tuple(train.shape)} and {tuple(queries.shape)}.")
    if k < 1 or temperature <= 0:
        raise QBHeatError(f"kNN needs k ≥ 1 and temperature > 0, not k={k}, T={temperature}.")
    num_classes = int(num_classes if num_classes is not None else train_labels.max() + 1)
    k = min(k, train.shape[0])
    bank = F.normalize(train.float(), dim=1)  # N×D
    labels = train_labels.long()
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)  # q×D
        sim, idx = (q @ bank.T).topk(k, dim=1)  # q×k
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out)


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, *,
                 k: int, temperature: float, num_classes: int | None = None) -> float:
    """Top-1 accuracy (0–1) of the weighted kNN classifier."""
    scores = knn_predict(train, train_labels, test, k=k, temperature=temperature, num_classes=num_classes)
    return float((scores.argmax(dim=1) == test_labels.long()).float().mean())


def run_knn(train, test, settings=SETTINGS, num_classes: int | None = None) -> dict[str, float]:
    """Accuracies for each (k, T) of ``settings`` on two ``FeatureSet``s: {"knn_k20_t0.07": acc, ...}."""
    if train.labels is None or test.labels is None:
        raise QBHeatError("kNN needs labelled training and test features.")
    return {f"knn_k{k}_t{t:g}": knn_accuracy(train.pooled, train.labels, test.pooled, test.labels, k=k, temperature=t,
                                            num_classes=num_classes)
            for k, t in settings}
