"""What an export converts: the ``Source`` (backbone, head, labels, preprocessing, provenance) loaded
from a qbheat checkpoint or a timm name, and its ``torch.export`` program with a symbolic batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.calibration import Preprocessing
from export.deployable import check_variant
from export.recipe import NEW_HEAD_CLASSES, ExportRecipe
from qbheat.checkpoint import build_backbone, load_checkpoint
from qbheat.errors import QBHeatError
from qbheat.heads import build_head, head_from_spec
from qbheat_contract.hashing import file_sha256

CHECKPOINT_HEAD = {"probe": "classifier", "detector": "detector", "pretrain": "features"}


@dataclass
class Source:
    """The model an export starts from, as ``load_source`` found it.

    ``backbone`` (eval mode, before reparameterisation) and ``head`` (trained from a probe/detector
    checkpoint, else new) make the DeployableModel; ``task`` is the head's task (classifier, features,
    detector) and ``variant`` its checked output variant; ``labels`` the class names (None for
    features); ``pre`` the preprocessing; ``name`` the backbone's model name; ``method`` the
    pre-training method (None for a timm name); ``source`` the card's provenance block (kind, path,
    sha256); ``notes`` the card's sentences about what was assumed (random weights, new head, …).
    """

    backbone: torch.nn.Module
    head: torch.nn.Module
    task: str
    variant: str
    labels: list[str] | None
    pre: Preprocessing
    name: str
    method: str | None
    source: dict
    notes: list[str] = field(default_factory=list)


def load_source(recipe: ExportRecipe) -> Source:
    """Backbone, head, labels, preprocessing and provenance from a checkpoint or a timm name."""
    from qbheat.models import create_model

    notes: list[str] = []
    if recipe.checkpoint:
        ckpt = load_checkpoint(recipe.checkpoint)
        kind = ckpt["kind"]
        head_task = recipe.head or CHECKPOINT_HEAD[kind]
        backbone = build_backbone(ckpt)
        source = {"kind": "checkpoint", "path": str(Path(recipe.checkpoint).resolve()), "sha256": file_sha256(recipe.checkpoint),
                  "checkpoint_kind": kind}
        name = ckpt["model"]["name"]
        pre = Preprocessing.from_dict(ckpt["preprocessing"], recipe.image_size) if ckpt.get("preprocessing") \
            else Preprocessing.from_timm(backbone, recipe.image_size)
        method = ckpt.get("method")
        labels = list(ckpt["labels"]) if ckpt.get("labels") is not None else None
        trained = None
        if kind in ("probe", "detector") and "head" in ckpt:
            trained = head_from_spec(ckpt["head"])
            if getattr(trained, "task", None) != head_task and head_task != "features":
                raise QBHeatError(f"checkpoint {recipe.checkpoint} holds a {trained.task} head, but --head {head_task} was asked; "
                                  f"use --head {trained.task} or features.")
    else:
        head_task = recipe.head or "features"
        backbone = create_model(recipe.model, num_classes=0)
        source = {"kind": "timm", "path": None, "sha256": None}
        name, method, labels, trained = recipe.model, None, None, None
        pre = Preprocessing.from_timm(backbone, recipe.image_size)
        notes.append("backbone weights: random initialisation (timm name, no checkpoint; qbheat never downloads weights)")
    backbone.eval()
    if head_task == "features":
        head = build_head("features", backbone, image_size=pre.height)
        labels = None
    elif trained is not None:
        head = trained
        if labels is None or len(labels) != head.num_classes:
            n = head.num_classes
            if labels is not None:
                raise QBHeatError(f"checkpoint has {len(labels)} labels but its head predicts {n} classes; re-save the checkpoint.")
            labels = [f"class_{i}" for i in range(n)]
            notes.append("the checkpoint has no labels; class_<i> names were used")
    else:
        n = recipe.num_classes or NEW_HEAD_CLASSES[head_task]
        if head_task == "classifier":
            head = build_head(recipe.head_type, backbone, image_size=pre.height, num_classes=n)
        else:
            head = build_head("detector", backbone, image_size=pre.height, num_classes=n)
        labels = [f"class_{i}" for i in range(n)]
        notes.append(f"head: new, untrained {head.head_type} ({n} classes); export a probe/detector checkpoint to ship a trained head")
    variant = check_variant(head_task, recipe.head_variant)
    return Source(backbone=backbone, head=head, task=head_task, variant=variant, labels=labels, pre=pre, name=name,
                  method=method, source=source, notes=notes)


def export_program(model: torch.nn.Module, size: int, max_batch: int, dynamic: bool = True):
    """``torch.export`` with an example batch of 2 and a symbolic batch (asserted)."""
    example = torch.zeros(2 if dynamic else 1, 3, size, size)
    shapes = {"image": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic else None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001  (torch.export raises many types; the user needs one sentence)
        raise QBHeatError(f"torch.export could not capture the model ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    if dynamic:
        placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
        dim0 = placeholder.meta["val"].shape[0]
        if not isinstance(dim0, torch.SymInt):
            raise QBHeatError("torch.export fixed the batch dimension; the model cannot ship with a dynamic batch.")
    return program, example


def count_macs(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(params, MACs) at batch 1: MACs = FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    params = sum(p.numel() for p in model.parameters())
    return int(params), int(counter.get_total_flops() // 2)
