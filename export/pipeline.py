"""The export pipeline: checkpoint or timm name → DeployableModel → ExportedProgram → formats → verified folder.

Steps (each printed on stderr with its time):

1. Resolve the recipe; check the output folder can be written and the requested backends import
   (before any work). TensorRT is special: it needs an NVIDIA GPU and a package this project's
   registries cannot provide, so where it cannot build, the ONNX files it would be built from are
   checked against its parser's rules (the FP32 file; with INT8, the TensorRT-style Q/DQ file, which
   also runs on ONNX Runtime against PyTorch) and the card's ``not_built`` says what was not built and why; the
   export fails on it only when TensorRT was the only format asked for (our decision: one
   impossible target should not cost the user the others).
2. Load: a qbheat checkpoint (pretrain / probe / detector; a probe's or detector's trained head and
   labels ship as they are) or a timm model name (random init; a new head is untrained and the
   card says so). Preprocessing comes from the checkpoint or the timm config.
3. ``timm.utils.model.reparameterize_model`` (conv+BN fusion, ``fuse()`` of Mobile-Former blocks);
   parity is measured against the model *before* this step, so a wrong fusion is caught too.
4. ``torch.export`` with an example batch of 2 and a symbolic batch dimension (asserted).
5. Calibration images (``--calibration`` or scikit-image photos), parity images (other real crops),
   FP16 guard when an FP16 artifact is requested.
6. Per format × precision: build, then verify — run at batch 1 and batch 4 against PyTorch
   (``qbheat_contract.parity``), or check the Core ML spec on Linux. On Linux with two or more cores the
   Core ML builds run in a forked worker beside the other formats (``export.worker``; ``--serial``
   turns this off); they are verified in the parent like the rest. Outside tolerance → stop, delete
   everything, raise ``ParityError`` — unless ``allow_mismatch``, then the card records it.
7. ``model_card.json`` with hashes; the temporary folder is renamed into place (atomic).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import backends
from qbheat_contract import parity
from export.calibration import ImageSet, Preprocessing, calibration_and_parity
from export.deployable import DeployableModel, check_variant
from qbheat_contract.card import SCHEMA, write_model_card
from export.quantize import AUTO
from export.recipe import NEW_HEAD_CLASSES, ExportRecipe
from qbheat.checkpoint import build_backbone, load_checkpoint
from qbheat_contract.hashing import artifact_sha256, file_sha256
from qbheat.errors import QBHeatError
from qbheat.heads import build_head, head_from_spec

CHECKPOINT_HEAD = {"probe": "classifier", "detector": "detector", "pretrain": "features"}
# The steps before the per-artifact ones; the plan (format × precision), the accuracy gate and TensorRT's
# parser check follow, and their count is the "/N" of every step line.
SETUP_STEPS = ("load model and head", "torch.export (example batch 2, symbolic batch)",
               "calibration + parity images, PyTorch reference outputs", "FP16 guard")
TENSORRT_CHECK_STEP = "tensorrt: ONNX parser operator check"
PARITY_BATCHES = (1, 4)


class ParityError(QBHeatError):
    """An artifact is outside its tolerance; nothing was written."""


class AccuracyError(QBHeatError):
    """An artifact loses more task accuracy than ``--max-drop`` allows; nothing was written."""


class BuildError(QBHeatError):
    """A format's converter failed unexpectedly: one sentence naming the format (``--debug`` shows the traceback)."""

    def __init__(self, fmt: str, precision: str, error: BaseException):
        first = (str(error).strip().splitlines() or [""])[0][:200]
        super().__init__(f"building the {fmt} {precision} artifact failed ({type(error).__name__}: {first}); nothing was "
                         f"written. Rerun with --debug for the traceback, or leave {fmt} out of --formats.")


class Steps:
    """Step lines on stderr: ``[export] 3/11 onnx fp32 … done in 4.2 s``; the total is the planned steps' count."""

    def __init__(self, planned: list[str], quiet: bool = False):
        self.planned = planned
        self.total, self.i, self.quiet, self.t = len(planned), 0, quiet, time.perf_counter()
        self.timings: dict[str, float] = {}

    def start(self, what: str) -> None:
        self.i += 1
        self.what, self.t = what, time.perf_counter()
        if not self.quiet:
            print(f"[export] {self.i}/{self.total} {what} …", file=sys.stderr, flush=True)

    def done(self, note: str = "", seconds: float | None = None) -> None:
        """End the step; ``seconds`` overrides the measured time (a step that ran in the worker)."""
        dt = time.perf_counter() - self.t if seconds is None else seconds
        self.timings[self.what] = round(dt, 2)
        if not self.quiet:
            print(f"[export]     done in {dt:.1f} s{(' — ' + note) if note else ''}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"[export] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_source(recipe: ExportRecipe) -> dict[str, Any]:
    """Backbone, head, labels, preprocessing and provenance from a checkpoint or a timm name."""
    from qbheat.models import create_model

    notes: list[str] = []
    if recipe.checkpoint:
        ckpt = load_checkpoint(recipe.checkpoint)
        kind = ckpt["kind"]
        head_task = recipe.head or CHECKPOINT_HEAD[kind]
        backbone = build_backbone(ckpt)
        source = {"kind": "checkpoint", "path": str(Path(recipe.checkpoint).resolve()), "sha256": file_sha256(recipe.checkpoint),
                  "checkpoint_kind": kind}
        name = ckpt["model"]["name"]
        pre = Preprocessing.from_dict(ckpt["preprocessing"], recipe.image_size) if ckpt.get("preprocessing") \
            else Preprocessing.from_timm(backbone, recipe.image_size)
        method = ckpt.get("method")
        labels = list(ckpt["labels"]) if ckpt.get("labels") is not None else None
        trained = None
        if kind in ("probe", "detector") and "head" in ckpt:
            trained = head_from_spec(ckpt["head"])
            if getattr(trained, "task", None) != head_task and head_task != "features":
                raise QBHeatError(f"checkpoint {recipe.checkpoint} holds a {trained.task} head, but --head {head_task} was asked; "
                                  f"use --head {trained.task} or features.")
    else:
        head_task = recipe.head or "features"
        backbone = create_model(recipe.model, num_classes=0)
        source = {"kind": "timm", "path": None, "sha256": None}
        name, method, labels, trained = recipe.model, None, None, None
        pre = Preprocessing.from_timm(backbone, recipe.image_size)
        notes.append("backbone weights: random initialisation (timm name, no checkpoint; qbheat never downloads weights)")
    backbone.eval()
    if head_task == "features":
        head = build_head("features", backbone, image_size=pre.height)
        labels = None
    elif trained is not None:
        head = trained
        if labels is None or len(labels) != head.num_classes:
            n = head.num_classes
            if labels is not None:
                raise QBHeatError(f"checkpoint has {len(labels)} labels but its head predicts {n} classes; re-save the checkpoint.")
            labels = [f"class_{i}" for i in range(n)]
            notes.append("the checkpoint has no labels; class_<i> names were used")
    else:
        n = recipe.num_classes or NEW_HEAD_CLASSES[head_task]
        if head_task == "classifier":
            head = build_head(recipe.head_type, backbone, image_size=pre.height, num_classes=n)
        else:
            head = build_head("detector", backbone, image_size=pre.height, num_classes=n)
        labels = [f"class_{i}" for i in range(n)]
        notes.append(f"head: new, untrained {head.head_type} ({n} classes); export a probe/detector checkpoint to ship a trained head")
    variant = check_variant(head_task, recipe.head_variant)
    return {"backbone": backbone, "head": head, "task": head_task, "variant": variant, "labels": labels, "pre": pre,
            "name": name, "method": method, "source": source, "notes": notes}


def export_program(model: torch.nn.Module, size: int, max_batch: int, dynamic: bool = True):
    """``torch.export`` with an example batch of 2 and a symbolic batch (asserted)."""
    example = torch.zeros(2 if dynamic else 1, 3, size, size)
    shapes = {"image": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic else None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001  (torch.export raises many types; the user needs one sentence)
        raise QBHeatError(f"torch.export could not capture the model ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    if dynamic:
        placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
        dim0 = placeholder.meta["val"].shape[0]
        if not isinstance(dim0, torch.SymInt):
            raise QBHeatError("torch.export fixed the batch dimension; the model cannot ship with a dynamic batch.")
    return program, example


def count_macs(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(params, MACs) at batch 1: MACs = FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    params = sum(p.numel() for p in model.parameters())
    return int(params), int(counter.get_total_flops() // 2)


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------

def _prepare_out(recipe: ExportRecipe) -> tuple[Path, Path]:
    out = Path(recipe.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise QBHeatError(f"--out {out} is a file; pass a folder.")
    if out.is_dir() and any(out.iterdir()) and not recipe.overwrite:
        raise QBHeatError(f"--out {out} is not empty; pick a new folder or pass --overwrite.")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise QBHeatError(f"cannot write into {parent} ({e.strerror}); choose a writable --out folder.") from None
    return out, tmp


def _check_backends(recipe: ExportRecipe) -> tuple[list[str], list[dict]]:
    wanted, not_built = [], []
    for fmt in recipe.formats:
        st = backends.format_status(fmt)
        if fmt == "tensorrt" and not st.can_build:
            not_built.append({"format": "tensorrt", "precisions": list(recipe.precisions), "reason": st.why_not_build})
            continue
        if not st.can_build:
            raise QBHeatError(f"cannot export {fmt}: {st.why_not_build}.")
        if fmt == "openvino" and "int8" in recipe.precisions and "int8" not in st.precisions:
            raise QBHeatError("OpenVINO INT8 needs nncf, which does not import here; install qbheat[openvino] or drop int8.")
        wanted.append(fmt)
    if not wanted:
        raise QBHeatError(f"none of the requested formats can be built here: {not_built[0]['reason']}.")
    return wanted, not_built


def run_export(recipe: ExportRecipe, quiet: bool = False) -> dict:
    """Run the whole pipeline; return the model card (also written to ``recipe.out``)."""
    recipe.validate()
    if recipe.model:
        import timm

        if not timm.is_model(recipe.model):
            from qbheat.models import create_model

            create_model(recipe.model)  # raises QBHeatError with close names, before any work
    formats, not_built = _check_backends(recipe)
    if recipe.calibration is not None and not Path(recipe.calibration).is_dir():
        raise QBHeatError(f"calibration folder {recipe.calibration} does not exist; pass a folder of images or leave --calibration out.")
    out, tmp = _prepare_out(recipe)
    try:
        card = _run(recipe, formats, not_built, tmp, quiet)
        write_model_card(tmp, card)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"[export] wrote {out}", file=sys.stderr)
    return card


def _artifact_plan(formats: list[str], precisions: list[str], tensorrt_ok: bool) -> list[tuple[str, str]]:
    plan = [(f, p) for f in ("onnx", "openvino", "coreml") if f in formats for p in ("fp32", "fp16", "int8") if p in precisions]
    if tensorrt_ok:
        plan += [("tensorrt", p) for p in ("fp32", "fp16", "int8") if p in precisions]
    return plan


def _run(recipe: ExportRecipe, formats: list[str], not_built: list[dict], tmp: Path, quiet: bool) -> dict:
    torch.manual_seed(0)
    plan = _artifact_plan(formats, recipe.precisions, "tensorrt" in formats)
    trt_check_needed = any(n["format"] == "tensorrt" for n in not_built)
    steps = Steps([*SETUP_STEPS, *(f"{fmt} {precision}" for fmt, precision in plan),
                   *([f"accuracy on {recipe.eval_data}"] if recipe.eval_data else []),
                   *([TENSORRT_CHECK_STEP] if trt_check_needed else [])], quiet)

    steps.start(SETUP_STEPS[0])
    src = load_source(recipe)
    pre: Preprocessing = src["pre"]
    size = pre.height
    reference = DeployableModel(src["backbone"], src["head"], src["variant"])
    from timm.utils.model import reparameterize_model

    deploy = DeployableModel(reparameterize_model(src["backbone"]), src["head"], src["variant"])
    params, macs = count_macs(reference, size)
    steps.done(f"{src['name']} + {src['task']} ({src['variant']}), {params / 1e6:.2f} M params, {macs / 1e6:.1f} M MACs at {size}")

    steps.start(SETUP_STEPS[1])
    program, example = export_program(deploy, size, recipe.max_batch)
    steps.done()

    steps.start(SETUP_STEPS[2])
    calib, check = calibration_and_parity(pre, recipe.calibration, recipe.calibration_count, max(PARITY_BATCHES))
    with torch.no_grad():
        ref = {b: [o.numpy() for o in reference(torch.from_numpy(check.inputs[:b]))] for b in PARITY_BATCHES}
    steps.done(f"{len(calib.names)} calibration images from {calib.source}")

    steps.start(SETUP_STEPS[3])
    guard = None
    if "fp16" in recipe.precisions or ("coreml" in formats and "int8" in recipe.precisions):
        from export import fp16_guard

        guard = fp16_guard.check(deploy, calib.inputs)
        steps.done(f"kept in FP32 (overflow or float16 rounding): {guard.overflowing or 'none'}")
    else:
        steps.done("skipped (no FP16 artifact requested)")

    ctx = _Context(recipe, src, pre, reference, deploy, program, example, calib, check, ref, guard, tmp, quiet)
    artifacts: list[dict] = []
    worker = _start_coreml_worker(ctx, plan, steps)
    try:
        for fmt, precision in plan:
            if worker is not None and fmt == "coreml":
                continue
            steps.start(f"{fmt} {precision}")
            _ship(ctx, steps, fmt, precision, _build(ctx, fmt, precision), artifacts, not_built)
        if worker is not None:
            try:
                built = worker.results()
            except QBHeatError:
                raise
            except Exception as e:  # noqa: BLE001  (the worker re-raises the converter's own exception)
                raise BuildError("coreml", "/".join(p for f, p in plan if f == "coreml"), e) from e
            for precision, (art, outputs), seconds in built:
                ctx._coreml_outputs = outputs
                steps.start(f"coreml {precision}")
                _ship(ctx, steps, "coreml", precision, art, artifacts, not_built, built_s=seconds)
    finally:
        if worker is not None:
            worker.close()
    if not artifacts:
        raise ParityError("every artifact was outside its tolerance; nothing was written.")
    if recipe.eval_data:
        steps.start(f"accuracy on {recipe.eval_data}")
        steps.done(_accuracy_gate(ctx, artifacts, not_built))

    if trt_check_needed:
        steps.start(TENSORRT_CHECK_STEP)
        from export import tensorrt_format

        report = tensorrt_format.check_onnx(ctx.onnx_fp32())
        qdq = _check_tensorrt_qdq(ctx) if "int8" in recipe.precisions else None
        for n in not_built:
            if n["format"] == "tensorrt":
                n["onnx_check"] = report
                if qdq is not None:
                    n["int8_qdq_check"] = qdq
        problems = report["unsupported"] + report["restrictions"] + (qdq["check"]["restrictions"] if qdq else [])
        steps.done(("parsable" if not problems else f"problems: {problems}")
                   + (f"; INT8 Q/DQ file on ONNX Runtime: min cosine {qdq['min_cosine']:.4f}" if qdq else ""))
    for extra in ctx.scratch:
        shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a format folder that held only scratch files
            extra.parent.rmdir()

    card = _card(ctx, artifacts, not_built, params, macs, steps.timings)
    if ctx.evaluation is not None:
        card["evaluation"] = ctx.evaluation
    return card


def _build(ctx: "_Context", fmt: str, precision: str) -> dict:
    """One format's builder; an unexpected exception inside it becomes a ``BuildError`` naming the format."""
    try:
        return BUILDERS[fmt](ctx, precision)
    except QBHeatError:
        raise
    except Exception as e:  # noqa: BLE001  (converters raise anything; the user needs one sentence)
        raise BuildError(fmt, precision, e) from e


def _accuracy_gate(ctx: "_Context", artifacts: list[dict], not_built: list[dict]) -> str:
    """Top-1 of every shipped artifact against PyTorch on ``--eval-data``; over ``--max-drop`` → fail closed
    (or, with ``--drop-mismatch``, leave that artifact out). Parity ran first, so this sees only artifacts
    that agree with PyTorch on the parity images."""
    from export import evaluate
    from export.eval_data import load_eval_set
    from export.localize import describe

    recipe = ctx.recipe
    key = "drop_mAP" if ctx.src["task"] == "detector" else "drop_top1"
    card = {"artifacts": artifacts}
    if ctx.src["task"] == "detector":  # COCO mAP on a COCO folder (export.eval_detection)
        from export import eval_detection

        data, results, over, ctx.evaluation = eval_detection.export_gate(ctx.tmp, artifacts, ctx.src["labels"], ctx.pre.card(),
                                                                        ctx.reference, recipe.eval_data, recipe.eval_limit, recipe.max_drop)
    elif ctx.src["task"] != "classifier":
        raise QBHeatError(f"--eval-data measures classifier heads (top-1) and detector heads (COCO mAP); this export's head is a {ctx.src['task']}.")
    else:
        data = load_eval_set(recipe.eval_data, {"head": {"labels": ctx.src["labels"]}, "preprocessing": ctx.pre.card()}, recipe.eval_limit)
        ref_scores, results = evaluate.evaluate_all(ctx.tmp, card, data, ctx.reference, quiet=ctx.quiet)
        ctx.eval_scores = (data, ref_scores)
        over = evaluate.gate(results, card, recipe.max_drop) if recipe.max_drop is not None else []
        ctx.evaluation = evaluate.evaluation_block(data, ref_scores, recipe.max_drop)
    for art in artifacts:
        art["accuracy"] = results[art["path"]]
    probe = next(data.batches(16))[1]
    for art, verdict in over:
        acc = results[art["path"]]
        div = _divergence(ctx, art, probe)
        art["divergence"] = div
        message = verdict.sentence(f"{art['format']} {art['precision']} ({art['path']})", acc[f"{key}_ci"]) + describe(div)
        if recipe.allow_mismatch:  # kept, and the card says so
            art["mismatch"] = True
            art["notes"].append("ACCURACY: " + message)
            continue
        if not recipe.drop_mismatch:
            raise AccuracyError(f"{message}; nothing was written (pass --drop-mismatch to ship the others).")
        artifacts.remove(art)
        for f in art.get("files") or [{"path": art["path"]}]:
            ctx.scratch.append(ctx.tmp / f["path"])
        not_built.append({"format": art["format"], "precision": art["precision"], "reason": f"accuracy: {message}",
                          "accuracy": acc, "divergence": div})
        if not ctx.quiet:
            print(f"[export]     DROPPED (over the accuracy budget): {message}", file=sys.stderr, flush=True)
    if not artifacts:
        raise AccuracyError(f"every artifact was over the --max-drop budget of {recipe.max_drop:g} points; nothing was written.")
    worst = max((results[a["path"]] for a in artifacts if key in results[a["path"]]), key=lambda r: r[key], default=None)
    budget = f", budget {recipe.max_drop:g}" if recipe.max_drop is not None else ""
    metric = "mAP" if key == "drop_mAP" else "top1"
    return (f"PyTorch {metric.replace('top1', 'top-1')} {ctx.evaluation['pytorch'][metric]:.2f} % on {len(data)} images; largest drop of "
            f"those shipped {worst[key]:+.2f} points{budget}" if worst else "no artifact runs here")


def _start_coreml_worker(ctx: "_Context", plan: list[tuple[str, str]], steps: Steps):
    """Fork a worker for the Core ML builds when other formats can run beside it (see export.worker)."""
    from export import worker

    jobs = [p for f, p in plan if f == "coreml"]
    if not (jobs and len(jobs) < len(plan) and ctx.recipe.parallel and worker.can_fork()):
        return None
    steps.note(f"coreml {', '.join(jobs)}: building in a parallel worker process")
    return worker.ForkedBuilds(lambda precision: (_build_coreml(ctx, precision), ctx._coreml_outputs), jobs)


def _ship(ctx: "_Context", steps: Steps, fmt: str, precision: str, art: dict, artifacts: list[dict], not_built: list[dict],
          built_s: float | None = None) -> None:
    """Verify one built artifact, then keep it, or (``--drop-mismatch``) list it under not_built."""
    t0 = time.perf_counter()
    try:
        _verify(ctx, fmt, precision, art)
    except _Dropped as e:  # --drop-mismatch: this artifact is not shipped, the others are
        for f in art.get("files") or [{"path": art["path"]}]:
            ctx.scratch.append(ctx.tmp / f["path"])
        not_built.append({"format": fmt, "precision": precision, "reason": f"parity: {e}", "divergence": art.get("divergence")})
        steps.done(f"DROPPED (outside tolerance): {e}")
        return
    artifacts.append(art)
    if built_s is None:
        steps.done(_summary(art))
    else:
        steps.done(f"{_summary(art)} (built in the worker in {built_s:.1f} s)", seconds=built_s + time.perf_counter() - t0)


def _min_cosine(results: dict) -> float:
    """The lowest cosine over the batches and outputs of one artifact's parity results."""
    return min(v.get("cosine_min", 1.0) for r in results.values() for v in r["outputs"].values())


def _compare(ctx: "_Context", batch: int, out: list, fmt: str, precision: str) -> dict:
    """Parity of one format's outputs on the first ``batch`` check images against PyTorch's."""
    return parity.compare(ctx.src["task"], ctx.src["variant"], ctx.output_names, ctx.ref[batch], out, fmt, precision,
                          nms=_nms_fn(ctx))


def _summary(art: dict) -> str:
    if art["verified"] == "parity":
        p = art["parity"]
        worst = _min_cosine(p)
        return f"parity {'ok' if all(b['passed'] for b in p.values()) else 'MISMATCH'} (min cosine {worst:.6f})"
    return f"verified {art['verified']}"


class _Context:
    def __init__(self, recipe, src, pre, reference, deploy, program, example, calib: ImageSet, check: ImageSet, ref, guard, tmp: Path,
                 quiet: bool = False):
        self.recipe, self.src, self.pre, self.reference, self.deploy = recipe, src, pre, reference, deploy
        self.program, self.example, self.calib, self.check, self.ref, self.guard, self.tmp = program, example, calib, check, ref, guard, tmp
        self.output_names = deploy.output_names
        self.scratch: list[Path] = []
        self.quiet = quiet  # --quiet: the converters' own progress output (NNCF's bars) is discarded too
        self._onnx_fp32: Path | None = None
        self._onnx_fp16: tuple[Path, list[str]] | None = None
        self._tensorrt_qdq: Path | None = None
        self.tensorrt_qdq_notes: list[str] = []  # the quantiser's notes on that file
        self._ov_fp32 = None
        self.evaluation: dict | None = None  # --eval-data: the card's evaluation block
        self.eval_scores = None  # --eval-data: (EvalSet, PyTorch's scores on it), once the gate has run
        self.auto = recipe.int8_scope == AUTO
        self._search = None  # --int8-scope auto: export.int8_auto.Search (built on first use)
        self.tensorrt_qdq_auto: dict | None = None  # that search's record for the TensorRT-style file
        self.metadata = {
            "qbheat.model_card_schema": SCHEMA, "model": src["name"], "head": src["task"], "head_variant": src["variant"],
            "head_type": getattr(src["head"], "head_type", ""), "labels": json.dumps(src["labels"]),
            "preprocessing": json.dumps(pre.card()), "pretrain_method": str(src["method"]),
            "source_sha256": str(src["source"]["sha256"]), "author": "qbheat-export",
            "description": f"{src['name']} backbone + {src['task']} head ({src['variant']}), exported by qbheat-export",
            "version": _qbheat_version(),
        }

    @property
    def pinned(self) -> list[str]:
        return list(self.guard.overflowing) if self.guard else []

    def path(self, *parts: str) -> Path:
        p = self.tmp.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

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
            from export.quantize import quantize_onnx_int8

            path = self.path("tensorrt", "model.int8.qdq.onnx")
            if self.auto:
                self.tensorrt_qdq_auto, self.tensorrt_qdq_notes = self.int8_search().onnx(path, "tensorrt")
                self.tensorrt_qdq_notes = [*self.tensorrt_qdq_notes, _auto_note(self.tensorrt_qdq_auto)]
            else:
                self.tensorrt_qdq_notes = quantize_onnx_int8(self.onnx_fp32(), path, self.calib.inputs, "image",
                                                             self.recipe.int8_scope, style="tensorrt")
            _add_onnx_metadata(path, {**self.metadata, "precision": "int8"})
            self._tensorrt_qdq = path
        return self._tensorrt_qdq

    def int8_search(self):
        """``--int8-scope auto``'s search (export.int8_auto): validation set, PyTorch's scores on it, module ranking."""
        if self._search is None:
            from export import evaluate, int8_auto
            from export.eval_data import load_eval_set

            r = self.recipe
            steps_note = f"--int8-scope auto: sensitivity and float modules on {r.validation_source} ({r.int8_validation_limit} images)"
            if not self.quiet:
                print(f"[export]     {steps_note}", file=sys.stderr, flush=True)
            data = load_eval_set(r.validation_source, {"head": {"labels": self.src["labels"]}, "preprocessing": self.pre.card()},
                                 r.int8_validation_limit)
            validation = int8_auto.Validation(data, evaluate.torch_scores(self.reference, data, quiet=True, threads=evaluate.THREADS))
            workdir = self.path(".int8_auto", "x").parent
            self.scratch.append(workdir)

            def scores_of(fmt: str, path: Path) -> np.ndarray:
                runner = evaluate.artifact_runner({"format": fmt, "precision": "int8"}, path, threads=evaluate.THREADS)
                try:
                    return evaluate.runner_scores(runner, data, quiet=True)
                finally:
                    runner.close()

            self._search = int8_auto.Search(self.onnx_fp32(), self.calib.inputs, "image", validation, r.max_drop, scores_of, workdir)
        return self._search

    def ov_fp32(self):
        if self._ov_fp32 is None:
            from export import openvino_format

            self._ov_fp32 = openvino_format.from_onnx(self.onnx_fp32(), "image", self.output_names, self.metadata)
        return self._ov_fp32


def _qbheat_version() -> str:
    import qbheat

    return qbheat.__version__


def _artifact(ctx: _Context, fmt: str, precision: str, files: list[Path], **extra) -> dict:
    main = files[0]
    art = {"format": fmt, "precision": precision, "path": str(main.relative_to(ctx.tmp)), "sha256": artifact_sha256(main),
           "size_bytes": _size(main), "opset": None, "verified": "not-run", "parity": None, "fp32_pinned": [], "notes": []}
    if len(files) > 1:
        art["files"] = [{"path": str(f.relative_to(ctx.tmp)), "sha256": file_sha256(f), "size_bytes": _size(f)} for f in files]
        art["size_bytes"] = sum(_size(f) for f in files)
    art.update(extra)
    return art


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# -- builders ------------------------------------------------------------------------------------

def _build_onnx(ctx: _Context, precision: str) -> dict:
    from export import onnx_format

    notes, pinned = [], []
    if precision == "fp32":
        path = ctx.onnx_fp32()
        if ctx._onnx_fp32 in ctx.scratch:
            ctx.scratch.remove(path)
    elif precision == "fp16":
        path, pinned = ctx.onnx_fp16()
        notes.append("float16 compute with float32 inputs/outputs; ONNX Runtime's CPU provider runs float16 nodes "
                     "without CPU kernels through inserted casts, so CPU parity is optimistic for FP16")
    else:
        from export.quantize import quantize_onnx_int8

        path = ctx.path("onnx", "model.int8.onnx")
        if ctx.auto:
            auto, quant_notes = ctx.int8_search().onnx(path, "onnxruntime")
            notes += quant_notes + [_auto_note(auto)]
        else:
            notes += quantize_onnx_int8(ctx.onnx_fp32(), path, ctx.calib.inputs, "image", ctx.recipe.int8_scope)
        _add_onnx_metadata(path, {**ctx.metadata, "precision": "int8"})
    if ctx.recipe.simplify and precision != "int8":
        notes += onnx_format.simplify(path, ctx.check.inputs[:2])
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    extra = {"int8_auto": auto} if precision == "int8" and ctx.auto else {}
    return _artifact(ctx, "onnx", precision, [path], opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     fp32_pinned=pinned, notes=notes, **extra)


def _auto_note(auto: dict) -> str:
    floats = auto["float_modules"]
    return (f"--int8-scope auto: {len(floats)} of {auto['modules']} modules kept in float "
            f"({', '.join(floats) if floats else 'none'}); validation top-1 drop {auto['validation_drop_top1']:+.2f} points "
            f"(95 % CI {auto['validation_drop_top1_ci'][0]:+.2f} to {auto['validation_drop_top1_ci'][1]:+.2f}) on "
            f"{auto['validation']['count']} images of {auto['validation']['source']}, budget {auto['budget']:g}")


def _add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key for p in model.metadata_props}
    for k, v in metadata.items():
        if k not in existing:
            e = model.metadata_props.add()
            e.key, e.value = k, str(v)
    onnx.save(model, str(path))


def _build_openvino(ctx: _Context, precision: str) -> dict:
    from export import openvino_format

    notes, pinned = [], []
    xml = ctx.path("openvino", precision, "model.xml")
    if precision == "fp32":
        files = openvino_format.save(ctx.ov_fp32(), xml, compress_to_fp16=False)
    elif precision == "fp16":
        model = ctx.ov_fp32().clone()
        model.set_rt_info("fp16", ["model_info", "precision"])
        if ctx.pinned:
            pinned = openvino_format.pin_fp32(model, openvino_format.onnx_nodes_in(ctx.onnx_fp32(), ctx.pinned))
        files = openvino_format.save(model, xml, compress_to_fp16=True)
        notes.append("FP16-compressed weights; compute precision is the device's (parity uses the f32 hint)")
    elif ctx.auto:
        model, auto = ctx.int8_search().openvino(ctx.ov_fp32(), xml, ctx.src["task"] == "detector", ctx.quiet)
        files = openvino_format.save(model, xml, compress_to_fp16=False)
        notes += [f"NNCF post-training INT8 on {len(ctx.calib.names)} calibration images, scope 'auto' "
                  f"({auto['openvino_float_ops']} OpenVINO ops in float through NNCF's IgnoredScope)", _auto_note(auto)]
        return _artifact(ctx, "openvino", precision, files, notes=notes, int8_auto=auto)
    else:
        model = openvino_format.quantize_int8(ctx.ov_fp32().clone(), ctx.calib.inputs, ctx.src["task"] == "detector",
                                              quiet=ctx.quiet, scope=ctx.recipe.int8_scope)
        model.set_rt_info("int8", ["model_info", "precision"])
        files = openvino_format.save(model, xml, compress_to_fp16=False)
        notes.append(f"NNCF post-training INT8 on {len(ctx.calib.names)} calibration images, scope {ctx.recipe.int8_scope!r}")
    return _artifact(ctx, "openvino", precision, files, fp32_pinned=pinned, notes=notes)


def _build_coreml(ctx: _Context, precision: str) -> dict:
    from export import coreml_format

    if not hasattr(ctx, "_coreml_program"):
        variant = "probabilities" if ctx.src["task"] == "classifier" else ctx.src["variant"]
        model = coreml_format.ChannelRescale(DeployableModel(ctx.deploy.backbone, ctx.deploy.head, variant), ctx.pre.std)
        program, _ = export_program(model, ctx.pre.height, 1, dynamic=False)
        ctx._coreml_program = coreml_format.decompose(program)
        ctx._coreml_outputs = model.output_names
    labels = ctx.src["labels"] if ctx.src["task"] == "classifier" else None
    fp32_ops: list[str] = []
    cached_fp16 = getattr(ctx, "_coreml_fp16", None)
    if precision == "int8" and cached_fp16 is not None:  # same program, weights quantised: no second conversion
        mlmodel = coreml_format.quantize_weights_int8(cached_fp16[0])
        coreml_format.discard(cached_fp16[0])
        del ctx._coreml_fp16
        coreml_format.set_metadata(mlmodel, {**ctx.metadata, "precision": precision})
        fp32_ops = list(cached_fp16[1])
    else:
        mlmodel = coreml_format.convert(ctx._coreml_program, ctx.pre, "image", ctx._coreml_outputs, precision, labels,
                                        {**ctx.metadata, "precision": precision}, [f"model.{p}" for p in ctx.pinned], fp32_ops)
        if precision == "fp16" and "int8" in ctx.recipe.precisions:
            ctx._coreml_fp16 = (mlmodel, list(fp32_ops))
    path = coreml_format.save(mlmodel, ctx.path("coreml", f"model.{precision}.mlpackage"))
    if getattr(ctx, "_coreml_fp16", (None,))[0] is not mlmodel:  # the FP16 model kept for INT8 is discarded after it
        coreml_format.discard(mlmodel)
    notes = [f"ML Program, minimum deployment target {coreml_format.MINIMUM_DEPLOYMENT_TARGET}; input: RGB image, "
             f"normalisation in ImageType scale/bias + per-channel factor"]
    if labels is not None:
        notes.append("classifier: softmax probabilities with ClassifierConfig labels (outputs classLabel + probabilities)")
    if precision == "int8":
        notes.append("int8 = 8-bit linear weight quantisation; activations run in FP16")
    return _artifact(ctx, "coreml", precision, [path], fp32_pinned=sorted(set(fp32_ops)), notes=notes)


def _build_tensorrt(ctx: _Context, precision: str) -> dict:
    """An engine from the ONNX file of the same precision (strongly typed: the file sets each layer's type)."""
    from export import tensorrt_format

    engine = ctx.path("tensorrt", f"model.{precision}.engine")
    notes, pinned = [], []
    if precision == "fp32":
        source = ctx.onnx_fp32()
    elif precision == "fp16":
        source, pinned = ctx.onnx_fp16()
    else:
        source = ctx.tensorrt_qdq()
        notes += ctx.tensorrt_qdq_notes
    facts = tensorrt_format.build_engine(source, engine, precision, opt_batch=4, max_batch=ctx.recipe.max_batch,
                                         timing_cache=ctx.path("tensorrt", "timing.cache"), metadata=ctx.metadata)
    files = [engine, Path(str(engine) + ".json")] + ([source] if precision == "int8" else [])
    notes.append(f"TensorRT {facts['tensorrt']}, {'strongly' if facts['strongly_typed'] else 'weakly'} typed from "
                 f"{source.name}, profile batch {facts['profile']}; metadata in the sidecar JSON")
    extra = {"int8_auto": ctx.tensorrt_qdq_auto} if precision == "int8" and ctx.tensorrt_qdq_auto else {}
    return _artifact(ctx, "tensorrt", precision, files, fp32_pinned=pinned, notes=notes, **extra)


def _check_tensorrt_qdq(ctx: _Context) -> dict:
    """Where TensorRT cannot build: the INT8 Q/DQ file an engine would be built from, checked against
    TensorRT's parser rules and run on ONNX Runtime against PyTorch (its quantisation points and
    scales are the engine's, so this is the INT8 engine's quantisation error, up to kernel rounding)."""
    from export import onnx_format, tensorrt_format

    path = ctx.tensorrt_qdq()
    ctx.scratch.append(path)
    run = onnx_format.runner(path)
    results = {f"batch{b}": _compare(ctx, b, run(ctx.check.inputs[:b]), "onnx", "int8") for b in PARITY_BATCHES}
    out = {"file": path.name, "notes": ctx.tensorrt_qdq_notes, "check": tensorrt_format.check_onnx(path),
           "onnxruntime_parity": results, "min_cosine": _min_cosine(results), "passed": all(r["passed"] for r in results.values())}
    if ctx.tensorrt_qdq_auto:
        out["int8_auto"] = ctx.tensorrt_qdq_auto
    if ctx.eval_scores is not None:  # --eval-data: the file's top-1 on ONNX Runtime (an INT8 engine's quantisation, up to kernels)
        from export import accuracy, evaluate

        data, ref_scores = ctx.eval_scores
        runner = evaluate.artifact_runner({"format": "onnx", "precision": "int8"}, path, threads=evaluate.THREADS)
        try:
            scores = evaluate.runner_scores(runner, data, desc="eval tensorrt-style int8 (onnxruntime)", quiet=ctx.quiet)
        finally:
            runner.close()
        out["accuracy"] = accuracy.classification_scores(ref_scores, scores, data.labels)
    return out


BUILDERS = {"onnx": _build_onnx, "openvino": _build_openvino, "coreml": _build_coreml, "tensorrt": _build_tensorrt}


# -- verification --------------------------------------------------------------------------------

def _runner(ctx: _Context, fmt: str, art: dict):
    path = ctx.tmp / art["path"]
    if fmt == "onnx":
        from export import onnx_format

        return onnx_format.runner(path)
    if fmt == "openvino":
        from export import openvino_format

        return openvino_format.runner(path)
    from export import tensorrt_format

    return tensorrt_format.runner(path)


def _verify(ctx: _Context, fmt: str, precision: str, art: dict) -> None:
    status = backends.format_status(fmt)
    if fmt == "coreml" and not status.can_run:
        from export import coreml_format

        expect = ["classLabel"] if ctx.src["task"] == "classifier" else list(ctx._coreml_outputs)
        spec = coreml_format.verify_spec(ctx.tmp / art["path"], "image", ctx.pre.height, expect)
        art["verified"], art["spec"] = "spec-only", spec
        art["notes"].append("Core ML prediction needs macOS: only the saved spec was verified here")
        if not spec["passed"]:
            _fail(ctx, art, f"coreml {precision}: spec check failed: {'; '.join(spec['problems'])}")
        return
    results = {}
    if fmt == "coreml":  # macOS: predict on the uint8 images, compare probabilities / outputs
        from export import coreml_format

        labels = ctx.src["labels"] if ctx.src["task"] == "classifier" else None
        run = coreml_format.runner(ctx.tmp / art["path"], labels, ctx._coreml_outputs, "image")
        variant = "probabilities" if labels is not None else ctx.src["variant"]
        names = ("probabilities",) if labels is not None else ctx.output_names
        ref_model = DeployableModel(ctx.reference.backbone, ctx.reference.head, variant)
        for b in PARITY_BATCHES:
            with torch.no_grad():
                ref = [o.numpy() for o in ref_model(torch.from_numpy(ctx.check.inputs[:b]))]
            results[f"batch{b}"] = parity.compare(ctx.src["task"], variant, names, ref, run(ctx.check.images_u8[:b]), fmt, precision,
                                                  nms=_nms_fn(ctx))
    else:
        try:
            run = _runner(ctx, fmt, art)
        except Exception as e:  # noqa: BLE001  (a runtime that cannot load its own artifact is a failed check)
            _fail(ctx, art, f"{fmt} {precision} does not load: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return
        for b in PARITY_BATCHES:
            try:
                out = run(ctx.check.inputs[:b])
            except Exception as e:  # noqa: BLE001  (a runtime that cannot run its own artifact is a failed check)
                _fail(ctx, art, f"{fmt} {precision} does not run at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                return
            results[f"batch{b}"] = _compare(ctx, b, out, fmt, precision)
    art["verified"], art["parity"] = "parity", results
    failures = [f"batch {k[5:]}: {f}" for k, r in results.items() for f in r["failures"]]
    if failures:
        _fail(ctx, art, f"{fmt} {precision} is outside its tolerance — " + "; ".join(failures[:4]))


def _nms_fn(ctx: _Context):
    if ctx.src["task"] != "detector":
        return None
    head, size = ctx.deploy.head, ctx.pre.height

    def nms(boxes, scores):
        with torch.no_grad():
            out = head.nms(torch.as_tensor(np.asarray(boxes, np.float32)), torch.as_tensor(np.asarray(scores, np.float32)), size, size)
        return tuple(o.numpy() for o in out)

    return nms


class _Dropped(Exception):
    """An artifact outside its tolerance under ``drop_mismatch``."""


def _divergence(ctx: _Context, art: dict, images: np.ndarray) -> dict | None:
    """The first module of a failing ONNX artifact below its cosine tolerance (``export.localize``), or None."""
    from export import localize

    try:
        return localize.for_artifact(ctx.tmp / art["path"], art, ctx.deploy, images)
    except Exception:  # noqa: BLE001  (a diagnosis that cannot run must not hide the failure it explains)
        return None


def _fail(ctx: _Context, art: dict, message: str) -> None:
    div = _divergence(ctx, art, ctx.check.inputs)
    if div is not None:
        from export.localize import describe

        art["divergence"] = div
        message += describe(div)
    art["notes"].append("MISMATCH: " + message)
    art["mismatch"] = True
    if ctx.recipe.drop_mismatch and not ctx.recipe.allow_mismatch:
        raise _Dropped(message)
    if not ctx.recipe.allow_mismatch:
        raise ParityError(f"{message}; nothing was written (pass --allow-mismatch to keep it, recorded in the card).")


# -- model card ----------------------------------------------------------------------------------

def _card(ctx: _Context, artifacts: list[dict], not_built: list[dict], params: int, macs: int, timings: dict) -> dict:
    src = ctx.src
    names = ctx.output_names
    outputs = [{"name": n, "shape": ["batch", *list(r.shape[1:])], "dtype": str(r.dtype)} for n, r in zip(names, ctx.ref[4])]
    card = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": src["name"], "source": src["source"], "pretrain_method": src["method"], "params": params,
                  "macs": macs, "flops": 2 * macs, "flops_counter": "torch.utils.flop_counter.FlopCounterMode, batch 1"},
        "head": {"type": src["task"], "variant": src["variant"], "head_type": src["head"].head_type,
                 "kwargs": dict(src["head"].kwargs), "labels": src["labels"]},
        "preprocessing": ctx.pre.card(),
        "io": {"inputs": [{"name": "image", "shape": ["batch", 3, ctx.pre.height, ctx.pre.height], "dtype": "float32"}],
               "outputs": outputs},
        "artifacts": artifacts,
        "tools": backends.tool_versions(ctx.recipe.formats),
        "fp16_guard": ctx.guard.card() if ctx.guard else None,
        "calibration": ctx.calib.card(),
        "parity_images": {**ctx.check.card(), "batches": list(PARITY_BATCHES)},
        "parity_tolerances": parity.tolerance_table(),
        "not_built": not_built,
        "allow_mismatch": ctx.recipe.allow_mismatch,
        "drop_mismatch": ctx.recipe.drop_mismatch,
        "notes": src["notes"],
        "timings_s": timings,
        "recipe": {k: v for k, v in asdict(ctx.recipe).items() if k not in ("out",)},
    }
    return card
