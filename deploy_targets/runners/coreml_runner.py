"""Core ML through coremltools' ``MLModel.predict`` (macOS only).

Compute units come from the profile's ``[options] compute_units``: ``cpu_only``, ``cpu_and_gpu``,
``cpu_and_ne`` or ``all``. An ``ImageType`` input (preprocessing baked into the model) takes
uint8 N×H×W×3 images (``takes_images``); a multi-array input takes the normalised float tensor.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from . import Runner, import_runtime

COMPUTE_UNITS = {"cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE", "all": "ALL"}


class CoreMlRunner(Runner):
    runtime = "coreml"

    def _load(self, path: Path) -> None:
        if sys.platform != "darwin":
            raise QBHeatError("Core ML prediction needs macOS; run the bundle ('qbheat-export bundle --target mac-apple-silicon-coreml') on a Mac.")
        ct = import_runtime("coremltools", "coreml", "coremltools", "coreml")
        self._ct = ct
        units = self.options.get("compute_units", "all")
        if units not in COMPUTE_UNITS:
            raise QBHeatError(f"compute_units {units!r} is not one of {sorted(COMPUTE_UNITS)}.")
        self._units = units
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units]))
        spec = self.model.get_spec()
        self._spec_inputs = [(i.name, i.type.WhichOneof("Type")) for i in spec.description.input]
        self.takes_images = any(kind == "imageType" for _, kind in self._spec_inputs)

    def inputs(self) -> list[dict[str, Any]]:
        spec = self.model.get_spec()
        out = []
        for i in spec.description.input:
            kind = i.type.WhichOneof("Type")
            if kind == "imageType":
                out.append({"name": i.name, "shape": [1, i.type.imageType.height, i.type.imageType.width, 3], "dtype": "uint8"})
            else:
                out.append({"name": i.name, "shape": list(i.type.multiArrayType.shape), "dtype": "float32"})
        return out

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        feed: dict[str, Any] = {}
        for name, kind in self._spec_inputs:
            array = inputs[name]
            if kind == "imageType":
                if array.shape[0] != 1:
                    raise QBHeatError("a Core ML image input takes one image per prediction; use batch 1.")
                feed[name] = Image.fromarray(np.asarray(array[0], dtype=np.uint8))
            else:
                feed[name] = array
        out = self.model.predict(feed)
        return {k: np.asarray(v) for k, v in out.items() if not isinstance(v, (str, dict))}

    def _describe(self) -> dict[str, Any]:
        return {"runtime_version": self._ct.__version__, "device": self._units, "device_name": platform.machine(),
                "macos": platform.mac_ver()[0]}
