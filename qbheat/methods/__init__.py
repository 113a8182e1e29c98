"""Self-supervised pre-training methods: the one registry, name → class.

A method is one file whose class registers itself with ``@register_method("name")`` (as heads use
``@register_head`` and additions ``@register_addition``) and carries its options as ``Config``,
which ``qbheat.config.PretrainConfig`` takes as its section ``name``; the file is imported at the end
of this package.

A method is an ``nn.Module`` built around a timm backbone (``method.backbone``, created with
num_classes=0; that module is what checkpoints store under ``backbone`` and what export ships):

    method = build_method(config, backbone)
    out = method(batch)            # batch: list of views, each B×3×H×W
    out["loss"]                    # scalar to minimise
    out["embeddings"]              # list, one pooled B×F tensor per online view, with gradients
    out["features"]                # list, the encoder output each embedding was pooled from
                                   # (a B×C×h×w map, a (map, tokens) pair, or ViT tokens B×N×C)
    out["target_inputs"]           # list, per online view: the images a teacher / delayed encoder
                                   # should encode (the other view, or the same input)
    method.features(x, backbone)   # (encoder output, pooled B×F) of ``x`` through ``backbone``
                                   # (default: method.backbone), the way the method encodes
    method.after_step(progress)    # after each optimizer step (momentum updates); progress ∈ (0, 1]

Each class also offers ``Config`` (its typed options, a section of ``PretrainConfig``),
``num_views``, ``view_transform(config)`` (the augmentation that makes its views from a uint8 batch and a
generator, ``qbheat.data.transforms``), ``recipe``
(its default optimiser settings), ``ddp_find_unused_parameters``, ``embedding_dim`` (F) and
``encoder_input_size(image_size)``. A method with a momentum encoder also returns
``out["momentum_embeddings"]`` (its key encoder's pooled features of ``target_inputs``).
State that must survive a resume (queues, momentum encoders) lives in registered buffers and
submodules.

Additions composed with any method (``qbheat.train.Objective``) have their own registry of the same
kind, ``qbheat.additions`` (``@register_addition``): regularizers such as MSBReg, ``loss = method_loss +
Σ reg(out)``, and HSSL's heterogeneous auxiliary head, switched on by ``hssl.enabled``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from qbheat.errors import QBHeatError

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

METHODS: dict[str, type[nn.Module]] = {}


def register_method(name: str):
    """Decorator: make a method class (with its ``Config``, the ``PretrainConfig`` section ``name``)
    available as ``method: name``. A new method is one file that registers itself, imported below."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        return cls
    return add


def method_class(name: str) -> type[nn.Module]:
    if name not in METHODS:
        raise QBHeatError(f"unknown pre-training method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def build_method(config: "PretrainConfig", backbone: nn.Module) -> nn.Module:
    """The configured method around ``backbone``."""
    return method_class(config.method).from_config(config, backbone)


# the method files register themselves (they import register_method from here, so they come last)
from qbheat.methods.mocov2 import MoCoV2  # noqa: E402
from qbheat.methods.qbheat import QBHeat  # noqa: E402

__all__ = ["METHODS", "MoCoV2", "QBHeat", "build_method", "method_class", "register_method"]
