"""ONNX Runtime (CPU execution provider by default; any provider the profile names).

Profile options: ``execution_provider``, ``allow_spinning`` (bool), ``profile_prefix`` (a path prefix: profile every run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, import_runtime


class OnnxRuntimeRunner(Runner):
    runtime = "onnxruntime"

    def _load(self, path: Path) -> None:
        ort = import_runtime("onnxruntime", "onnxruntime", "onnxruntime", "export")
        self._ort = ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        if "allow_spinning" in self.options:  # intra-op threads spin between ops (ORT's default) or sleep
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options["allow_spinning"] else "0")
        if self.options.get("profile_prefix"):  # ORT's own per-node profiler (benchmarks/lean_graph.py)
            so.enable_profiling, so.profile_file_prefix = True, str(self.options["profile_prefix"])
        provider = self.options.get("execution_provider", "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            raise QBHeatError(f"ONNX Runtime here has no {provider}; available: {ort.get_available_providers()}.")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=[provider])
        except Exception as e:  # noqa: BLE001 (ORT raises its own Fail/InvalidGraph types)
            raise QBHeatError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0]}") from None
        self._output_names = [o.name for o in self.session.get_outputs()]

    def inputs(self) -> list[dict[str, Any]]:
        return [{"name": i.name, "shape": list(i.shape), "dtype": i.type} for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, outs))

    def _describe(self) -> dict[str, Any]:
        return {"runtime_version": self._ort.__version__, "device": "CPU" if "CPU" in self.session.get_providers()[0] else self.session.get_providers()[0],
                "providers": self.session.get_providers()}

    def close(self) -> None:
        self.session = None
