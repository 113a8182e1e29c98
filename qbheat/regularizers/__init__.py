"""Regularizers: additive loss terms composed with any pre-training method (the one registry).

``loss = method_loss + Σ regularizer(out)``, never woven into a method (lightly's pattern). A
regularizer factory takes ``(config, method)`` and returns an ``nn.Module`` whose call on the
method's output dict returns a dict with "loss" (already weighted) and, optionally, more scalars
that the loop logs as ``<name>_<key>``. A module that keeps momentum state also defines
``after_step(progress)``, called after every optimizer step.

What a regularizer may read from the method's output dict (see ``qbheat.methods``):
``embeddings`` (pooled online features per view, with gradients), ``features`` (the feature maps
they were pooled from), ``target_inputs`` (the images a delayed encoder should see, one per online
view) and, for methods with a momentum encoder, ``momentum_embeddings``.

Register one with ``@register_regularizer("name")``; ``PretrainConfig.regularizers`` lists the
names to use. Built-in: ``msbreg`` (``qbheat.regularizers.msbreg``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

from qbheat.errors import QBHeatError

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

RegularizerFactory = Callable[["PretrainConfig", nn.Module], nn.Module]
REGULARIZERS: dict[str, RegularizerFactory] = {}


def register_regularizer(name: str, config: type | None = None) -> Callable[[RegularizerFactory], RegularizerFactory]:
    """Decorator: make ``factory(config, method) -> nn.Module`` available as ``regularizers: [name]``;
    ``config``: its options' dataclass, the ``PretrainConfig`` section ``name`` (kept as ``factory.Config``)."""
    def add(factory: RegularizerFactory) -> RegularizerFactory:
        if name in REGULARIZERS and REGULARIZERS[name] is not factory:
            raise ValueError(f"regularizer {name!r} is registered twice")
        factory.Config = config
        REGULARIZERS[name] = factory
        return factory
    return add


def build_regularizers(config: "PretrainConfig", method: nn.Module) -> nn.ModuleDict:
    """The configured regularizers, in config order."""
    regs = nn.ModuleDict()
    for name in config.regularizers:
        if name not in REGULARIZERS:
            raise QBHeatError(f"unknown regularizer {name!r}; available: {sorted(REGULARIZERS) or 'none yet'}.")
        regs[name] = REGULARIZERS[name](config, method)
    return regs


from qbheat.regularizers import msbreg  # noqa: E402,F401  (registers "msbreg")

__all__ = ["REGULARIZERS", "build_regularizers", "register_regularizer"]
