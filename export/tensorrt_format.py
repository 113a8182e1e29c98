"""TensorRT: a serialized engine built from the ONNX file of the same precision, or, where TensorRT
cannot run, a check of those ONNX files against what TensorRT's ONNX parser accepts.

``build_engine`` is the real builder path (TensorRT ≥ 10 Python API, through
``deploy_targets.runners.tensorrt_runner.build_engine_bytes``, the builder the device runner uses):
parse the ONNX file, one optimization profile for the dynamic batch (min / opt / max), a timing cache
reused across builds, and a *strongly typed* network, so the file sets the precision:

- fp32: the FP32 ONNX file;
- fp16: the FP16 ONNX file, whose modules the FP16 guard flagged are FP32 islands (strong typing
  keeps them FP32; no precision constraints to set);
- int8: a Q/DQ ONNX file in TensorRT's style (``export.quantize``, style 'tensorrt': signed INT8
  activations with zero points 0, per-channel INT8 weights, float biases), quantising the recipe's
  ``--int8-scope``. This is explicit quantisation; TensorRT's INT8 calibrators (implicit
  quantisation) are deprecated since 10.1 and gone in 11. The file ships beside the engine so that
  another GPU can rebuild from it (``trtexec --onnx=model.int8.qdq.onnx --stronglyTyped``).

The engine is written untouched; the metadata goes to a sidecar JSON next to it (never a header
inside the engine — that breaks ``trtexec`` and C++ loaders, the Ultralytics mistake).

It needs ``tensorrt`` (not installable from this project's registries) and an NVIDIA GPU; its
tests skip otherwise. ``check_onnx`` runs everywhere: it lists the ONNX file's operators that are
not in ``SUPPORTED_OPS``, the parser restrictions the file breaks, and Q/DQ nodes TensorRT would
reject (non-zero zero points, unsigned INT8, INT32 quantised biases: ONNX Runtime's own INT8 style).

``build_artifact`` and ``verify_artifact`` are the format's entries in ``export.formats.BUILDERS``;
``check_without_engine`` is the pipeline's step where no engine can be built.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from export import verification

# Operators marked supported ("Y") in onnx/onnx-tensorrt docs/operators.md at the snapshot that says
# "TensorRT 8.5 supports operators up to Opset 17" (commit 6d0ab7b), plus those added later and
# listed in the TensorRT 8.6 / 10.x release notes: LayerNormalization (8.6), GroupNormalization,
# Gelu and IsInf (10.x). A newer parser supports a superset, so a "missing" verdict is conservative.
SUPPORTED_OPS_SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 8.5, opset 17; commit 6d0ab7b) + TensorRT 8.6/10.x additions"
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
LayerNormalization GroupNormalization Gelu IsInf
""".split())
MAX_OPSET_CHECKED = 17  # the snapshot's statement; TensorRT 10 parsers read newer opsets


def check_onnx(path: str | os.PathLike) -> dict:
    """Operators of the ONNX file that the TensorRT parser does not list, and restrictions it breaks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    unsupported = [op for op in ops if op not in SUPPORTED_OPS] + custom
    restrictions, qdq_problems = [], {}
    for n in model.graph.node:
        if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] not in inits.keys() | consts:
            restrictions.append(f"TopK {n.name}: K must be an initializer")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for problem in _qdq_problems(n, inits):
                qdq_problems.setdefault(problem, []).append(n.name)
    restrictions += [f"{len(names)} Q/DQ node(s) with {problem} (first: {names[0]})" for problem, names in qdq_problems.items()]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    notes = []
    if opset and opset > MAX_OPSET_CHECKED:
        notes.append(f"opset {opset} is newer than the operator table's opset {MAX_OPSET_CHECKED}; TensorRT 10 reads it")
    if any(o.type.tensor_type.elem_type == onnx.TensorProto.INT64 for o in model.graph.output):
        notes.append("INT64 outputs become INT32 in TensorRT")
    qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if qdq:
        notes.append(f"{qdq} QuantizeLinear nodes: explicit quantisation")
    return {"ops": ops, "unsupported": unsupported, "restrictions": restrictions, "notes": notes,
            "source": SUPPORTED_OPS_SOURCE, "parsable": not unsupported and not restrictions}


# TensorRT quantises symmetrically to signed types: a Q/DQ pair's zero point must be 0 and its
# quantised side INT8 (or FP8 / INT4); an INT32 DequantizeLinear (ONNX Runtime's quantised bias) is
# not a type TensorRT dequantises.
_TRT_QUANTISED_TYPES = {3: "INT8", 17: "FLOAT8E4M3FN", 22: "INT4"}


def _qdq_problems(node, inits: dict) -> list[str]:
    import onnx
    from onnx import numpy_helper

    found = []
    zero_point = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    quantised = zero_point if zero_point is not None else (inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None)
    if quantised is not None and quantised.data_type not in _TRT_QUANTISED_TYPES:
        found.append(f"{onnx.TensorProto.DataType.Name(quantised.data_type)} quantised values (TensorRT takes INT8, FP8 or INT4)")
    elif (node.op_type == "QuantizeLinear" and zero_point is None
          and not any(a.name == "output_dtype" for a in node.attribute)):  # ONNX's default without a zero point
        found.append("UINT8 quantised values (TensorRT takes INT8, FP8 or INT4)")
    if zero_point is not None and numpy_helper.to_array(zero_point).any():
        found.append("a non-zero zero point (TensorRT quantises symmetrically)")
    return found


def _require_tensorrt():
    import tensorrt as trt  # noqa: F401  (ImportError handled by the caller through export.backends)

    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str, *,
                 opt_batch: int = 4, max_batch: int = 32, timing_cache: str | os.PathLike | None = None,
                 workspace_gib: float = 2.0, metadata: dict | None = None) -> dict:
    """Build and serialize a TensorRT engine from ``onnx_path`` (the ONNX file of ``precision``); write
    ``<engine>.json`` beside it. Returns build facts. The optimization profile spans batch 1 …
    ``max_batch``, tuned for ``opt_batch``."""
    from deploy_targets.runners.tensorrt_runner import build_engine_bytes

    serialized, facts = build_engine_bytes(onnx_path, precision, max_batch=max_batch, opt_batch=opt_batch,
                                           workspace_mib=int(workspace_gib * 1024), timing_cache=timing_cache)
    Path(engine_path).write_bytes(serialized)
    facts = {**facts, "source_onnx": Path(onnx_path).name}
    Path(str(engine_path) + ".json").write_text(json.dumps({**(metadata or {}), **facts}, indent=2) + "\n")
    return facts


def runner(engine_path: str | os.PathLike):
    """Run a serialized engine on CUDA through torch tensors; returns a function like the other runners."""
    trt = _require_tensorrt()
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
              trt.bool: torch.bool}

    def run(x: np.ndarray) -> list[np.ndarray]:
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
        context.set_input_shape(inputs[0], tuple(xt.shape))
        context.set_tensor_address(inputs[0], xt.data_ptr())
        outs = []
        for n in outputs:
            t = torch.empty(tuple(context.get_tensor_shape(n)), dtype=dtypes[engine.get_tensor_dtype(n)], device="cuda")
            context.set_tensor_address(n, t.data_ptr())
            outs.append(t)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy().astype(np.int64) for o in outs]

    return run


def build_artifact(ctx, precision: str) -> dict:
    """An engine from the ONNX file of the same precision (strongly typed: the file sets each layer's type);
    ``ctx``: export.context.ExportContext. Returns its card record."""
    engine = ctx.path("tensorrt", f"model.{precision}.engine")
    notes, pinned = [], []
    if precision == "fp32":
        source = ctx.onnx_fp32()
    elif precision == "fp16":
        source, pinned = ctx.onnx_fp16()
    else:
        source = ctx.tensorrt_qdq()
        notes += ctx.tensorrt_qdq_notes
    facts = build_engine(source, engine, precision, opt_batch=4, max_batch=ctx.recipe.max_batch,
                         timing_cache=ctx.path("tensorrt", "timing.cache"), metadata=ctx.metadata)
    files = [engine, Path(str(engine) + ".json")] + ([source] if precision == "int8" else [])
    notes.append(f"TensorRT {facts['tensorrt']}, {'strongly' if facts['strongly_typed'] else 'weakly'} typed from "
                 f"{source.name}, profile batch {facts['profile']}; metadata in the sidecar JSON")
    extra = {"int8_auto": ctx.tensorrt_qdq_auto} if precision == "int8" and ctx.tensorrt_qdq_auto else {}
    return ctx.artifact("tensorrt", precision, files, fp32_pinned=pinned, notes=notes, **extra)


def verify_artifact(ctx, precision: str, art: dict) -> None:
    """Parity against PyTorch on the GPU the engine was built on."""
    verification.parity(ctx, "tensorrt", precision, art, lambda: runner(ctx.tmp / art["path"]))


def check_without_engine(ctx, not_built: list[dict]) -> str:
    """Where TensorRT cannot build: the FP32 ONNX file (and, with INT8, the Q/DQ file) checked against its
    parser's rules, recorded in the card's ``not_built`` TensorRT entries; returns the step's note."""
    report = check_onnx(ctx.onnx_fp32())
    qdq = check_qdq_file(ctx) if "int8" in ctx.recipe.precisions else None
    for n in not_built:
        if n["format"] == "tensorrt":
            n["onnx_check"] = report
            if qdq is not None:
                n["int8_qdq_check"] = qdq
    problems = report["unsupported"] + report["restrictions"] + (qdq["check"]["restrictions"] if qdq else [])
    return (("parsable" if not problems else f"problems: {problems}")
            + (f"; INT8 Q/DQ file on ONNX Runtime: min cosine {qdq['min_cosine']:.4f}" if qdq else ""))


def check_qdq_file(ctx) -> dict:
    """Where TensorRT cannot build: the INT8 Q/DQ file an engine would be built from, checked against
    TensorRT's parser rules and run on ONNX Runtime against PyTorch (its quantisation points and
    scales are the engine's, so this is the INT8 engine's quantisation error, up to kernel rounding)."""
    from export import onnx_format

    path = ctx.tensorrt_qdq()
    ctx.scratch.append(path)
    run = onnx_format.runner(path)
    results = {f"batch{b}": verification.compare(ctx, b, run(ctx.check.inputs[:b]), "onnx", "int8")
               for b in verification.PARITY_BATCHES}
    out = {"file": path.name, "notes": ctx.tensorrt_qdq_notes, "check": check_onnx(path),
           "onnxruntime_parity": results, "min_cosine": verification.min_cosine(results),
           "passed": all(r["passed"] for r in results.values())}
    if ctx.tensorrt_qdq_auto:
        out["int8_auto"] = ctx.tensorrt_qdq_auto
    if ctx.eval_scores is not None:  # --eval-data: the file's top-1 on ONNX Runtime (an INT8 engine's quantisation, up to kernels)
        from export import accuracy, evaluate

        data, ref_scores = ctx.eval_scores
        runner_ = evaluate.artifact_runner({"format": "onnx", "precision": "int8"}, path, threads=evaluate.THREADS)
        try:
            scores = evaluate.runner_scores(runner_, data, desc="eval tensorrt-style int8 (onnxruntime)", quiet=ctx.quiet)
        finally:
            runner_.close()
        out["accuracy"] = accuracy.classification_scores(ref_scores, scores, data.labels)
    return out
