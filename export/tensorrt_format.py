"""TensorRT: a serialized engine built from the ONNX file, or, where TensorRT cannot run, a check
of that ONNX file against the operators TensorRT's ONNX parser supports.

``build_engine`` is the real builder path (TensorRT ≥ 10 Python API): parse the ONNX file, one
optimization profile for the dynamic batch (min / opt / max), FP16 and INT8 builder flags, an INT8
entropy calibrator (``IInt8EntropyCalibrator2``) fed with the same calibration images as the other
formats (with a calibration cache), a timing cache reused across builds, and layers that the FP16
guard flagged kept in FP32 (``OBEY_PRECISION_CONSTRAINTS``). The engine is written untouched; the
metadata goes to a sidecar JSON next to it (never a header inside the engine — that breaks
``trtexec`` and C++ loaders, the Ultralytics mistake).

It needs ``tensorrt`` (not installable from this project's registries) and an NVIDIA GPU; its
tests skip otherwise. ``check_onnx`` runs everywhere: it lists the ONNX file's operators that are
not in ``SUPPORTED_OPS`` and the parser restrictions the file breaks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

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
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    unsupported = [op for op in ops if op not in SUPPORTED_OPS] + custom
    restrictions = []
    for n in model.graph.node:
        if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] not in inits | consts:
            restrictions.append(f"TopK {n.name}: K must be an initializer")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    notes = []
    if opset and opset > MAX_OPSET_CHECKED:
        notes.append(f"opset {opset} is newer than the operator table's opset {MAX_OPSET_CHECKED}; TensorRT 10 reads it")
    if any(o.type.tensor_type.elem_type == onnx.TensorProto.INT64 for o in model.graph.output):
        notes.append("INT64 outputs become INT32 in TensorRT")
    return {"ops": ops, "unsupported": unsupported, "restrictions": restrictions, "notes": notes,
            "source": SUPPORTED_OPS_SOURCE, "parsable": not unsupported and not restrictions}


def _require_tensorrt():
    import tensorrt as trt  # noqa: F401  (ImportError handled by the caller through export.backends)

    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str, *,
                 input_shape: tuple[int, int, int], batch: tuple[int, int, int] = (1, 4, 32),
                 calibration: np.ndarray | None = None, timing_cache: str | os.PathLike | None = None,
                 fp32_layers: set[str] = frozenset(), workspace_gib: float = 2.0, metadata: dict | None = None) -> dict:
    """Build and serialize a TensorRT engine; write ``<engine>.json`` beside it. Returns build facts.

    ``batch`` = (min, opt, max) of the optimization profile; ``input_shape`` = (3, H, W).
    """
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError("TensorRT could not parse the ONNX file: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    inp = network.get_input(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, *[(b, *input_shape) for b in batch])
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    pinned = []
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibration is None:
            raise ValueError("INT8 needs calibration images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(trt, calibration, Path(engine_path).with_suffix(".calib"))
        config.set_calibration_profile(profile)
    if fp32_layers and precision != "fp32":
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(name in layer.name for name in fp32_layers):
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                pinned.append(layer.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT's builder returned no engine; see the TensorRT log above")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    facts = {"tensorrt": trt.__version__, "precision": precision, "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
             "input_shape": list(input_shape), "fp32_layers": pinned}
    sidecar = {**(metadata or {}), **facts}
    Path(str(engine_path) + ".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return facts


def _entropy_calibrator(trt, images: np.ndarray, cache_path: Path):
    """IInt8EntropyCalibrator2 over ``images`` (N×3×H×W float32), one image per batch, cached."""
    import torch  # device memory through torch's CUDA allocator: no pycuda dependency

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.images, self.i = np.ascontiguousarray(images, np.float32), 0
            self.buffer = torch.empty((1, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            if self.i >= len(self.images):
                return None
            self.buffer.copy_(torch.from_numpy(self.images[self.i:self.i + 1]))
            self.i += 1
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


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
