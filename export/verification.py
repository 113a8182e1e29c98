"""Verifying a built artifact against PyTorch: the parity batches, one comparison, and what a failure does.

A format's ``verify_artifact`` (in its ``*_format`` module) records the result in the artifact's
card entry; ``parity`` is the check shared by the formats that run here (load → run at each of
``PARITY_BATCHES`` → ``qbheat_contract.parity.compare``). A failure goes through ``fail``: the first
diverging module is looked up (``export.localize``), the card entry is marked, and then, by the
recipe, the export stops (``ParityError``), the artifact is dropped (``Dropped``) or it is kept.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from qbheat.errors import QBHeatError
from qbheat_contract import parity as contract_parity

if TYPE_CHECKING:
    from export.context import ExportContext

PARITY_BATCHES = (1, 4)


class ParityError(QBHeatError):
    """An artifact is outside its tolerance; nothing was written."""


class Dropped(Exception):
    """An artifact outside its tolerance under ``drop_mismatch``."""


def min_cosine(results: dict) -> float:
    """The lowest cosine over the batches and outputs of one artifact's parity results."""
    return min(v.get("cosine_min", 1.0) for r in results.values() for v in r["outputs"].values())


def compare(ctx: ExportContext, batch: int, out: list, fmt: str, precision: str) -> dict:
    """Parity of one format's outputs on the first ``batch`` check images against PyTorch's."""
    return contract_parity.compare(ctx.src.task, ctx.src.variant, ctx.output_names, ctx.ref[batch], out, fmt, precision,
                                   nms=nms_fn(ctx))


def nms_fn(ctx: ExportContext):
    """The detector head's own NMS (parity compares detections after it), or None for other heads."""
    if ctx.src.task != "detector":
        return None
    head, size = ctx.deploy.head, ctx.pre.height

    def nms(boxes, scores):
        with torch.no_grad():
            out = head.nms(torch.as_tensor(np.asarray(boxes, np.float32)), torch.as_tensor(np.asarray(scores, np.float32)), size, size)
        return tuple(o.numpy() for o in out)

    return nms


def parity(ctx: ExportContext, fmt: str, precision: str, art: dict, load: Callable[[], Callable]) -> None:
    """Run the artifact (``load()`` gives its runner) at every parity batch and compare with PyTorch;
    a runtime that cannot load or run its own artifact is a failed check."""
    try:
        run = load()
    except Exception as e:  # noqa: BLE001  (a runtime that cannot load its own artifact is a failed check)
        fail(ctx, art, f"{fmt} {precision} does not load: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    results = {}
    for b in PARITY_BATCHES:
        try:
            out = run(ctx.check.inputs[:b])
        except Exception as e:  # noqa: BLE001  (a runtime that cannot run its own artifact is a failed check)
            fail(ctx, art, f"{fmt} {precision} does not run at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return
        results[f"batch{b}"] = compare(ctx, b, out, fmt, precision)
    record(ctx, fmt, precision, art, results)


def record(ctx: ExportContext, fmt: str, precision: str, art: dict, results: dict) -> None:
    """Store parity ``results`` ({"batch1": …, "batch4": …}) in the card entry; any failure → ``fail``."""
    art["verified"], art["parity"] = "parity", results
    failures = [f"batch {k[5:]}: {f}" for k, r in results.items() for f in r["failures"]]
    if failures:
        fail(ctx, art, f"{fmt} {precision} is outside its tolerance — " + "; ".join(failures[:4]))


def divergence(ctx: ExportContext, art: dict, images: np.ndarray) -> dict | None:
    """The first module of a failing ONNX artifact below its cosine tolerance (``export.localize``), or None."""
    from export import localize

    try:
        return localize.for_artifact(ctx.tmp / art["path"], art, ctx.deploy, images)
    except Exception:  # noqa: BLE001  (a diagnosis that cannot run must not hide the failure it explains)
        return None


def fail(ctx: ExportContext, art: dict, message: str) -> None:
    """Mark ``art`` as a mismatch; then stop the export, drop the artifact or keep it, as the recipe says."""
    div = divergence(ctx, art, ctx.check.inputs)
    if div is not None:
        from export.localize import describe

        art["divergence"] = div
        message += describe(div)
    art["notes"].append("MISMATCH: " + message)
    art["mismatch"] = True
    if ctx.recipe.drop_mismatch and not ctx.recipe.allow_mismatch:
        raise Dropped(message)
    if not ctx.recipe.allow_mismatch:
        raise ParityError(f"{message}; nothing was written (pass --allow-mismatch to keep it, recorded in the card).")
