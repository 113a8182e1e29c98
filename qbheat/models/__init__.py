"""Backbones. Importing this package registers qbheat's models with timm's registry.

Every backbone is a timm model: create it with ``create_model("mobileformer_294m")`` (or
``timm.create_model``), and any other timm model name works too.
"""
from __future__ import annotations

import torch
import timm

from qbheat.errors import QBHeatError
from qbheat.models import hcnet, mobileformer  # noqa: F401  (register_model side effects)


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` that never downloads and turns an unknown name into a QBHeatError."""
    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*")][:5]
        hint = f" Did you mean one of {close}?" if close else " Run 'qbheat models' to list them."
        raise QBHeatError(f"unknown model {name!r}.{hint}")
    kwargs.setdefault("pretrained", False)
    if kwargs["pretrained"]:
        raise QBHeatError("qbheat never downloads weights; pass a local checkpoint instead of pretrained=True.")
    return timm.create_model(name, **kwargs)


def spatial_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (local feature map B×C×h×w, global tokens B×T×d or None) for any timm backbone.

    Mobile-Former's ``forward_features`` returns both; a CNN returns only the map. Models whose
    ``forward_features`` returns a token sequence (ViTs) are not spatial and are refused.
    """
    out = model.forward_features(x)
    if isinstance(out, (tuple, list)):
        fmap, tokens = out
    else:
        fmap, tokens = out, None
    if fmap.ndim != 4:
        raise QBHeatError(
            f"model {type(model).__name__} has no spatial feature map (forward_features gave {tuple(fmap.shape)}); "
            "pick a convolutional or Mobile-Former backbone."
        )
    return fmap, tokens


def feature_indices(model: torch.nn.Module, strides: tuple[int, ...] = (8, 16, 32)) -> list[int]:
    """Indices into ``model.feature_info`` of the last feature level at each requested stride."""
    info = model.feature_info
    by_stride = {}
    for i, f in enumerate(info):
        by_stride[f["reduction"]] = i  # later entries at the same stride win (deepest level)
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise QBHeatError(f"model {type(model).__name__} has no feature level at stride {missing}; it offers {sorted(by_stride)}.")
    return [by_stride[s] for s in strides]


def multiscale_features(model: torch.nn.Module, x: torch.Tensor, strides: tuple[int, ...] = (8, 16, 32)) -> list[torch.Tensor]:
    """Feature maps of one backbone instance at the given strides, through timm's ``forward_intermediates``.

    Works on the same module that classification and pre-training use, so a detector can sit on a
    frozen pre-trained backbone without re-creating it with ``features_only=True``.
    """
    return model.forward_intermediates(x, indices=feature_indices(model, strides), intermediates_only=True)
