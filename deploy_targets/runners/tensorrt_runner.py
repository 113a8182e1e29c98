"""TensorRT (10.x Python API) on an NVIDIA GPU, with device memory handled through cuda-python.

``load`` takes a serialized engine (``.engine``/``.plan``) or an ONNX file; from ONNX it builds the
engine on this GPU (engines are not portable across GPUs or TensorRT versions) with
``build_engine_bytes``, the one TensorRT builder of qbheat (the export pipeline uses it too): one
optimisation profile, batch 1 (min) … ``max_batch`` (max, default 8), opt = ``opt_batch`` (default 1),
and an optional timing cache file.

The ONNX file sets the precision. TensorRT ≥ 10 builds a *strongly typed* network: every layer runs
in the type the file gives it, so an FP16 ONNX file (FP32 islands included) gives an FP16 engine and a
Q/DQ ONNX file (symmetric INT8, float biases: ``export.quantize``'s 'tensorrt' style) an explicitly
quantised INT8 engine. That is the path NVIDIA keeps: INT8 calibrators are deprecated since TensorRT
10.1, and TensorRT 11 removes the FP16/INT8 builder flags. Older TensorRT (8.6, JetPack 6.0) has no
strong typing; there the network is weakly typed and the artifact's precision sets the FP16 and INT8
builder flags.

Timing covers host→device copy, ``execute_async_v3`` and device→host copy, synchronised on the
stream, so a ``run`` is comparable with the CPU runtimes' ``run``.

Not runnable on the machines qbheat is developed on (TensorRT needs NVIDIA's package index and a
GPU); its tests skip there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, _missing, import_runtime


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise _missing("tensorrt", "cuda-python", "tensorrt") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise QBHeatError(f"a CUDA call failed with error {err}; check the driver and that the GPU is visible.")
    return rest[0] if len(rest) == 1 else rest


def build_engine_bytes(onnx_path: str | Path, precision: str = "fp32", *, logger=None, max_batch: int = 8,
                       opt_batch: int = 1, workspace_mib: int = 1024, timing_cache: str | Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx_path`` and build a serialized engine for this GPU; return it with the build facts.

    ``precision`` is the ONNX file's own precision (fp32, fp16 or int8); it only matters where TensorRT
    has no strongly typed networks. The timing cache file is read when present and written back.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise _missing("tensorrt", "tensorrt", "tensorrt") from None
    onnx_path = Path(onnx_path)
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QBHeatError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not strongly_typed:  # TensorRT < 10: the builder flags allow the file's precision
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise QBHeatError(f"input {tensor.name} of {onnx_path} has dynamic spatial dimensions {shape}; "
                              "export with a fixed input size for TensorRT.")
        profile.set_shape(tensor.name, [1, *shape[1:]], [min(opt_batch, max_batch), *shape[1:]], [max_batch, *shape[1:]])
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QBHeatError(f"TensorRT failed to build an engine from {onnx_path}; rerun with the TensorRT logger at VERBOSE to see why.")
    if cache_file:
        cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    facts = {"tensorrt": trt.__version__, "precision": precision, "strongly_typed": strongly_typed,
             "profile": {"min": 1, "opt": min(opt_batch, max_batch), "max": max_batch}}
    return bytes(serialized), facts


class TensorRtRunner(Runner):
    runtime = "tensorrt"

    def _load(self, path: Path) -> None:
        trt = import_runtime("tensorrt", "tensorrt", "tensorrt", "tensorrt")
        self._trt = trt
        self._cuda = _cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        if path.suffix == ".onnx":
            serialized = self._build(path, logger)
        else:
            serialized = path.read_bytes()
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise QBHeatError(f"TensorRT could not deserialize {path}; engines only load with the TensorRT version and GPU that built them.")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self._cuda.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _build(self, onnx_path: Path, logger) -> bytes:
        serialized, _ = build_engine_bytes(
            onnx_path, self.precision, logger=logger, max_batch=int(self.options.get("max_batch", 8)),
            opt_batch=int(self.options.get("opt_batch", 1)), workspace_mib=int(self.options.get("workspace_mib", 1024)),
            timing_cache=self.options.get("timing_cache"))
        return serialized

    def inputs(self) -> list[dict[str, Any]]:
        trt = self._trt
        return [{"name": n, "shape": list(self.engine.get_tensor_shape(n)),
                 "dtype": str(trt.nptype(self.engine.get_tensor_dtype(n)))} for n in self._inputs]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cuda.cudaFree(ptr))
            ptr = _check(self._cuda.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cuda = self._trt, self._cuda
        h2d, d2h = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self._inputs:
            array = np.ascontiguousarray(inputs[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            ptr = self._buffer(name, array.nbytes)
            _check(cuda.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise QBHeatError("TensorRT failed to enqueue the inference; check the input shapes against the engine's profile.")
        for name, array in outputs.items():
            _check(cuda.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0], array.nbytes, d2h, self.stream))
        _check(cuda.cudaStreamSynchronize(self.stream))
        return outputs

    def _describe(self) -> dict[str, Any]:
        props = _check(self._cuda.cudaGetDeviceProperties(0))
        driver = _check(self._cuda.cudaDriverGetVersion())
        return {"runtime_version": self._trt.__version__, "device": "GPU",
                "device_name": props.name.decode() if isinstance(props.name, bytes) else str(props.name),
                "compute_capability": f"{props.major}.{props.minor}", "cuda_driver": driver}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cuda.cudaFree(ptr)
        self._buffers.clear()
        self.context = self.engine = None
