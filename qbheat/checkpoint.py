"""Checkpoints: plain dicts of tensors and plain values, written atomically, read with weights_only.

Every qbheat checkpoint carries these keys (stages add their own next to them):

    format    "qbheat"                     marks the file as ours
    version   1                            bumped when the layout changes
    kind      "pretrain" | "probe" | "detector"
    model     {"name": timm model name, "kwargs": dict passed to timm.create_model}
    backbone  state_dict of the backbone (created with num_classes=0)
    method    pre-training method name ("qbheat", "mocov2", ...) or None for random init

A "probe"/"detector" checkpoint adds ``head`` = {"type", "kwargs", "state"}, ``labels`` and
``preprocessing`` (mean, std, input_size, interpolation) so that export can ship it as is.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from qbheat.errors import QBHeatError

FORMAT = "qbheat"
VERSION = 1
KINDS = ("pretrain", "probe", "detector")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save ``payload`` (must hold the common keys above) atomically."""
    missing = [k for k in ("kind", "model", "backbone") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    if payload["kind"] not in KINDS:
        raise ValueError(f"unknown checkpoint kind {payload['kind']!r}")
    full = {"format": FORMAT, "version": VERSION, "method": None, **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(full, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, *, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load a qbheat checkpoint with ``weights_only=True``; raise QBHeatError for anything a user can cause."""
    path = Path(path)
    if not path.is_file():
        raise QBHeatError(f"checkpoint {path} does not exist or is not a file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise QBHeatError(
            f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}); re-create it or pick another."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise QBHeatError(f"{path} is not a qbheat checkpoint (no 'format: qbheat' key).")
    if ckpt.get("version") != VERSION:
        raise QBHeatError(f"checkpoint {path} has layout version {ckpt.get('version')}; this qbheat reads version {VERSION}.")
    if kinds is not None and ckpt.get("kind") not in kinds:
        raise QBHeatError(f"checkpoint {path} is a {ckpt.get('kind')!r} checkpoint; expected one of {list(kinds)}.")
    return ckpt


def build_backbone(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Create the checkpoint's backbone (num_classes=0) and load its weights strictly."""
    from qbheat.models import create_model

    name, kwargs = ckpt["model"]["name"], dict(ckpt["model"].get("kwargs", {}))
    kwargs["num_classes"] = 0
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(ckpt["backbone"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e).strip() else str(e)[:200]
        raise QBHeatError(
            f"checkpoint weights do not fit model {name!r} ({first}); was it saved from another model?"
        ) from None
    return model
