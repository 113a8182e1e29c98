"""OpenVINO IR converted from the export's FP32 ONNX file (itself from the ExportedProgram; not
TorchScript tracing, which fails on attention models).

Converting the ONNX file takes 0.3 s where ``ov.convert_model`` on the ExportedProgram took 13–18 s
for MF-294M + classifier at 224 px. The two IRs compute the same function (max abs difference 1.8e-7),
and the one from ONNX compiles to fewer CPU nodes (1191 against 1375) and ran no slower: pooled p50
8.01 against 8.26 ms, faster in 9 of 12 alternating rounds (2 threads, batch 1; 2-core AMD EPYC VM,
2026-11-26). ``deploy_targets``' runner and the latency benchmarks convert ONNX files the same way,
so they time the IR the export ships.

* FP32: weights kept in float32 (``compress_to_fp16=False``).
* FP16: weights compressed to float16 (``ov.save_model``'s default); nodes of modules the FP16 guard
  flagged carry ``disable_fp16_compression_0`` in their rt_info and keep float32 weights. They are
  found through the ONNX nodes' module scopes (``pkg.torch.onnx.name_scopes``, written by
  ``torch.onnx.export``), since OpenVINO names each node after its ONNX node.
* INT8: NNCF post-training quantisation of the FP32 model on the calibration images (MinMax
  statistics, performance preset). For detectors, the elementwise decoding ops are left out of
  quantisation (``IgnoredScope`` by type, as Ultralytics does for its heads).

Metadata lives in ``rt_info["model_info"]`` (OpenVINO's own slot, read by Model API). Parity runs
with ``INFERENCE_PRECISION_HINT=f32``: this CPU would otherwise run bf16 and differ by ~1 %.

``build_artifact`` and ``verify_artifact`` are the format's entries in ``export.formats.BUILDERS``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import numpy as np

from deploy_targets.runners.openvino_runner import shared_core
from export import verification
from export.quantize import INT8_SCOPES

PARITY_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
DETECTOR_IGNORED_TYPES = ["Multiply", "Subtract", "Add", "Divide", "Sigmoid", "Sqrt", "Maximum", "Minimum", "Clamp"]


def from_onnx(onnx_path: str | os.PathLike, input_name: str, output_names: tuple[str, ...], metadata: dict[str, str]):
    """The export's ONNX file → ov.Model with named inputs/outputs and ``model_info`` metadata.

    ``ov.convert_model`` rather than ``Core.read_model``: its offline transformations fold constant
    subgraphs, such as the weight reshapes of grouped convolutions (66 in MF-294M), which NNCF would
    otherwise quantise as FakeQuantize on a float weight instead of storing INT8 weights (INT8 IR
    10.9 MB of weights against 7.5 MB)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    model.inputs[0].get_tensor().set_names({input_name})
    for out, name in zip(model.outputs, output_names):
        out.get_tensor().set_names({name})
    for k, v in metadata.items():
        model.set_rt_info(str(v), ["model_info", str(k)])
    return model


def onnx_nodes_in(onnx_path: str | os.PathLike, module_paths: list[str]) -> set[str]:
    """Names of the ONNX nodes that ``torch.onnx.export`` created inside any of ``module_paths``
    (dotted paths within the exported module, as the FP16 guard reports them)."""
    if not module_paths:
        return set()
    import ast

    import onnx

    found = set()
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        if any(s == m or s.startswith(m + ".") for s in scopes for m in module_paths):
            found.add(node.name)
    return found


def pin_fp32(model, node_names: set[str]) -> list[str]:
    """Mark the OpenVINO nodes made from ``node_names`` (ONNX node names; OpenVINO names a node after its
    ONNX node, or ``<name>/<part>`` when one ONNX node became several) so FP16 compression leaves them
    in FP32."""
    if not node_names:
        return []
    pinned = []
    for op in model.get_ops():
        name = op.get_friendly_name()
        if name in node_names or name.split("/")[0] in node_names:
            op.get_rt_info()["disable_fp16_compression_0"] = ""
            pinned.append(name)
    return pinned


def ops_of_onnx_nodes(model, node_names: set[str], types: tuple[str, ...] | None = ("Convolution", "GroupConvolution", "MatMul")) -> list[str]:
    """Friendly names of the ``types`` ops (None: of any type) of ``model`` made from the ONNX nodes (or
    node outputs) in ``node_names``: OpenVINO names an op after its ONNX node, ``<name>/<part>`` where
    one node became several, or after the graph output the node produced (``logits``)."""
    return sorted(op.get_friendly_name() for op in model.get_ops() if (types is None or op.get_type_name() in types)
                  and (op.get_friendly_name() in node_names or op.get_friendly_name().split("/")[0] in node_names))


def save(model, xml_path: str | os.PathLike, compress_to_fp16: bool) -> list[Path]:
    import openvino as ov

    xml_path = Path(xml_path)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]


def quantize_int8(model, images: np.ndarray, detector: bool, quiet: bool = False, scope: str = "convs",
                  ignored_names: list[str] | tuple[str, ...] = ()):
    """NNCF post-training INT8 of ``model`` (an FP32 ov.Model) on ``images`` (N×3×H×W), leaving out the
    op types of ``export.quantize.INT8_SCOPES[scope]`` (and a detector's decoding math) and the nodes
    named in ``ignored_names`` (``--int8-scope auto``'s float modules). NNCF's progress bars go to
    stderr, or nowhere when ``quiet``."""
    import nncf

    dataset = nncf.Dataset([images[i:i + 1].astype(np.float32) for i in range(len(images))])
    spec = INT8_SCOPES[scope]
    types = list(dict.fromkeys(spec["openvino_ignored_types"] + (DETECTOR_IGNORED_TYPES if detector else [])))
    kwargs = {"ignored_scope": nncf.IgnoredScope(names=sorted(ignored_names), types=types, validate=False)} \
        if types or ignored_names else {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stderr), \
            _nncf_log_to(devnull if quiet else sys.stderr):  # NNCF's bars and its log both go to stdout by default
        q = nncf.quantize(model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.PERFORMANCE, **kwargs)
        if spec["openvino_weight_only_int8"]:  # the float MatMuls' weights in INT8 (the quantised convs are left alone)
            q = nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(
                names=sorted(input_independent(q, "MatMul", (1, *images.shape[1:]))), types=["Convolution", "GroupConvolution", "Gather"],
                validate=False))
        return q


def input_independent(model, op_type: str, input_shape: tuple[int, ...]) -> set[str]:
    """Names of ``op_type`` nodes whose result does not depend on the input's values: constant folding
    removes them once the (single) input has the static ``input_shape``.

    Mobile-Former's first bridge projects the learned tokens, which only the batch size reaches
    (``repeat``). The CPU plugin folds such a MatMul when it compiles for a static batch, and OpenVINO
    2026.4 fails to fold one whose weight NNCF compressed (``m_element_type.is_static()``, at compile,
    after ``convert_model``'s transformations). Compressing it saves nothing at run time, so its weight
    stays float."""
    from openvino import PartialShape, passes

    if len(model.inputs) != 1:
        return set()
    probe = model.clone()
    probe.reshape({probe.inputs[0]: PartialShape(list(input_shape))})
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(probe)
    left = {op.get_friendly_name() for op in probe.get_ops() if op.get_type_name() == op_type}
    return {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == op_type} - left


@contextlib.contextmanager
def _nncf_log_to(stream):
    """NNCF's logger writes to the stdout it found at import (``redirect_stdout`` does not reach it), and
    lists every node an ignored scope leaves out at INFO level. While quantising, it writes warnings and
    errors only, to ``stream``; stdout stays the CLI's (``--json``)."""
    from nncf.common.logging import nncf_logger

    handlers = [h for h in nncf_logger.handlers if isinstance(h, logging.StreamHandler)]
    streams, level = [h.stream for h in handlers], nncf_logger.level

    def point(h: logging.StreamHandler, s) -> None:  # not setStream: it flushes the old stream, which may be closed
        with h.lock:
            h.stream = s

    nncf_logger.setLevel(logging.WARNING)
    for h in handlers:
        point(h, stream)
    try:
        yield
    finally:
        for h, old in zip(handlers, streams):
            point(h, old)
        nncf_logger.setLevel(level)


def runner(xml_path: str | os.PathLike, threads: int = 2):
    """A function image batch → list of outputs, for parity: run by ``deploy_targets``' OpenVINO runner,
    which compiles for each batch's static shape (what ``qbheat-export bench``, the latency benchmarks and
    the bundles run), with the f32 precision hint. The IR as saved, with its dynamic batch, is compiled
    too, so an artifact that compiles only one way fails its check. (The static compile caught an
    OpenVINO failure that the dynamic one did not: see ``input_independent``.)"""
    from deploy_targets.runners import get_runner

    shared_core().compile_model(str(xml_path), "CPU", {**PARITY_CONFIG, "INFERENCE_NUM_THREADS": threads})
    static = get_runner("openvino", threads=threads, precision="fp32", inference_precision=PARITY_CONFIG["INFERENCE_PRECISION_HINT"])
    static.load(xml_path, batch=1)
    name = static.inputs()[0]["name"]

    def run(x: np.ndarray) -> list[np.ndarray]:
        return list(static.run({name: np.ascontiguousarray(x, np.float32)}).values())

    return run


def read_metadata(xml_path: str | os.PathLike) -> dict[str, str]:
    model = shared_core().read_model(str(xml_path))
    if not model.has_rt_info(["model_info"]):
        return {}
    keys = list(model.get_rt_info()["model_info"])
    return {k: model.get_rt_info(["model_info", k]).astype(str) for k in keys}


def build_artifact(ctx, precision: str) -> dict:
    """The OpenVINO IR of ``precision`` from the FP32 model (``ctx``: export.context.ExportContext); its card record."""
    notes, pinned = [], []
    xml = ctx.path("openvino", precision, "model.xml")
    if precision == "fp32":
        files = save(ctx.ov_fp32(), xml, compress_to_fp16=False)
    elif precision == "fp16":
        model = ctx.ov_fp32().clone()
        model.set_rt_info("fp16", ["model_info", "precision"])
        if ctx.pinned:
            pinned = pin_fp32(model, onnx_nodes_in(ctx.onnx_fp32(), ctx.pinned))
        files = save(model, xml, compress_to_fp16=True)
        notes.append("FP16-compressed weights; compute precision is the device's (parity uses the f32 hint)")
    elif ctx.auto:
        from export import int8_auto

        model, auto = ctx.int8_search().openvino(ctx.ov_fp32(), xml, ctx.src.task == "detector", ctx.quiet)
        files = save(model, xml, compress_to_fp16=False)
        notes += [f"NNCF post-training INT8 on {len(ctx.calib.names)} calibration images, scope 'auto' "
                  f"({auto['openvino_float_ops']} OpenVINO ops in float through NNCF's IgnoredScope)", int8_auto.note(auto)]
        return ctx.artifact("openvino", precision, files, notes=notes, int8_auto=auto)
    else:
        model = quantize_int8(ctx.ov_fp32().clone(), ctx.calib.inputs, ctx.src.task == "detector",
                              quiet=ctx.quiet, scope=ctx.recipe.int8_scope)
        model.set_rt_info("int8", ["model_info", "precision"])
        files = save(model, xml, compress_to_fp16=False)
        notes.append(f"NNCF post-training INT8 on {len(ctx.calib.names)} calibration images, scope {ctx.recipe.int8_scope!r}")
    return ctx.artifact("openvino", precision, files, fp32_pinned=pinned, notes=notes)


def verify_artifact(ctx, precision: str, art: dict) -> None:
    """Parity against PyTorch on OpenVINO CPU (f32 hint; static and dynamic batch compiled, see ``runner``)."""
    verification.parity(ctx, "openvino", precision, art, lambda: runner(ctx.tmp / art["path"]))
