"""Make torchvision 0.28.0 importable next to the CPU build of torch 2.13.0.

The only torchvision release that pins torch 2.13 is a CUDA build. Its ``_C`` extension links
CUDA libraries that CPU torch lacks, so none of its C++ ops register, and ``import torchvision``
then dies in ``torchvision/_meta_registrations.py`` on the two fake-kernel registrations that are
not guarded (``torchvision::nms`` and ``torchvision::qnms``). timm imports torchvision, so timm dies
the same way.

This module defines those two op schemas before torchvision is imported, and gives ``nms`` a
pure-torch CPU kernel so ``torch.ops.torchvision.nms`` works. Limits: ``torchvision.ops.nms``
(the Python wrapper) still refuses because it checks that the C++ extension loaded, and
``torchvision.io`` image decoding is unavailable; qbheat uses PIL and ``nms`` below instead.

Where torchvision loads normally (its extension loads with this torch), this module does nothing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in pure torch; returns kept indices by decreasing score.

    boxes: N×4 (x1, y1, x2, y2); scores: N.
    """
    order = torch.argsort(scores, descending=True)
    boxes = boxes[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)
    n = boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):  # N is small after score filtering; this is the reference O(N^2) form
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _torchvision_ops_missing() -> bool:
    """True when torchvision's ops are not registered and its own extension cannot register them.

    Before ``import torchvision`` the ops are absent even in a working install (a CUDA machine with
    the matching torch), so the extension is loaded here the way torchvision loads it: if that
    works, torchvision's own ``TORCH_LIBRARY`` owns the namespace and defining it here would clash.
    """
    try:
        torch.ops.torchvision.nms  # noqa: B018  (attribute lookup raises when the op is absent)
        return False
    except (AttributeError, RuntimeError):
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    for extension in sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so")):
        try:
            torch.ops.load_library(str(extension))
        except (OSError, RuntimeError):  # CPU torch + CUDA torchvision: CUDA libraries missing
            return True
        return False
    return True


def install() -> bool:
    """Define the missing schemas; return True if the shim was needed."""
    if not _torchvision_ops_missing():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms, "CPU")
    install.library = lib  # keep the Library alive; dropping it unregisters the schemas
    return True


SHIM_INSTALLED = install()
