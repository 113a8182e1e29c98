"""``model_card.json``: the contract between export and everything downstream.

One card describes one export folder. It is plain JSON with a versioned schema; deploy_targets,
bundles and the mobile snippets read it through ``read_model_card`` (this module, torch-free: bundles ship it).

Schema ``qbheat.model_card/2`` (keys marked * are required; ``/1`` cards, which lack the accuracy
keys below, are still read, and a card rewritten by ``qbheat-export eval`` becomes ``/2``)::

    schema*          "qbheat.model_card/2"
    created*         ISO-8601 UTC time
    model*           {name, source: {kind: "checkpoint"|"timm", path, sha256}, pretrain_method,
                      params, macs, flops}          # MACs and FLOPs from PyTorch, FLOPs = 2 × MACs
    head*            {type: "classifier"|"detector"|"features", variant, labels: [..]|null}
    preprocessing*   {input_size: [3, H, W], mean: [..], std: [..], interpolation, crop_pct,
                      color: "RGB", pixel_scale: 1/255, layout: "NCHW"}
    io*              {inputs: [{name, shape, dtype}], outputs: [{name, shape, dtype}]}
                     (a symbolic dimension is a string, e.g. "batch")
    artifacts*       [{format: "onnx"|"openvino"|"coreml"|"tensorrt"|..., precision: "fp32"|"fp16"|"int8",
                       path (relative to the card), sha256, size_bytes, opset|null,
                       verified: "parity"|"spec-only"|"not-run", parity: {...}|null,
                       fp32_pinned: [..], notes: [..]}]
    tools*           {package: version}
    fp16_guard       {checked_on: int, overflowing: [..]}

Optional keys written by ``export.pipeline`` (additive; readers may ignore them)::

    artifacts[].files      [{path, sha256, size_bytes}] when an artifact is several files (OpenVINO .xml + .bin,
                           TensorRT engine + sidecar JSON); ``path``/``sha256`` then name the main file
    artifacts[].spec       Core ML spec check on Linux: {spec_version, outputs, ops, op_count, metadata, problems, passed}
    artifacts[].mismatch   true when kept outside tolerance under --allow-mismatch
    head.head_type, head.kwargs   the registered head (qbheat.heads) and its constructor arguments
    calibration            {source, count, sha256 of the uint8 images}
    parity_images          {source, count, sha256, batches}
    parity_tolerances      the tolerance table used (qbheat_contract.parity)
    not_built              [{format, precisions, reason, onnx_check, int8_qdq_check}] requested but impossible here
                           (e.g. TensorRT: its FP32 ONNX source checked against the parser; with INT8, the Q/DQ
                           source checked too and run on ONNX Runtime: {file, notes, check, onnxruntime_parity,
                           min_cosine, passed})
    allow_mismatch, notes, timings_s, recipe

Added in ``/2`` (``qbheat-export eval`` and the export's ``--eval-data`` gate)::

    evaluation             {data: {source, count, sha256}, task, metric, pytorch: {top1, top5, n}, bootstrap:
                            {resamples, confidence, seed, method}, max_drop|null, created}
    artifacts[].accuracy   {top1, top5, drop_top1, drop_top1_ci: [lo, hi], drop_top5, drop_top5_ci, n, within_budget|null}
                           or {skipped: reason} where the artifact cannot run here
    detector heads (evaluation.task "detection"; additive, same schema):
    evaluation             {data, task: "detection", metric, pytorch: {mAP, AP50, AP75, detections, n},
                            bootstrap: {resamples, confidence, seed, method}, max_drop|null, created}
    artifacts[].accuracy   {mAP, AP50, AP75 (%), detections, drop_mAP (points), drop_mAP_ci: [lo, hi], n, within_budget|null}
                           (cards written before the interval existed lack drop_mAP_ci and evaluation.bootstrap)
    artifacts[].divergence / not_built[].divergence
                           {module, cosine, tolerance, onnx_node, compared}: the first module whose intermediate
                           output falls below the cosine tolerance, where a parity or accuracy check failed
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCHEMA = "qbheat.model_card/2"
READABLE = ("qbheat.model_card/1", SCHEMA)  # older cards stay readable
REQUIRED = ("schema", "created", "model", "head", "preprocessing", "io", "artifacts", "tools")
FILENAME = "model_card.json"


class ModelCardError(ValueError):
    """The model card is missing, unreadable or of another schema."""


def validate(card: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(card, dict):
        raise ModelCardError("model card must be a JSON object")
    if card.get("schema") not in READABLE:
        raise ModelCardError(f"model card schema is {card.get('schema')!r}; this reader understands {' and '.join(map(repr, READABLE))}")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ModelCardError(f"model card lacks the keys {missing}")
    for a in card["artifacts"]:
        for k in ("format", "precision", "path", "sha256"):
            if k not in a:
                raise ModelCardError(f"an artifact entry lacks {k!r}: {a}")
    return card


def read_model_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a model card; ``path`` may be the JSON file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelCardError(f"no model card at {path}") from None
    except json.JSONDecodeError as e:
        raise ModelCardError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return validate(card)


def write_model_card(folder: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Validate and write ``card`` into ``folder`` atomically; return the file's path."""
    validate(card)
    path = Path(folder) / FILENAME
    tmp = path.with_name(f".{FILENAME}.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def artifact_path(card_path: str | os.PathLike, artifact: dict[str, Any]) -> Path:
    """Absolute path of an artifact entry (paths in the card are relative to the card's folder)."""
    card_path = Path(card_path)
    folder = card_path if card_path.is_dir() else card_path.parent
    return folder / artifact["path"]
