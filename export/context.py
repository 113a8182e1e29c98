"""``ExportContext``: what every format's builder and verifier reads during one export, and the
intermediate files the formats share.

The shared files are built once, on first use, by whichever builder needs them first: the FP32 ONNX
file (ONNX FP32 itself, ONNX INT8's and OpenVINO's source, TensorRT's), the FP16 ONNX file (ONNX FP16,
TensorRT FP16), the TensorRT-style INT8 Q/DQ file, OpenVINO's FP32 model, and ``--int8-scope auto``'s
search. A shared file that is not itself an artifact of the recipe is listed in ``scratch`` and
deleted before the card is written.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.calibration import ImageSet, Preprocessing
from export.deployable import DeployableModel
from export.quantize import AUTO
from export.recipe import ExportRecipe
from export.source import Source, export_program
from qbheat_contract.card import SCHEMA
from qbheat_contract.hashing import artifact_sha256, file_sha256


@dataclass(slots=True)
class ExportContext:
    """One export's inputs (the recipe, the loaded source, the models before and after
    reparameterisation, the ExportedProgram, calibration and parity images, PyTorch's reference
    outputs per parity batch, the FP16 guard, the temporary output folder) and its shared state.
    Every field is declared here (``slots``: setting any other attribute raises)."""

    recipe: ExportRecipe
    src: Source
    reference: DeployableModel  # before reparameterisation: parity's reference
    deploy: DeployableModel  # after it: what is converted
    program: Any  # torch.export.ExportedProgram of ``deploy``
    example: torch.Tensor
    calib: ImageSet
    check: ImageSet
    ref: dict[int, list[np.ndarray]]  # parity batch → PyTorch outputs
    guard: Any  # export.fp16_guard's result, or None when no FP16 artifact is requested
    tmp: Path
    quiet: bool = False  # --quiet: the converters' own progress output (NNCF's bars) is discarded too

    output_names: tuple[str, ...] = field(init=False)
    metadata: dict[str, str] = field(init=False)  # written into every artifact
    auto: bool = field(init=False)  # --int8-scope auto
    scratch: list[Path] = field(init=False, default_factory=list)  # files and folders deleted before the card
    # --eval-data: the card's evaluation block, and (EvalSet, PyTorch's scores on it) once the gate has run
    evaluation: dict | None = field(init=False, default=None)
    eval_scores: tuple | None = field(init=False, default=None)
    # the TensorRT-style INT8 file's quantiser notes and, under auto, its search record
    tensorrt_qdq_notes: list[str] = field(init=False, default_factory=list)
    tensorrt_qdq_auto: dict | None = field(init=False, default=None)
    # Core ML's builder state (export.coreml_format): the static-batch program converted for every
    # precision, its output names, and the FP16 model kept for INT8 (its weights quantised, no second conversion)
    coreml_program: Any = field(init=False, default=None)
    coreml_outputs: tuple[str, ...] | None = field(init=False, default=None)
    coreml_fp16: tuple[Any, list[str]] | None = field(init=False, default=None)
    # the shared files, built on first use
    _onnx_fp32: Path | None = field(init=False, default=None)
    _onnx_fp16: tuple[Path, list[str]] | None = field(init=False, default=None)
    _tensorrt_qdq: Path | None = field(init=False, default=None)
    _ov_fp32: Any = field(init=False, default=None)
    _search: Any = field(init=False, default=None)  # export.int8_auto.Search

    def __post_init__(self) -> None:
        src = self.src
        self.output_names = self.deploy.output_names
        self.auto = self.recipe.int8_scope == AUTO
        self.metadata = {
            "qbheat.model_card_schema": SCHEMA, "model": src.name, "head": src.task, "head_variant": src.variant,
            "head_type": getattr(src.head, "head_type", ""), "labels": json.dumps(src.labels),
            "preprocessing": json.dumps(self.pre.card()), "pretrain_method": str(src.method),
            "source_sha256": str(src.source["sha256"]), "author": "qbheat-export",
            "description": f"{src.name} backbone + {src.task} head ({src.variant}), exported by qbheat-export",
            "version": _qbheat_version(),
        }

    @property
    def pre(self) -> Preprocessing:
        return self.src.pre

    @property
    def pinned(self) -> list[str]:
        """The modules the FP16 guard keeps in float32."""
        return list(self.guard.overflowing) if self.guard else []

    def path(self, *parts: str) -> Path:
        """A path in the temporary output folder, its parent created."""
        p = self.tmp.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def artifact(self, fmt: str, precision: str, files: list[Path], **extra) -> dict:
        """The card's record of one artifact: ``files[0]`` is its main file; ``extra`` sets or overrides fields."""
        main = files[0]
        art = {"format": fmt, "precision": precision, "path": str(main.relative_to(self.tmp)), "sha256": artifact_sha256(main),
               "size_bytes": _size(main), "opset": None, "verified": "not-run", "parity": None, "fp32_pinned": [], "notes": []}
        if len(files) > 1:
            art["files"] = [{"path": str(f.relative_to(self.tmp)), "sha256": file_sha256(f), "size_bytes": _size(f)} for f in files]
            art["size_bytes"] = sum(_size(f) for f in files)
        art.update(extra)
        return art

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX file (built once; also the source of ONNX INT8 and of TensorRT)."""
        if self._onnx_fp32 is None:
            from export import onnx_format

            path = self.path("onnx", "model.fp32.onnx")
            onnx_format.export_program(self.program, self.example, path, "image", self.output_names, self.metadata)
            if "onnx" not in self.recipe.formats or "fp32" not in self.recipe.precisions:
                self.scratch.append(path)
            self._onnx_fp32 = path
        return self._onnx_fp32

    def onnx_fp16(self) -> tuple[Path, list[str]]:
        """The FP16 ONNX file (built once; also the source of TensorRT FP16) and the modules kept in FP32."""
        if self._onnx_fp16 is None:
            from export import onnx_format
            from export.fp16_guard import half_with_fp32_islands

            pinned = self.pinned
            path = self.path("onnx", "model.fp16.onnx")
            if pinned:  # modules the guard keeps in float32: export the mixed-precision module itself
                program, example = export_program(half_with_fp32_islands(self.deploy, pinned), self.pre.height, self.recipe.max_batch)
                onnx_format.export_program(program, example, path, "image", self.output_names, {**self.metadata, "precision": "fp16"})
            else:  # nothing pinned: cast the FP32 graph (same function, no second torch.export)
                onnx_format.to_float16(self.onnx_fp32(), path, {**self.metadata, "precision": "fp16"})
            if "onnx" not in self.recipe.formats:
                self.scratch.append(path)
            self._onnx_fp16 = (path, pinned)
        return self._onnx_fp16

    def tensorrt_qdq(self) -> Path:
        """The INT8 Q/DQ ONNX file in TensorRT's style (built once): the TensorRT INT8 engine's source."""
        if self._tensorrt_qdq is None:
            from export import int8_auto, onnx_format
            from export.quantize import quantize_onnx_int8

            path = self.path("tensorrt", "model.int8.qdq.onnx")
            if self.auto:
                self.tensorrt_qdq_auto, notes = self.int8_search().onnx(path, "tensorrt")
                self.tensorrt_qdq_notes = [*notes, int8_auto.note(self.tensorrt_qdq_auto)]
            else:
                self.tensorrt_qdq_notes = quantize_onnx_int8(self.onnx_fp32(), path, self.calib.inputs, "image",
                                                             self.recipe.int8_scope, style="tensorrt")
            onnx_format.add_metadata(path, {**self.metadata, "precision": "int8"})
            self._tensorrt_qdq = path
        return self._tensorrt_qdq

    def int8_search(self):
        """``--int8-scope auto``'s search (export.int8_auto): validation set, PyTorch's outputs on it, module ranking."""
        if self._search is None:
            from export import evaluate, int8_auto

            r = self.recipe
            steps_note = f"--int8-scope auto: sensitivity and float modules on {r.validation_source} ({r.int8_validation_limit} images)"
            if not self.quiet:
                print(f"[export]     {steps_note}", file=sys.stderr, flush=True)
            card = {"head": {"labels": self.src.labels}, "preprocessing": self.pre.card()}
            if self.src.task == "detector":  # COCO mAP on a val split (the reported --eval-data reads test)
                from export import eval_detection as ed

                splits = ("val",) if r.validation_source == r.eval_data else ("val", "test")
                data = ed.load_detection_set(r.validation_source, card, r.int8_validation_limit, splits)
                validation = int8_auto.DetectionValidation(data, ed.torch_outputs(self.reference, data),
                                                           ed.nms_of(self.reference, self.pre.height))

                def measured_outputs(runner):
                    return ed.runner_outputs(runner, data)
            else:
                from export.eval_data import load_eval_set

                data = load_eval_set(r.validation_source, card, r.int8_validation_limit)
                validation = int8_auto.Validation(data, evaluate.torch_scores(self.reference, data, quiet=True, threads=evaluate.THREADS))

                def measured_outputs(runner):
                    return evaluate.runner_scores(runner, data, quiet=True)
            workdir = self.path(".int8_auto", "x").parent
            self.scratch.append(workdir)

            def scores_of(fmt: str, path: Path):
                runner = evaluate.artifact_runner({"format": fmt, "precision": "int8"}, path, threads=evaluate.THREADS)
                try:
                    return measured_outputs(runner)
                finally:
                    runner.close()

            self._search = int8_auto.Search(self.onnx_fp32(), self.calib.inputs, "image", validation, r.max_drop, scores_of, workdir)
        return self._search

    def ov_fp32(self):
        """OpenVINO's FP32 model, converted once from the FP32 ONNX file (the source of every OpenVINO artifact)."""
        if self._ov_fp32 is None:
            from export import openvino_format

            self._ov_fp32 = openvino_format.from_onnx(self.onnx_fp32(), "image", self.output_names, self.metadata)
        return self._ov_fp32


def _qbheat_version() -> str:
    import qbheat

    return qbheat.__version__


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
