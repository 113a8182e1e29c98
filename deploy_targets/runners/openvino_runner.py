"""OpenVINO (IR .xml/.bin, or an ONNX file converted on load with ``openvino.convert_model``, as the export does).

Compute precision: OpenVINO on CPUs with AVX512_BF16 or AMX silently computes in bf16. This runner
sets ``INFERENCE_PRECISION_HINT`` to f32 by default so an fp32 (or INT8, whose non-quantised parts
are f32) artifact runs as exported; an fp16 artifact asks for f16 where the device lists FP16 among
its optimisation capabilities, else f32. ``[options] inference_precision`` in the profile overrides
both (our choice: numbers must match the parity results unless the user opts out).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, import_runtime


def disable_telemetry() -> None:
    """Switch off OpenVINO's and NNCF's usage telemetry in this process.

    openvino-telemetry sends usage events to Google Analytics unless the user opted out in a consent
    file under ~/intel: on ``import openvino``, on every ``convert_model`` and from NNCF. On Linux it
    forks the whole process once per event to make the request (about 40 forks of a 1 GB process per
    export), and it writes a client ID and a usage counter under ~/intel. qbheat and its bundles make
    no network calls, so the consent check answers "declined" in this process. The user's consent
    file is not touched. Must run before ``import openvino`` / ``import nncf``, which read the consent.
    """
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no telemetry package: nothing is sent
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED


_CORE = None


def shared_core():
    """This process's one ``openvino.Core``, created on first use (telemetry switched off first).

    Every OpenVINO user in qbheat (runners, export, parity, benchmarks) takes its Core from here.
    A Core loads the device plugins, so one per process is also what OpenVINO recommends, and
    OpenVINO 2026 builds have crashed when a process created a second one
    (openvinotoolkit/openvino#35338). Raises ImportError when OpenVINO is not installed.
    """
    global _CORE
    if _CORE is None:
        disable_telemetry()
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


class OpenVinoRunner(Runner):
    runtime = "openvino"

    def _load(self, path: Path) -> None:
        disable_telemetry()
        ov = import_runtime("openvino", "openvino", "openvino", "openvino")
        self._ov = ov
        core = shared_core()
        device = self.options.get("device", "CPU")
        if device not in core.available_devices:
            raise QBHeatError(f"OpenVINO here has no device {device!r}; available: {core.available_devices}.")
        hint = self.options.get("inference_precision")
        if hint is None:
            hint = "f32"
            if self.precision == "fp16":
                caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
                hint = "f16" if "FP16" in caps else "f32"
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.options.get("performance_hint", "LATENCY"),
                                  "INFERENCE_PRECISION_HINT": hint}
        if self.options.get("perf_count"):  # per-node timings in request.get_profiling_info()
            config["PERF_COUNT"] = "YES"
        if device == "CPU":
            config["NUM_STREAMS"] = "1"
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
        self._core, self._config, self._device = core, config, device
        try:
            # An ONNX file goes through convert_model, whose offline transformations (constant folding,
            # fusions) make the IR that qbheat-export ships: MF-294M runs 1191 nodes that way against
            # 1343 read directly. An IR (.xml) is read as it is.
            self._model = ov.convert_model(str(path)) if path.suffix == ".onnx" else core.read_model(str(path))
            self.static_shape = self._static_shape(self.batch)
            self.compiled = self._compile(self.static_shape)
        except Exception as e:  # noqa: BLE001 (OpenVINO raises RuntimeError with long C++ text)
            raise QBHeatError(f"OpenVINO could not load {path}: {str(e).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        # other input shapes -> (compiled model, its request); the compiled model is kept with its request
        self._by_shape = {}
        hint_value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self._hint = hint_value.get_type_name() if hasattr(hint_value, "get_type_name") else str(hint_value)
        self._outputs = [o.get_any_name() for o in self.compiled.outputs]

    def inputs(self) -> list[dict[str, Any]]:
        out = []
        for i in self.compiled.inputs:
            shape = [d.get_length() if d.is_static else "dynamic" for d in i.get_partial_shape()]
            out.append({"name": i.get_any_name(), "shape": shape, "dtype": str(i.get_element_type())})
        return out

    def _static_shape(self, batch: int | None) -> tuple[int, ...] | None:
        """The single input's shape with its batch set to ``batch``, where only the batch is dynamic.

        OpenVINO's CPU plugin runs a model compiled for static shapes faster than one with a dynamic
        batch (shape inference and memory planning at every inference: MF-294M 1.26-1.32× faster at batch
        1 here, benchmarks/results/latency.md). The profile option ``static_shapes = false`` keeps the dynamic model.
        """
        if batch is None or not self.options.get("static_shapes", True) or len(self._model.inputs) != 1:
            return None
        dims = list(self._model.inputs[0].get_partial_shape())
        if not dims or dims[0].is_static or not all(d.is_static for d in dims[1:]):
            return None
        return (int(batch), *(d.get_length() for d in dims[1:]))

    def _compile(self, shape: tuple[int, ...] | None):
        model = self._model
        if shape is not None:
            model = self._model.clone()
            model.reshape({model.inputs[0]: self._ov.PartialShape(list(shape))})
        return self._core.compile_model(model, self._device, self._config)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        if self.static_shape is not None:
            shape = tuple(next(iter(inputs.values())).shape)
            if shape != self.static_shape:  # e.g. golden checks one image at a time: compile once for that shape
                if shape not in self._by_shape:
                    try:
                        compiled = self._compile(shape)
                    except Exception as e:  # noqa: BLE001 (OpenVINO raises RuntimeError with long C++ text)
                        raise QBHeatError(f"OpenVINO cannot run {self.path} on an input of shape {list(shape)} "
                                          f"(compiled for {list(self.static_shape)}): {str(e).splitlines()[0]}") from None
                    self._by_shape[shape] = (compiled, compiled.create_infer_request())
                request = self._by_shape[shape][1]
        result = request.infer(inputs).to_tuple()  # in output order, whichever compiled model ran
        return {name: np.array(value) for name, value in zip(self._outputs, result)}

    def _describe(self) -> dict[str, Any]:
        core = shared_core()
        return {"runtime_version": self._ov.get_version(), "device": self._device,
                "device_name": core.get_property(self._device, "FULL_DEVICE_NAME"),
                "inference_precision": self._hint,
                "input_shape": list(self.static_shape) if self.static_shape else "dynamic"}

    def close(self) -> None:
        self.request = self.compiled = self._model = None
        self._by_shape = {}
