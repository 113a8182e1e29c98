"""Additions: terms composed with any pre-training method (the one registry, name → class).

``loss = method_loss + Σ addition(out)``, never woven into a method (lightly's pattern). An
addition is one file in this package whose class registers itself with
``@register_addition("name")`` (as methods use ``@register_method``), carries its options as
``Config`` (the ``PretrainConfig`` section ``name``; None when it has none) and is built by
``from_config(config, method)``. The package imports every module in it, so adding an addition
is adding a file (plus its typed section in ``PretrainConfig`` when it has options).

The built module's call on the method's output dict returns a dict with "loss" (already weighted)
and, optionally, more scalars that the loop logs as ``<name>_<key>``. A module that keeps
momentum state also defines ``after_step(progress)``, called after every optimizer step.

What an addition may read from the method's output dict (see ``qbheat.methods``):
``embeddings`` (pooled online features per view, with gradients), ``features`` (the encoder
outputs they were pooled from), ``target_inputs`` (the images a delayed encoder should see, one
per online view) and, for methods with a momentum encoder, ``momentum_embeddings``.

How an addition is switched on is its ``kind`` (the config keys users already write):

- ``"regularizer"`` (default): listed by name in ``PretrainConfig.regularizers`` (``--regularizer``);
  its module lives in ``Objective.regularizers[name]``, its state in the checkpoint's "regularizers".
- ``"head"``: its section's ``enabled`` field (``hssl.enabled``, ``--hssl``); its module is
  ``Objective.<name>``, its state the checkpoint's ``<name>`` entry.

Built-in: ``hssl`` (head, ``qbheat.additions.hssl``) and ``msbreg`` (regularizer, ``qbheat.additions.msbreg``).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable

from torch import nn

from qbheat.errors import QBHeatError

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

KINDS = ("regularizer", "head")
ADDITIONS: dict[str, type[nn.Module]] = {}


def register_addition(name: str, kind: str = "regularizer") -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Decorator: make an addition class (with ``Config`` and ``from_config(config, method)``)
    available as ``name``; ``kind`` says how it is switched on (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"addition kind must be one of {list(KINDS)}, not {kind!r}")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ADDITIONS and ADDITIONS[name] is not cls:
            raise ValueError(f"addition {name!r} is registered twice")
        cls.kind = kind
        ADDITIONS[name] = cls
        return cls
    return add


def names_of(kind: str) -> list[str]:
    """The registered additions of one kind, sorted."""
    return sorted(n for n, cls in ADDITIONS.items() if cls.kind == kind)


def enabled_additions(config: "PretrainConfig") -> list[str]:
    """The additions ``config`` switches on, in the order their terms are added: the heads whose
    section is enabled, then ``config.regularizers`` in the order listed."""
    heads = [n for n in names_of("head") if getattr(getattr(config, n, None), "enabled", False)]
    return heads + list(config.regularizers)


def build_additions(config: "PretrainConfig", method: nn.Module) -> dict[str, nn.Module]:
    """The switched-on additions around ``method``, name → module, in ``enabled_additions`` order."""
    out: dict[str, nn.Module] = {}
    for name in enabled_additions(config):
        if name not in ADDITIONS or (name in config.regularizers and ADDITIONS[name].kind != "regularizer"):
            raise QBHeatError(f"unknown regularizer {name!r}; available: {names_of('regularizer') or 'none yet'}.")
        out[name] = ADDITIONS[name].from_config(config, method)
    return out


# every module in this package registers its addition (they import register_addition, so they come last)
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ADDITIONS", "KINDS", "build_additions", "enabled_additions", "names_of", "register_addition"]
