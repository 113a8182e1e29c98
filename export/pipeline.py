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
6. Per format × precision (the plan): the format's builder from ``export.formats.BUILDERS`` builds
   the artifact, then verifies it — run at batch 1 and batch 4 against PyTorch
   (``export.verification``, ``qbheat_contract.parity``), or check the Core ML spec on Linux. Each
   format's build and verify live in its ``export.<format>_format`` module; the files formats share
   (the FP32 and FP16 ONNX files, …) are built once by ``export.context.ExportContext``. On Linux with
   two or more cores the Core ML builds run in a forked worker beside the other formats
   (``export.worker``; ``--serial`` turns this off); they are verified in the parent like the rest.
   Outside tolerance → stop, delete everything, raise ``ParityError`` — unless ``allow_mismatch``,
   then the card records it (``--drop-mismatch``: the artifact is left out, the others ship).
7. With ``--eval-data``: the accuracy gate (top-1 of every artifact against PyTorch, ``--max-drop``).
8. Where TensorRT cannot build: its parser check of the ONNX files (``tensorrt_format.check_without_engine``).
9. ``model_card.json`` with hashes; the temporary folder is renamed into place (atomic).

Every step line reads ``[export] i/N …``: N counts the setup steps, the plan's artifacts and the
steps 7 and 8 that will run, all known before the first step starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from export import backends
from export.calibration import calibration_and_parity
from export.context import ExportContext
from export.deployable import DeployableModel
from export.formats import BUILDERS
from export.recipe import PRECISIONS, ExportRecipe
from export.source import count_macs, export_program, load_source
from export.verification import PARITY_BATCHES, Dropped, ParityError, divergence, min_cosine
from qbheat.errors import QBHeatError
from qbheat_contract import parity
from qbheat_contract.card import SCHEMA, write_model_card

__all__ = ["AccuracyError", "BuildError", "ParityError", "Steps", "run_export"]

# The steps before the per-artifact ones; the plan (format × precision), the accuracy gate and TensorRT's
# parser check follow, and their count is the "/N" of every step line.
SETUP_STEPS = ("load model and head", "torch.export (example batch 2, symbolic batch)",
               "calibration + parity images, PyTorch reference outputs", "FP16 guard")
TENSORRT_CHECK_STEP = "tensorrt: ONNX parser operator check"


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


def _artifact_plan(formats: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(format, precision) for every artifact to build, in the format table's and the precisions' order."""
    return [(f, p) for f in BUILDERS if f in formats for p in PRECISIONS if p in precisions]


def _run(recipe: ExportRecipe, formats: list[str], not_built: list[dict], tmp: Path, quiet: bool) -> dict:
    torch.manual_seed(0)
    plan = _artifact_plan(formats, recipe.precisions)
    trt_check_needed = any(n["format"] == "tensorrt" for n in not_built)
    steps = Steps([*SETUP_STEPS, *(f"{fmt} {precision}" for fmt, precision in plan),
                   *([f"accuracy on {recipe.eval_data}"] if recipe.eval_data else []),
                   *([TENSORRT_CHECK_STEP] if trt_check_needed else [])], quiet)

    steps.start(SETUP_STEPS[0])
    src = load_source(recipe)
    pre = src.pre
    size = pre.height
    reference = DeployableModel(src.backbone, src.head, src.variant)
    from timm.utils.model import reparameterize_model

    deploy = DeployableModel(reparameterize_model(src.backbone), src.head, src.variant)
    params, macs = count_macs(reference, size)
    # --eval-data is read now, so that a folder the head cannot be measured on fails before any conversion
    eval_set = _load_eval_set(recipe, src) if recipe.eval_data else None
    steps.done(f"{src.name} + {src.task} ({src.variant}), {params / 1e6:.2f} M params, {macs / 1e6:.1f} M MACs at {size}")

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

    ctx = ExportContext(recipe, src, reference, deploy, program, example, calib, check, ref, guard, tmp, quiet)
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
                ctx.coreml_outputs = outputs
                steps.start(f"coreml {precision}")
                _ship(ctx, steps, "coreml", precision, art, artifacts, not_built, built_s=seconds)
    finally:
        if worker is not None:
            worker.close()
    if not artifacts:
        raise ParityError("every artifact was outside its tolerance; nothing was written.")
    if recipe.eval_data:
        steps.start(f"accuracy on {recipe.eval_data}")
        steps.done(_accuracy_gate(ctx, eval_set, artifacts, not_built))

    if trt_check_needed:
        steps.start(TENSORRT_CHECK_STEP)
        from export import tensorrt_format

        steps.done(tensorrt_format.check_without_engine(ctx, not_built))
    for extra in ctx.scratch:
        shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a format folder that held only scratch files
            extra.parent.rmdir()

    card = _card(ctx, artifacts, not_built, params, macs, steps.timings)
    if ctx.evaluation is not None:
        card["evaluation"] = ctx.evaluation
    return card


def _build(ctx: ExportContext, fmt: str, precision: str) -> dict:
    """One format's builder; an unexpected exception inside it becomes a ``BuildError`` naming the format."""
    try:
        return BUILDERS[fmt].build(ctx, precision)
    except QBHeatError:
        raise
    except Exception as e:  # noqa: BLE001  (converters raise anything; the user needs one sentence)
        raise BuildError(fmt, precision, e) from e


def _load_eval_set(recipe: ExportRecipe, src) -> Any:
    """``--eval-data`` as the head measures it: an EvalSet (classifier, top-1) or a DetectionSet (detector, COCO
    mAP), preprocessed as the model card says; a source that does not fit the head raises QBHeatError."""
    card = {"head": {"labels": src.labels}, "preprocessing": src.pre.card()}
    if src.task == "detector":
        from export.eval_detection import load_detection_set

        return load_detection_set(recipe.eval_data, card, recipe.eval_limit)
    if src.task != "classifier":
        raise QBHeatError(f"--eval-data measures classifier heads (top-1) and detector heads (COCO mAP); this export's head is a {src.task}.")
    from export.eval_data import load_eval_set

    return load_eval_set(recipe.eval_data, card, recipe.eval_limit)


def _accuracy_gate(ctx: ExportContext, data: Any, artifacts: list[dict], not_built: list[dict]) -> str:
    """The task metric of every shipped artifact against PyTorch on ``--eval-data`` (``data``, read by
    ``_load_eval_set``); over ``--max-drop`` → fail closed (or, with ``--drop-mismatch``, leave that artifact
    out). Parity ran first, so this sees only artifacts that agree with PyTorch on the parity images."""
    from export import evaluate
    from export.localize import describe

    recipe = ctx.recipe
    key = "drop_mAP" if ctx.src.task == "detector" else "drop_top1"
    card = {"artifacts": artifacts}
    if ctx.src.task == "detector":  # COCO mAP on a COCO folder (export.eval_detection)
        from export import eval_detection

        results, over, ctx.evaluation = eval_detection.export_gate(ctx.tmp, artifacts, ctx.src.labels, ctx.pre.card(),
                                                                  ctx.reference, data, recipe.max_drop)
    else:
        ref_scores, results = evaluate.evaluate_all(ctx.tmp, card, data, ctx.reference, quiet=ctx.quiet)
        ctx.eval_scores = (data, ref_scores)
        over = evaluate.gate(results, card, recipe.max_drop) if recipe.max_drop is not None else []
        ctx.evaluation = evaluate.evaluation_block(data, ref_scores, recipe.max_drop)
    for art in artifacts:
        art["accuracy"] = results[art["path"]]
    probe = next(data.batches(16))[1]
    for art, verdict in over:
        acc = results[art["path"]]
        div = divergence(ctx, art, probe)
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


def _start_coreml_worker(ctx: ExportContext, plan: list[tuple[str, str]], steps: Steps):
    """Fork a worker for the Core ML builds when other formats can run beside it (see export.worker)."""
    from export import worker

    jobs = [p for f, p in plan if f == "coreml"]
    if not (jobs and len(jobs) < len(plan) and ctx.recipe.parallel and worker.can_fork()):
        return None
    steps.note(f"coreml {', '.join(jobs)}: building in a parallel worker process")
    return worker.ForkedBuilds(lambda precision: (BUILDERS["coreml"].build(ctx, precision), ctx.coreml_outputs), jobs)


def _ship(ctx: ExportContext, steps: Steps, fmt: str, precision: str, art: dict, artifacts: list[dict], not_built: list[dict],
          built_s: float | None = None) -> None:
    """Verify one built artifact, then keep it, or (``--drop-mismatch``) list it under not_built."""
    t0 = time.perf_counter()
    try:
        BUILDERS[fmt].verify(ctx, precision, art)
    except Dropped as e:  # --drop-mismatch: this artifact is not shipped, the others are
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


def _summary(art: dict) -> str:
    if art["verified"] == "parity":
        p = art["parity"]
        worst = min_cosine(p)
        return f"parity {'ok' if all(b['passed'] for b in p.values()) else 'MISMATCH'} (min cosine {worst:.6f})"
    return f"verified {art['verified']}"



# -- model card ----------------------------------------------------------------------------------

def _card(ctx: ExportContext, artifacts: list[dict], not_built: list[dict], params: int, macs: int, timings: dict) -> dict:
    src = ctx.src
    names = ctx.output_names
    outputs = [{"name": n, "shape": ["batch", *list(r.shape[1:])], "dtype": str(r.dtype)} for n, r in zip(names, ctx.ref[4])]
    card = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": src.name, "source": src.source, "pretrain_method": src.method, "params": params,
                  "macs": macs, "flops": 2 * macs, "flops_counter": "torch.utils.flop_counter.FlopCounterMode, batch 1"},
        "head": {"type": src.task, "variant": src.variant, "head_type": src.head.head_type,
                 "kwargs": dict(src.head.kwargs), "labels": src.labels},
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
        "notes": src.notes,
        "timings_s": timings,
        "recipe": {k: v for k, v in asdict(ctx.recipe).items() if k not in ("out",)},
    }
    return card
