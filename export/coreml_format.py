"""Core ML ML Program (.mlpackage) from the ExportedProgram.

* Input: ``ImageType`` (RGB, 1×3×H×W) with the normalisation baked in. Core ML's ImageType has one
  scale for all channels, so ``scale = 1/(255·s̄)`` and ``bias_c = −mean_c/s̄`` with s̄ the mean of
  the three stds, and the graph starts with a per-channel factor s̄/std_c (``ChannelRescale``) —
  exact, where the usual single-scale approximation is off by up to ~2 % per channel (ours).
* Classifiers: the ``probabilities`` variant (softmax) with ``ClassifierConfig(labels)``, so Xcode
  and Vision see a classifier (``classLabel`` + probabilities dictionary).
* Precision: FP16 by default (``FP16ComputePrecision``; ops from guard-flagged modules excluded),
  FP32 on request, and "int8" = 8-bit linear weight quantisation of the FP16 program
  (``linear_quantize_weights``; activations stay FP16 — Core ML has no calibrated activation INT8).
* ``MINIMUM_DEPLOYMENT_TARGET`` = iOS 17 / macOS 14 (ML Program v8, needed for int8 weights on all ops).
* Metadata: author, short description, version, ``user_defined_metadata``.

On Linux ``predict`` is unavailable: ``verify_spec`` reloads the saved package without compiling
it and checks the input type and size, the outputs, and lists the MIL ops (verified "spec-only").
On macOS ``runner`` predicts and parity is checked like the other formats.

``build_artifact`` and ``verify_artifact`` are the format's entries in ``export.formats.BUILDERS``.
The static-batch program is exported once per export and converted for each precision; with FP16 and
INT8 both asked for, INT8 quantises the FP16 model's weights instead of converting again (that state
is the context's ``coreml_*`` fields).
"""
from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qbheat_contract import parity as contract_parity

MINIMUM_DEPLOYMENT_TARGET = "iOS17"  # = macOS14 / watchOS10 / tvOS17


class ChannelRescale(nn.Module):
    """``model(image · gain)`` with gain_c = s̄/std_c: turns ImageType's shared scale into per-channel std."""

    def __init__(self, model: nn.Module, std: tuple[float, float, float]):
        super().__init__()
        self.model = model
        mean_std = sum(std) / 3
        self.register_buffer("gain", torch.tensor([mean_std / s for s in std]).view(1, 3, 1, 1))
        self.exact = all(abs(s - mean_std) < 1e-12 for s in std)
        self.output_names = getattr(model, "output_names", None)

    def forward(self, image: torch.Tensor):
        return self.model(image if self.exact else image * self.gain)


def _clamp_tensor(x: torch.Tensor, min: torch.Tensor | None = None, max: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
    """``clamp`` with tensor bounds as minimum/maximum: coremltools 9's ``clamp`` converter takes only
    scalar bounds and fails on Mobile-Former's fused DyReLU (``clamp(u, lo, hi)`` with per-channel bounds)."""
    if max is not None:
        x = torch.minimum(x, max)
    if min is not None:
        x = torch.maximum(x, min)
    return x


COREML_DECOMPOSITIONS = {torch.ops.aten.clamp.Tensor: _clamp_tensor}


def image_type(pre, input_name: str):
    import coremltools as ct

    s = sum(pre.std) / 3
    return ct.ImageType(name=input_name, shape=(1, 3, pre.height, pre.width), scale=1.0 / (255.0 * s),
                        bias=[-m / s for m in pre.mean], color_layout=ct.colorlayout.RGB)


def decompose(program):
    """The ExportedProgram in the ops Core ML's converter reads; done once, shared by every precision."""
    return program.run_decompositions(COREML_DECOMPOSITIONS)


def convert(program, pre, input_name: str, output_names: tuple[str, ...], precision: str,
            labels: list[str] | None, metadata: dict[str, str], fp32_modules: list[str] = (), pinned_out: list | None = None):
    """ExportedProgram (of a ``ChannelRescale``-wrapped model, after ``decompose``) → MLModel at ``precision``.

    ``fp32_modules``: module paths the FP16 guard flagged; their ops stay FP32 (names appended to ``pinned_out``).
    """
    import coremltools as ct

    from export.fp16_guard import pinned_node_names

    fp32_ops = pinned_node_names(program, list(fp32_modules)) if precision != "fp32" else set()
    pinned_out = pinned_out if pinned_out is not None else []

    kwargs = {}
    if labels is not None:
        kwargs["classifier_config"] = ct.ClassifierConfig(list(labels))
    else:
        kwargs["outputs"] = [ct.TensorType(name=n) for n in output_names]
    if precision == "fp32":
        compute = ct.precision.FLOAT32
    else:
        def op_selector(op) -> bool:  # True = cast this op to FP16
            pinned = any(op.name == n or op.name.startswith(n + "_") for n in fp32_ops)
            if pinned:
                pinned_out.append(op.name)
            return not pinned

        compute = ct.transform.FP16ComputePrecision(op_selector=op_selector)
    mlmodel = ct.convert(program, inputs=[image_type(pre, input_name)], convert_to="mlprogram",
                         compute_precision=compute, minimum_deployment_target=getattr(ct.target, MINIMUM_DEPLOYMENT_TARGET),
                         skip_model_load=sys.platform != "darwin", **kwargs)
    if precision == "int8":
        fp16, mlmodel = mlmodel, quantize_weights_int8(mlmodel)
        discard(fp16)
    mlmodel.author = metadata.get("author", "qbheat-export")
    mlmodel.short_description = metadata.get("description", "")
    mlmodel.version = metadata.get("version", "")
    for k, v in metadata.items():
        mlmodel.user_defined_metadata[str(k)] = str(v)
    if labels is not None:
        mlmodel.user_defined_metadata["com.apple.coreml.model.preview.type"] = "imageClassifier"
    return mlmodel


def quantize_weights_int8(mlmodel):
    """8-bit symmetric linear weight quantisation of an (FP16) ML Program; returns a new MLModel."""
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
    return cto.linear_quantize_weights(mlmodel, config=config)


def set_metadata(mlmodel, metadata: dict[str, str]) -> None:
    for k, v in metadata.items():
        mlmodel.user_defined_metadata[str(k)] = str(v)


def discard(mlmodel) -> None:
    """Delete the temporary .mlpackage an in-memory ML Program lives in.

    coremltools removes it only at interpreter exit (an ``atexit`` hook), which a forked export
    worker never runs (it ends with ``os._exit``), so every build there would leave a package in
    the temporary folder. The model must not be used afterwards.
    """
    path = getattr(mlmodel, "package_path", None)
    if getattr(mlmodel, "is_temp_package", False) and path and os.path.isdir(path):
        shutil.rmtree(path)


def save(mlmodel, path: str | os.PathLike) -> Path:
    path = Path(path)
    mlmodel.save(str(path))
    return path


def verify_spec(path: str | os.PathLike, input_name: str, size: int, expect_outputs: list[str]) -> dict:
    """Reload the saved package (no compilation) and check what a Linux machine can check."""
    import coremltools as ct

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')}, not mlProgram")
    inputs = {i.name: i for i in spec.description.input}
    if input_name not in inputs:
        problems.append(f"input {input_name!r} missing (has {sorted(inputs)})")
    else:
        t = inputs[input_name].type
        if t.WhichOneof("Type") != "imageType":
            problems.append(f"input {input_name!r} is {t.WhichOneof('Type')}, not an image")
        elif (t.imageType.width, t.imageType.height) != (size, size):
            problems.append(f"input image is {t.imageType.width}×{t.imageType.height}, not {size}×{size}")
    outputs = [o.name for o in spec.description.output]
    missing = [n for n in expect_outputs if n not in outputs]
    if missing:
        problems.append(f"outputs {missing} missing (has {outputs})")
    ops: Counter = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
    if not ops:
        problems.append("the ML Program has no operations")
    return {"spec_version": spec.specificationVersion, "outputs": outputs, "ops": dict(sorted(ops.items())),
            "op_count": int(sum(ops.values())), "metadata": dict(spec.description.metadata.userDefined),
            "problems": problems, "passed": not problems}


def runner(path: str | os.PathLike, labels: list[str] | None, output_names: tuple[str, ...], input_name: str):
    """macOS only: a function uint8 images N×H×W×3 → outputs stacked like the PyTorch ones."""
    import coremltools as ct
    from PIL import Image

    model = ct.models.MLModel(str(path))
    prob_key = next((o.name for o in model.get_spec().description.output if o.type.WhichOneof("Type") == "dictionaryType"), None)

    def run(images_u8: np.ndarray) -> list[np.ndarray]:
        rows = []
        for img in images_u8:
            out = model.predict({input_name: Image.fromarray(img)})
            if labels is not None:
                rows.append([np.asarray([out[prob_key][lab] for lab in labels], np.float32)])
            else:
                rows.append([np.asarray(out[n])[0] for n in output_names])
        return [np.stack([r[i] for r in rows]) for i in range(len(rows[0]))]

    return run


def build_artifact(ctx, precision: str) -> dict:
    """The .mlpackage of ``precision`` (``ctx``: export.context.ExportContext); its card record."""
    from export.deployable import DeployableModel
    from export.source import export_program

    if ctx.coreml_program is None:
        variant = "probabilities" if ctx.src.task == "classifier" else ctx.src.variant
        model = ChannelRescale(DeployableModel(ctx.deploy.backbone, ctx.deploy.head, variant), ctx.pre.std)
        program, _ = export_program(model, ctx.pre.height, 1, dynamic=False)
        ctx.coreml_program = decompose(program)
        ctx.coreml_outputs = model.output_names
    labels = ctx.src.labels if ctx.src.task == "classifier" else None
    fp32_ops: list[str] = []
    cached_fp16 = ctx.coreml_fp16
    if precision == "int8" and cached_fp16 is not None:  # same program, weights quantised: no second conversion
        mlmodel = quantize_weights_int8(cached_fp16[0])
        discard(cached_fp16[0])
        ctx.coreml_fp16 = None
        set_metadata(mlmodel, {**ctx.metadata, "precision": precision})
        fp32_ops = list(cached_fp16[1])
    else:
        mlmodel = convert(ctx.coreml_program, ctx.pre, "image", ctx.coreml_outputs, precision, labels,
                          {**ctx.metadata, "precision": precision}, [f"model.{p}" for p in ctx.pinned], fp32_ops)
        if precision == "fp16" and "int8" in ctx.recipe.precisions:
            ctx.coreml_fp16 = (mlmodel, list(fp32_ops))
    path = save(mlmodel, ctx.path("coreml", f"model.{precision}.mlpackage"))
    if ctx.coreml_fp16 is None or ctx.coreml_fp16[0] is not mlmodel:  # the FP16 model kept for INT8 is discarded after it
        discard(mlmodel)
    notes = [f"ML Program, minimum deployment target {MINIMUM_DEPLOYMENT_TARGET}; input: RGB image, "
             f"normalisation in ImageType scale/bias + per-channel factor"]
    if labels is not None:
        notes.append("classifier: softmax probabilities with ClassifierConfig labels (outputs classLabel + probabilities)")
    if precision == "int8":
        notes.append("int8 = 8-bit linear weight quantisation; activations run in FP16")
    return ctx.artifact("coreml", precision, [path], fp32_pinned=sorted(set(fp32_ops)), notes=notes)


def verify_artifact(ctx, precision: str, art: dict) -> None:
    """macOS: parity of the predictions (uint8 images in) against PyTorch; elsewhere the saved spec is checked."""
    from export import backends, verification
    from export.deployable import DeployableModel

    if not backends.format_status("coreml").can_run:
        expect = ["classLabel"] if ctx.src.task == "classifier" else list(ctx.coreml_outputs)
        spec = verify_spec(ctx.tmp / art["path"], "image", ctx.pre.height, expect)
        art["verified"], art["spec"] = "spec-only", spec
        art["notes"].append("Core ML prediction needs macOS: only the saved spec was verified here")
        if not spec["passed"]:
            verification.fail(ctx, art, f"coreml {precision}: spec check failed: {'; '.join(spec['problems'])}")
        return
    labels = ctx.src.labels if ctx.src.task == "classifier" else None
    run = runner(ctx.tmp / art["path"], labels, ctx.coreml_outputs, "image")
    variant = "probabilities" if labels is not None else ctx.src.variant
    names = ("probabilities",) if labels is not None else ctx.output_names
    ref_model = DeployableModel(ctx.reference.backbone, ctx.reference.head, variant)
    results = {}
    for b in verification.PARITY_BATCHES:
        with torch.no_grad():
            ref = [o.numpy() for o in ref_model(torch.from_numpy(ctx.check.inputs[:b]))]
        results[f"batch{b}"] = contract_parity.compare(ctx.src.task, variant, names, ref, run(ctx.check.images_u8[:b]), "coreml",
                                                       precision, nms=verification.nms_fn(ctx))
    verification.record(ctx, "coreml", precision, art, results)
