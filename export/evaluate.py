"""Task accuracy of PyTorch and of every runnable artifact of an export, on a labelled set.

PyTorch is the export's source model, rebuilt from what the card records (the checkpoint it names,
whose SHA-256 must match, or the timm name with the export's seed); each artifact runs through the
``deploy_targets`` runner of its format, batched, with a progress bar. Both see the same
preprocessed batches, so the drop is the artifact's alone. Results go into ``model_card.json``
(``evaluation`` and ``artifacts[].accuracy``, schema ``/2``), written atomically.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from export import accuracy
from export.eval_data import EvalSet
from qbheat_contract.card import SCHEMA, artifact_path, write_model_card
from qbheat.errors import QBHeatError

BATCH = 64  # images per run: large enough to amortise per-call overhead, small enough for any runtime's memory
THREADS = 1  # intra-op threads per model during evaluation (see evaluate_all)


def reference_model(card: dict, checkpoint: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference, deploy): the export's PyTorch model as it was before and after reparameterisation."""
    from timm.utils.model import reparameterize_model

    from export.source import load_source
    from export.recipe import ExportRecipe
    from qbheat_contract.hashing import artifact_sha256
    from export.deployable import DeployableModel

    source = card["model"]["source"]
    head = card["head"]
    fields = dict(head=head["type"], head_variant=head.get("variant"), image_size=int(card["preprocessing"]["input_size"][-1]), out="-")
    if source.get("kind") == "checkpoint" or checkpoint:
        path = Path(checkpoint or source["path"])
        if not path.is_file():
            raise QBHeatError(f"the export's source checkpoint {path} is not here; pass --checkpoint FILE with the same file.")
        if source.get("sha256") and artifact_sha256(path) != source["sha256"]:
            raise QBHeatError(f"checkpoint {path} is not the one this export was made from (SHA-256 differs from the card's).")
        recipe = ExportRecipe(checkpoint=str(path), **fields)
    else:  # a timm name: the export initialised it after torch.manual_seed(0), so the same seed rebuilds it
        kwargs = head.get("kwargs") or {}
        recipe = ExportRecipe(model=card["model"]["name"], head_type=head.get("head_type") or "linear",
                              num_classes=kwargs.get("num_classes") or (len(head["labels"]) if head.get("labels") else None), **fields)
    torch.manual_seed(0)
    src = load_source(recipe)
    ref = DeployableModel(src.backbone, src.head, src.variant).eval()
    import copy

    deploy = DeployableModel(reparameterize_model(copy.deepcopy(src.backbone)), src.head, src.variant).eval()
    return ref, deploy


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=quiet, leave=False)


def torch_scores(model: torch.nn.Module, data: EvalSet, batch: int = BATCH, quiet: bool = False, threads: int = 0) -> np.ndarray:
    """N×C class scores of the PyTorch model (its first output); ``threads`` > 0 sets PyTorch's
    intra-op threads for the run (restored after)."""
    out = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad(), _bar(len(data), "eval pytorch", quiet) as bar:
            for rows, x in data.batches(batch):
                out.append(np.asarray(model(torch.from_numpy(x))[0], np.float32))
                bar.update(rows.stop - rows.start)
    finally:
        torch.set_num_threads(before)
    return np.concatenate(out)


def evaluate_all(folder: Path, card: dict, data: EvalSet, reference: torch.nn.Module, batch: int = BATCH, threads: int = THREADS,
                 quiet: bool = False) -> tuple[np.ndarray, dict[str, dict]]:
    """(PyTorch's scores, ``evaluate_artifacts``' results), PyTorch running beside the artifacts.

    Evaluation is throughput work on batches, so each model gets ``threads`` intra-op threads (default
    one) and PyTorch runs on a second Python thread while the artifacts run one after another (both
    release the GIL in their kernels): two cores busy without any runtime's threads waiting on each
    other at every operator. On the shared 2-core machine, PyTorch's 2-thread run was 8× slower than
    its 1-thread run (benchmarks/results/eval_cost.md). The set is preprocessed once, before both."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in data.batches(batch):  # fills the EvalSet's cache, shared by both threads
        pass
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-pytorch") as pool:
        future = pool.submit(torch_scores, reference, data, batch, quiet, threads or 1)
        results = evaluate_artifacts(folder, card, data, future, batch, threads, quiet)
        return future.result(), results


def artifact_runner(art: dict, path: Path, batch: int = BATCH, threads: int = 0):
    """A loaded ``deploy_targets`` runner for the artifact, or a string saying why it cannot run here."""
    import platform

    from deploy_targets.runners import FORMAT_RUNTIMES, available, get_runner

    fmt = art["format"]
    runtime = FORMAT_RUNTIMES.get(fmt, (None,))[0]
    if fmt == "coreml" and platform.system() != "Darwin":
        return "Core ML prediction needs macOS"
    if runtime is None or not available(runtime):
        return f"the {runtime or fmt} runtime is not installed here"
    return get_runner(runtime, threads=threads, precision=art["precision"]).load(path, batch=batch)


def runner_scores(runner, data: EvalSet, batch: int = BATCH, desc: str = "eval", quiet: bool = False) -> np.ndarray:
    """N×C class scores of a loaded runner: its output of N×C shape (logits or probabilities)."""
    name = runner.inputs()[0]["name"]
    out = []
    with _bar(len(data), desc, quiet) as bar:
        for rows, x in data.batches(batch):
            if runner.takes_images:  # Core ML ImageType: uint8 N×H×W×3, normalisation inside the model
                x = np.ascontiguousarray(data_u8(x, data.preprocessing))
            res = runner.run({name: x})
            n = rows.stop - rows.start
            scores = next(v for v in res.values() if np.asarray(v).ndim == 2 and np.asarray(v).shape[0] == n)
            out.append(np.asarray(scores, np.float32))
            bar.update(n)
    return np.concatenate(out)


def data_u8(x: np.ndarray, prep: dict) -> np.ndarray:
    """Normalised N×3×H×W back to the uint8 N×H×W×3 crops an image-input model takes."""
    mean, std = np.asarray(prep["mean"], np.float32)[:, None, None], np.asarray(prep["std"], np.float32)[:, None, None]
    return np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def evaluate_artifacts(folder: Path, card: dict, data: EvalSet, ref_scores, batch: int = BATCH, threads: int = 0,
                       quiet: bool = False, on_result: Callable[[dict, dict], None] | None = None) -> dict[str, dict]:
    """``{artifact path: accuracy entry}`` for every artifact of ``card`` (entries of the card's schema).

    ``ref_scores``: PyTorch's N×C scores, or a future of them (``evaluate_all``)."""
    results = {}
    for art in card["artifacts"]:
        runner = artifact_runner(art, artifact_path(folder, art), batch, threads)
        if isinstance(runner, str):
            results[art["path"]] = {"skipped": runner}
        else:
            try:
                scores = runner_scores(runner, data, batch, f"eval {art['format']} {art['precision']}", quiet)
            finally:
                runner.close()
            ref = ref_scores.result() if hasattr(ref_scores, "result") else ref_scores
            results[art["path"]] = accuracy.classification_scores(ref, scores, data.labels)
        if on_result:
            on_result(art, results[art["path"]])
    return results


def evaluation_block(data: EvalSet, ref_scores: np.ndarray, max_drop: float | None) -> dict:
    hits = {k: round(float(100.0 * accuracy.topk_hits(ref_scores, data.labels, k).mean()), 4) for k in (1, 5)}
    return {"data": data.card(), "task": "classification", "metric": "top-1 / top-5 accuracy (%), drop in points vs PyTorch",
            "pytorch": {"top1": hits[1], "top5": hits[5], "n": len(data)},
            "bootstrap": {"resamples": accuracy.RESAMPLES, "confidence": accuracy.CONFIDENCE, "seed": accuracy.SEED,
                          "method": "paired over images (multinomial on per-image hit differences)"},
            "max_drop": max_drop, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def record(folder: Path, card: dict, block: dict, results: dict[str, dict]) -> Path:
    """Write the evaluation into the card (schema bumped to /2) atomically."""
    card["schema"] = SCHEMA
    card["evaluation"] = block
    for art in card["artifacts"]:
        if art["path"] in results:
            art["accuracy"] = results[art["path"]]
    return write_model_card(folder, card)


def check_hashes(folder: Path, card: dict) -> None:
    """Fail before any work when an artifact file is not the one the card describes."""
    from qbheat_contract.hashing import artifact_sha256

    for art in card["artifacts"]:
        path = artifact_path(folder, art)
        if not path.exists():
            raise QBHeatError(f"artifact {art['path']} listed in {folder}/model_card.json is missing; re-export.")
        if path.is_file() and artifact_sha256(path) != art["sha256"]:
            raise QBHeatError(f"artifact {art['path']} does not match the SHA-256 in its model card; re-export, or restore the file.")


def gate(results: dict[str, dict], card: dict, max_drop: float) -> list[tuple[dict, accuracy.BudgetVerdict]]:
    """(artifact, verdict) for each evaluated artifact whose top-1 drop is over ``max_drop`` points."""
    over = []
    for art in card["artifacts"]:
        r = results.get(art["path"]) or {}
        if "drop_top1" not in r:
            continue
        verdict = accuracy.within_budget(r["drop_top1"], max_drop)
        r["within_budget"] = verdict.passed
        if not verdict.passed:
            over.append((art, verdict))
    return over


def divergence(folder: Path, art: dict, deploy: torch.nn.Module, data: EvalSet, images: int = 16) -> dict | None:
    """``export.localize.for_artifact`` on the first ``images`` evaluation images."""
    from export import localize

    return localize.for_artifact(artifact_path(folder, art), art, deploy, next(data.batches(images))[1])
