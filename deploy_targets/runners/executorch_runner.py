"""ExecuTorch ``.pte`` programs through ``executorch.runtime`` (optional extra ``qbheat[executorch]``).

ExecuTorch's Python runtime passes torch tensors, so this runner (unlike the others) imports torch,
inside ``load``. On a phone without Python, run the same ``.pte`` with ExecuTorch's
``executor_runner``. ``threads`` resizes the XNNPACK thread pool (an experimental ExecuTorch API).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, _missing


class ExecuTorchRunner(Runner):
    runtime = "executorch"

    def _load(self, path: Path) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
            from executorch.extension.pybindings import portable_lib
        except ImportError:
            raise _missing("executorch", "executorch", "executorch") from None
        self._torch = torch
        if self.threads:
            portable_lib._unsafe_reset_threadpool(self.threads)
        self._pool = portable_lib._threadpool_get_thread_count()
        try:
            program = Runtime.get().load_program(path)
        except Exception as e:  # noqa: BLE001 (pybind RuntimeError)
            raise QBHeatError(f"ExecuTorch could not load {path}: {str(e).splitlines()[0]}") from None
        self.method = program.load_method("forward")
        meta = self.method.metadata
        self._input_names = [f"input_{i}" for i in range(meta.num_inputs())]
        self._meta = meta
        self._backends = Runtime.get().backend_registry.registered_backend_names

    def inputs(self) -> list[dict[str, Any]]:
        return [{"name": n, "shape": list(self._meta.input_tensor_meta(i).sizes()), "dtype": "float32"}
                for i, n in enumerate(self._input_names)]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = list(inputs.values()) if len(inputs) == len(self._input_names) else [inputs[n] for n in self._input_names]
        outs = self.method.execute([self._torch.from_numpy(np.ascontiguousarray(v)) for v in values])
        return {f"output_{i}": o.numpy() for i, o in enumerate(outs)}

    def _describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"runtime_version": version("executorch"), "device": "CPU", "threadpool": self._pool,
                "backends": list(self._backends)}
