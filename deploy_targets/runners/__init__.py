"""One runner per runtime, behind one small interface.

    runner = get_runner("onnxruntime", threads=2, precision="fp32")
    runner.load("model.onnx")
    outputs = runner.run({"x": batch})     # dict[str, np.ndarray] -> dict[str, np.ndarray]
    runner.describe()                      # runtime, version, device, settings: goes into the fingerprint

Runners import their runtime only inside ``load`` and never import torch or qbheat at module
level, so this package also runs inside a device bundle, where only numpy and the runtime exist
(the ExecuTorch runner is the exception: ExecuTorch's Python runtime itself takes torch tensors).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError

# runtime -> (module, class); modules are imported on demand so a missing runtime costs nothing.
RUNNERS = {
    "onnxruntime": ("onnxruntime_runner", "OnnxRuntimeRunner"),
    "openvino": ("openvino_runner", "OpenVinoRunner"),
    "tensorrt": ("tensorrt_runner", "TensorRtRunner"),
    "coreml": ("coreml_runner", "CoreMlRunner"),
    "executorch": ("executorch_runner", "ExecuTorchRunner"),
    "litert": ("litert_runner", "LiteRtRunner"),
}

# artifact format (model_card.json "format") -> runtimes that can run it
FORMAT_RUNTIMES = {
    "onnx": ("onnxruntime", "openvino", "tensorrt"),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt",),
    "coreml": ("coreml",),
    "executorch": ("executorch",),
    "litert": ("litert",),
}
SUFFIX_FORMAT = {".onnx": "onnx", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
                 ".mlpackage": "coreml", ".mlmodel": "coreml", ".pte": "executorch", ".tflite": "litert"}


def format_of(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMAT:
        raise QBHeatError(f"cannot tell the format of {path}; expected one of {sorted(SUFFIX_FORMAT)}.")
    return SUFFIX_FORMAT[suffix]


class Runner:
    """Base class: subclasses set ``runtime`` and implement ``_load``, ``run`` and ``_describe``.

    ``threads`` = 0 leaves the runtime's default; ``precision`` is the artifact's precision (a
    runner may use it to pick the compute precision); ``options`` come from the profile's [options].
    """

    runtime = "?"
    #: True for runtimes whose model takes an image (Core ML ImageType): run() then expects uint8 N×H×W×3.
    takes_images = False

    def __init__(self, threads: int = 0, precision: str = "fp32", **options: Any) -> None:
        self.threads = int(threads)
        self.precision = precision
        self.options = options
        self.path: Path | None = None
        self.batch: int | None = None

    def load(self, path: str | Path, batch: int | None = None) -> "Runner":
        """Load the artifact. ``batch``: the batch this runner is about to be timed at; a runtime that
        runs faster with static shapes (OpenVINO) compiles for it, other runtimes ignore it."""
        path = Path(path)
        if not path.exists():
            raise QBHeatError(f"artifact {path} does not exist; pass a file written by 'qbheat-export export'.")
        self.path = path
        self.batch = batch
        self._load(path)
        return self

    def _load(self, path: Path) -> None:
        raise NotImplementedError

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def inputs(self) -> list[dict[str, Any]]:
        """[{name, shape, dtype}] of the loaded model; a symbolic or dynamic dimension is a string or -1."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        info = {"runtime": self.runtime, "threads": self.threads, "precision": self.precision,
                "options": {k: v for k, v in self.options.items()}}
        info.update(self._describe())
        return info

    def _describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release the session; the default drops references."""


def _missing(runtime: str, package: str, extra: str) -> QBHeatError:
    return QBHeatError(f"the {runtime} runner needs the Python package {package!r}; install it (pip install 'qbheat[{extra}]') on this machine.")


def import_runtime(module: str, runtime: str, package: str, extra: str):
    """Import a runtime's Python module when a runner loads; its absence is a user error naming the package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(runtime, package, extra) from None


def get_runner(runtime: str, threads: int = 0, precision: str = "fp32", **options: Any) -> Runner:
    if runtime not in RUNNERS:
        raise QBHeatError(f"no runner for runtime {runtime!r}; known runtimes are {sorted(RUNNERS)}.")
    module_name, class_name = RUNNERS[runtime]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(threads=threads, precision=precision, **options)


def available(runtime: str) -> bool:
    """Whether the runtime's Python package can be imported here (without loading a model)."""
    package = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt",
               "coreml": "coremltools", "executorch": "executorch.runtime", "litert": "ai_edge_litert.interpreter"}[runtime]
    try:
        importlib.import_module(package)
    except Exception:  # noqa: BLE001 (a broken install counts as absent)
        return False
    if runtime == "coreml":
        import sys
        return sys.platform == "darwin"
    return True
