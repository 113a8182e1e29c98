"""ONNX: the dynamo exporter from the ExportedProgram, checked, optionally slimmed, with metadata.

* ``torch.onnx.export(exported_program, dynamo=True)`` at opset ``OPSET``; the batch dimension
  must come out symbolic (the program was exported with an example batch of 2) and is renamed
  ``"batch"`` in the graph's inputs, outputs and value infos.
* ``onnx.checker.check_model(full_check=True)`` (includes strict shape inference).
* Metadata in ONNX's own slot, ``metadata_props`` (string → string), plus producer fields.
* Optional ``onnxslim`` pass; its result is kept only if ONNX Runtime gives the same outputs as
  before the pass (max abs error ≤ 1e-5 of the output scale) — simplifiers have changed outputs
  before (onnxsim#50). Otherwise the unslimmed graph ships and the card says why.
* FP16: float16 inside, float32 I/O. With nothing pinned by the FP16 guard, the FP32 graph cast by
  ONNX Runtime's ``convert_float_to_float16`` (no second ``torch.export``); otherwise exported from the
  module with the guard-pinned parts kept in float32. INT8: ``export.quantize`` on the FP32 file.

``build_artifact`` and ``verify_artifact`` are the format's entries in ``export.formats.BUILDERS``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from export import verification
from qbheat.errors import QBHeatError

OPSET = 20  # torch 2.13's dynamo default; ORT 1.32, OpenVINO 2026.4 and TensorRT 10 all read it


def export_program(program, example: torch.Tensor, path: str | os.PathLike, input_name: str,
                   output_names: tuple[str, ...], metadata: dict[str, str]) -> dict:
    """Write ``program`` (an ExportedProgram with a symbolic batch) to ``path``; return facts for the card."""
    import onnx

    path = Path(path)
    torch.onnx.export(program, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=[input_name],
                      output_names=list(output_names), external_data=False, verbose=False, optimize=True)
    model = onnx.load(str(path))
    batch_param = _rename_batch(model, input_name)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    model.producer_name, model.doc_string = "qbheat-export", metadata.get("description", "")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {"opset": OPSET, "batch_dim": batch_param, "nodes": len(model.graph.node),
            "op_types": sorted({n.op_type for n in model.graph.node})}


def to_float16(fp32_path: str | os.PathLike, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """The FP32 file with float16 weights and compute, float32 inputs and outputs (ONNX Runtime's converter),
    checked like an export; ``metadata`` replaces the copied ``metadata_props`` values."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _topological_sort(model.graph)  # the converter appends its input casts at the end
    del model.graph.value_info[:]  # some keep their float32 type; the checker's shape inference re-derives them
    props = {p.key: p.value for p in model.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise QBHeatError("the float16 ONNX graph has a cycle or an input nobody produces; export FP16 with a pinned module instead.")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _rename_batch(model, input_name: str) -> str:
    """Assert dim 0 of the input is symbolic and call it "batch" wherever that symbol appears."""
    inp = next(i for i in model.graph.input if i.name == input_name)
    d0 = inp.type.tensor_type.shape.dim[0]
    if not d0.dim_param:
        raise QBHeatError(f"the ONNX export fixed the batch size to {d0.dim_value}; the model is not batch-agnostic "
                          "(a reshape or loop in it depends on the batch), so it cannot ship with a dynamic batch.")
    symbol = d0.dim_param
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = "batch"
    return "batch"


def session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(path: str | os.PathLike):
    """A function image batch (float32 N×3×H×W) → list of outputs, through ONNX Runtime's CPU provider."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})


def io_spec(path: str | os.PathLike) -> dict:
    """Inputs and outputs of an ONNX file as the card writes them (symbolic dims as strings)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def one(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
                "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}

    return {"inputs": [one(i) for i in model.graph.input], "outputs": [one(o) for o in model.graph.output]}


def simplify(path: str | os.PathLike, images: np.ndarray) -> list[str]:
    """Run onnxslim in place if it keeps the outputs; return notes for the card."""
    try:
        import onnxslim
    except ImportError:
        return ["simplification requested but onnxslim is not installed (qbheat[simplify]); graph left as exported"]
    import onnx

    path = Path(path)
    before = runner(path)(images)
    original = onnx.load(str(path))
    n_before = len(original.graph.node)
    slim_path = path.with_name(path.stem + ".slim.onnx")
    try:
        slimmed = onnxslim.slim(str(path))
        del slimmed.metadata_props[:]
        slimmed.metadata_props.extend(original.metadata_props)  # the pass may drop them
        slimmed.producer_name, slimmed.doc_string = original.producer_name, original.doc_string
        onnx.save(slimmed, str(slim_path))
        onnx.checker.check_model(str(slim_path), full_check=True)
        after = runner(slim_path)(images)
    except Exception as e:  # noqa: BLE001  (a failing optional pass must not fail the export)
        slim_path.unlink(missing_ok=True)
        return [f"onnxslim failed ({type(e).__name__}); kept the unslimmed graph"]
    worst = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() /
                      max(float(np.abs(np.asarray(a, np.float64)).max()), 1e-12)) for a, b in zip(before, after))
    if worst > 1e-5:
        slim_path.unlink()
        return [f"onnxslim changed outputs by {worst:.2e} of their scale; kept the unslimmed graph"]
    n_after = len(onnx.load(str(slim_path)).graph.node)
    os.replace(slim_path, path)
    return [f"onnxslim {onnxslim.__version__}: {n_before} → {n_after} nodes, outputs unchanged (≤ {worst:.1e})"]


def add_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the file's ``metadata_props`` (keys it already has keep their values)."""
    import onnx

    model = onnx.load(str(path))
    existing = {p.key for p in model.metadata_props}
    for k, v in metadata.items():
        if k not in existing:
            e = model.metadata_props.add()
            e.key, e.value = k, str(v)
    onnx.save(model, str(path))


def build_artifact(ctx, precision: str) -> dict:
    """The ONNX artifact of ``precision`` (``ctx``: export.context.ExportContext); its card record."""
    import onnx

    from export import int8_auto

    notes, pinned = [], []
    if precision == "fp32":
        path = ctx.onnx_fp32()
        if path in ctx.scratch:
            ctx.scratch.remove(path)
    elif precision == "fp16":
        path, pinned = ctx.onnx_fp16()
        notes.append("float16 compute with float32 inputs/outputs; ONNX Runtime's CPU provider runs float16 nodes "
                     "without CPU kernels through inserted casts, so CPU parity is optimistic for FP16")
    else:
        from export.quantize import quantize_onnx_int8

        path = ctx.path("onnx", "model.int8.onnx")
        if ctx.auto:
            auto, quant_notes = ctx.int8_search().onnx(path, "onnxruntime")
            notes += quant_notes + [int8_auto.note(auto)]
        else:
            notes += quantize_onnx_int8(ctx.onnx_fp32(), path, ctx.calib.inputs, "image", ctx.recipe.int8_scope)
        add_metadata(path, {**ctx.metadata, "precision": "int8"})
    if ctx.recipe.simplify and precision != "int8":
        notes += simplify(path, ctx.check.inputs[:2])
    model = onnx.load(str(path), load_external_data=False)
    extra = {"int8_auto": auto} if precision == "int8" and ctx.auto else {}
    return ctx.artifact("onnx", precision, [path], opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                        fp32_pinned=pinned, notes=notes, **extra)


def verify_artifact(ctx, precision: str, art: dict) -> None:
    """Parity against PyTorch on ONNX Runtime's CPU provider."""
    verification.parity(ctx, "onnx", precision, art, lambda: runner(ctx.tmp / art["path"]))
