"""Momentum (exponential moving average) encoders, as used by MoCo and its successors.

MoCo (He et al., 2020, arXiv 1911.05722, Eq. 2): θ_k ← m·θ_k + (1 − m)·θ_q, applied to the key
encoder's parameters after every step, with m = 0.999. The key encoder's buffers (BatchNorm
running statistics) are not averaged; they follow the key encoder's own forward passes, as in MoCo.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` to serve as its momentum (key) encoder."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update_(target: nn.Module, online: nn.Module, m: float) -> None:
    """In place: every parameter of ``target`` becomes m·target + (1 − m)·online (MoCo Eq. 2)."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("momentum encoder and online encoder have different parameter lists")
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - m)


def momentum_at(base: float, progress: float, schedule: str = "constant") -> float:
    """The momentum m at training progress ∈ [0, 1].

    "constant": m = base, as in MoCo v1/v2. "cosine": m rises from ``base`` to 1 along a half
    cosine, as in BYOL (Grill et al., 2020) and MoCo v3; offered as an option, not MoCo-v2's recipe.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown momentum schedule {schedule!r}")
