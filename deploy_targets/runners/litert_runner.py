"""LiteRT (TensorFlow Lite) ``.tflite`` files through ``ai_edge_litert.interpreter`` (extra ``qbheat[litert]``).

The interpreter applies the XNNPACK delegate by default on CPU; ``threads`` is its thread count.
A batch other than the file's is run by resizing the input tensor (works for models exported with
a batch-agnostic graph; a fixed reshape inside the graph makes it fail, and the error says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, import_runtime


class LiteRtRunner(Runner):
    runtime = "litert"

    def _load(self, path: Path) -> None:
        litert = import_runtime("ai_edge_litert.interpreter", "litert", "ai-edge-litert", "litert")
        self._litert = litert
        try:
            self.interpreter = litert.Interpreter(model_path=str(path), num_threads=self.threads or None)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise QBHeatError(f"LiteRT could not load {path}: {str(e).splitlines()[0]}") from None
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()

    def inputs(self) -> list[dict[str, Any]]:
        return [{"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name} for d in self._in]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = [inputs[d["name"]] if d["name"] in inputs else list(inputs.values())[i] for i, d in enumerate(self._in)]
        resized = False
        for d, v in zip(self._in, values):
            if tuple(d["shape"]) != v.shape:
                self.interpreter.resize_tensor_input(d["index"], list(v.shape))
                resized = True
        if resized:
            try:
                self.interpreter.allocate_tensors()
            except RuntimeError as e:
                raise QBHeatError(f"LiteRT cannot run this file at input shape {values[0].shape}: {str(e).splitlines()[0]}") from None
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
        for d, v in zip(self._in, values):
            self.interpreter.set_tensor(d["index"], np.ascontiguousarray(v, dtype=d["dtype"]))
        self.interpreter.invoke()
        return {d["name"]: self.interpreter.get_tensor(d["index"]).copy() for d in self._out}

    def _describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"runtime_version": version("ai-edge-litert"), "device": "CPU", "delegate": "xnnpack (default)"}
