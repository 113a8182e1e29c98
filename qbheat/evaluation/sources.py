"""Where probes get their backbone and images from, and how their results are saved.

- ``load_backbone(checkpoint=..., model=...)``: a qbheat checkpoint (any kind; its backbone and
  preprocessing) or a timm model name at random initialisation (a reference row).
- ``classification_data(spec, split)``: Fashion-MNIST (``"fashion-mnist"``) or an ImageFolder
  tree with ``train/`` and ``val/`` (or ``test/``) sub-folders, as uint8 images + labels + class names.
- ``probe_payload(...)``: the "probe"/"detector" checkpoint that ``qbheat-export export`` ships:
  model, backbone, method, head {type, kwargs, state}, labels, preprocessing.
- ``write_json(path, obj)``: results written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qbheat.checkpoint import atomic_write_bytes, build_backbone, load_checkpoint
from qbheat_contract.hashing import file_sha256
from qbheat.errors import QBHeatError
from qbheat.evaluation.features import ProbePreprocessing

FASHION_MNIST_SIZE = 64  # px: the reproduction's resolution (28 px images upsampled; see the fashion-mnist configs)


@dataclass
class BackboneSource:
    backbone: nn.Module
    model: dict[str, Any]  # {"name", "kwargs"}
    method: str | None  # pre-training method, None for random init
    preprocessing: dict[str, Any] | None  # from the checkpoint, if it has one
    info: dict[str, Any]  # for results files: path + sha256, or model + seed


def load_backbone(checkpoint: str | os.PathLike | None = None, model: str | None = None, *, seed: int = 0,
                  model_kwargs: dict[str, Any] | None = None) -> BackboneSource:
    """The backbone of ``checkpoint`` (weights loaded strictly), or ``model`` freshly initialised with ``seed``."""
    if (checkpoint is None) == (model is None):
        raise QBHeatError("give exactly one of --checkpoint FILE or --model NAME.")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        backbone = build_backbone(ckpt)
        method = ckpt.get("method")
        return BackboneSource(backbone, {"name": ckpt["model"]["name"], "kwargs": dict(ckpt["model"].get("kwargs", {}))},
                              method, ckpt.get("preprocessing"),
                              {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint), "kind": ckpt.get("kind"),
                               "method": method, "model": ckpt["model"]["name"]})
    from qbheat.models import create_model

    kwargs = dict(model_kwargs or {})
    torch.manual_seed(seed)
    backbone = create_model(model, num_classes=0, **kwargs)
    return BackboneSource(backbone, {"name": model, "kwargs": kwargs}, None, None,
                          {"model": model, "init": "random", "seed": seed, "method": None})


def resolve_preprocessing(source: BackboneSource, data: str, image_size: int | None) -> ProbePreprocessing:
    """The checkpoint's recipe (mean, std, size), else the data's default size with ImageNet mean/std; ``image_size`` wins."""
    if source.preprocessing is not None:
        return ProbePreprocessing.from_dict(source.preprocessing, image_size)
    size = image_size or (FASHION_MNIST_SIZE if data == "fashion-mnist" else 224)
    return ProbePreprocessing(input_size=(3, size, size))


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A class-agnostic random subset of ``limit`` of ``n`` indices (sorted), or all of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise QBHeatError(f"a subset needs at least one image, not {limit}.")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def classification_data(spec: str, split: str, *, limit: int | None = None, seed: int = 0,
                        preprocessing: ProbePreprocessing | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images, int64 labels, class names) of ``split`` ("train" or "test").

    ImageFolder trees need ``train/`` and ``val/`` (or ``test/``) folders of class sub-folders; their
    images are resized and centre-cropped here to ``preprocessing``'s size so that they stack.
    """
    if split not in ("train", "test"):
        raise ValueError(split)
    if spec == "fashion-mnist":
        from qbheat.data import fashion_mnist

        images, labels = fashion_mnist.load(split)
        idx = _subset(len(images), limit, seed)
        return images[idx], labels[idx], list(fashion_mnist.CLASSES)
    from qbheat.data.image_folder import ImageFolderImages

    root = Path(spec).expanduser()
    names = ["train"] if split == "train" else ["val", "test"]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise QBHeatError(f"data folder {root} has no {' or '.join(n + '/' for n in names)} sub-folder; probes need "
                          "labelled train/ and val/ (or test/) ImageFolder trees, or --data fashion-mnist.")
    source = ImageFolderImages(folder)
    if source.labels is None:
        raise QBHeatError(f"images in {folder} are not in class sub-folders, so they have no labels to probe with.")
    pre = preprocessing or ProbePreprocessing(input_size=(3, 224, 224))
    idx = _subset(len(source), limit, seed)
    out = np.empty((len(idx), 3, *pre.input_size[1:]), dtype=np.uint8)
    for row, i in enumerate(idx):
        x = pre(source[int(i)][None])  # 1×3×H×W normalised
        mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
        out[row] = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)[0].numpy()
    return out, source.labels[idx], list(source.classes)


def probe_payload(source: BackboneSource, kind: str, head: nn.Module, labels: list[str], preprocessing: ProbePreprocessing,
                  results: dict[str, Any]) -> dict[str, Any]:
    """A "probe"/"detector" checkpoint: what ``qbheat-export export --checkpoint`` ships as it is."""
    from qbheat.heads import head_spec

    return {
        "kind": kind,
        "model": source.model,
        "backbone": {k: v.detach().cpu().clone() for k, v in source.backbone.state_dict().items()},
        "method": source.method,
        "head": head_spec(head),
        "labels": list(labels),
        "preprocessing": preprocessing.to_dict(),
        "results": json.loads(json.dumps(results)),  # plain values only
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
