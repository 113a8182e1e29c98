"""Runs the protocol over a profile's sweep for a list of artifacts and produces result rows.

Shared by ``qbheat-export bench`` (host) and ``run_bundle.py`` (device): it knows artifact
entries (the model card's ``artifacts`` items with a resolved ``abs_path``), the card's
``preprocessing``/``head``/``model`` blocks, runners, the protocol and the fingerprint — and
nothing about torch, qbheat or the model card file itself.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import fingerprint as fp
from . import preprocess as pp
from ._errors import QBHeatError
from .protocol import ProtocolConfig, expand_options, measure, sweep
from .runners import get_runner

# Golden-output tolerances by artifact precision (ours): fp32 must match to float rounding, fp16
# and INT8 to the cosine levels their parity checks accept; top-1 must agree for fp32/fp16.
TOLERANCES = {
    "fp32": {"max_abs_rel": 1e-3, "cosine": 0.9999, "top1_agreement": 1.0},
    "fp16": {"max_abs_rel": None, "cosine": 0.999, "top1_agreement": 1.0},
    "int8": {"max_abs_rel": None, "cosine": 0.98, "top1_agreement": None},
}


def _concrete(shape: list[Any], batch: int, input_size: tuple[int, int]) -> tuple[int, ...]:
    """Fill symbolic dimensions: the first is the batch, the last two H and W, any other the 3 colour channels."""
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif i == 0:
            out.append(batch)
        elif i >= len(shape) - 2:
            out.append(input_size[i - (len(shape) - 2)])
        else:
            out.append(3)
    return tuple(out)


def model_inputs(runner, batch: int, input_size: tuple[int, int], seed: int = 0,
                 image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs for the loaded model at ``batch``; raises a QBHeatError for a static batch that differs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in runner.inputs():
        shape = list(spec["shape"])
        if shape and isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
            raise QBHeatError(f"the artifact's input {spec['name']} has a fixed batch of {shape[0]}, so batch {batch} cannot run.")
        concrete = _concrete(shape, batch, input_size)
        if "uint8" in str(spec["dtype"]):
            feeds[spec["name"]] = np.repeat(image[None], batch, 0) if image is not None else rng.integers(0, 256, concrete, dtype=np.uint8)
        else:
            feeds[spec["name"]] = rng.standard_normal(concrete, dtype=np.float32)
    return feeds


def compare_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], precision: str,
                    tolerance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Golden-output check: matched by name where the names agree, else by position."""
    tol = dict(TOLERANCES.get(precision, TOLERANCES["fp32"]), **(tolerance or {}))
    got_items = [got[k] for k in expected] if set(expected) <= set(got) else list(got.values())
    per_output, passed = [], True
    for (name, ref), out in zip(expected.items(), got_items):
        ref64, out64 = ref.astype(np.float64), np.asarray(out, np.float64).reshape(ref.shape)
        diff = np.abs(ref64 - out64)
        a, b = ref64.reshape(ref.shape[0], -1), out64.reshape(ref.shape[0], -1)
        cos = float(np.min((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))
        top1 = float(np.mean(a.argmax(1) == b.argmax(1)))
        scale = max(1.0, float(np.abs(ref64).max()))
        ok = cos >= tol["cosine"]
        if tol.get("max_abs_rel") is not None:
            ok = ok and float(diff.max()) <= tol["max_abs_rel"] * scale
        if tol.get("top1_agreement") is not None and a.shape[1] > 1:
            ok = ok and top1 >= tol["top1_agreement"]
        passed = passed and ok
        per_output.append({"name": name, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                           "cosine": cos, "top1_agreement": top1, "passed": ok})
    worst = min(per_output, key=lambda o: o["cosine"])
    return {"passed": passed, "max_abs": max(o["max_abs"] for o in per_output), "mean_abs": worst["mean_abs"],
            "cosine": worst["cosine"], "top1_agreement": worst["top1_agreement"], "tolerance": tol, "outputs": per_output}


def check_golden(runner, golden: dict[str, Any], precision: str) -> dict[str, Any]:
    """Run the golden inputs one image at a time (fits static-batch models and image inputs) and compare."""
    feeds = golden["inputs"]
    if runner.takes_images:
        if golden.get("images") is None:
            raise QBHeatError("this model takes images but the golden set has none; rebuild the bundle.")
        feeds = {runner.inputs()[0]["name"]: golden["images"]}
    n = next(iter(feeds.values())).shape[0]
    parts = [runner.run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return compare_outputs(got, golden["outputs"], precision, golden.get("tolerance"))


def bench_artifact(artifact: dict[str, Any], runtime: str, cfg: ProtocolConfig, *, threads: list[int], batches: list[int],
                   options: dict[str, Any], input_size: tuple[int, int], target: str, hardware: str = "",
                   card: dict[str, Any] | None = None, image_bytes: bytes | None = None,
                   golden: dict[str, Any] | None = None, host_info: dict[str, Any] | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   on_row: Callable[[dict[str, Any]], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Every configuration of the sweep for one artifact, one row each.

    ``golden`` = {"inputs": {name: array}, "outputs": {name: array}, "image": uint8 H×W×3 or None,
    "tolerance": {...} or None}: checked once per configuration, before timing.
    """
    card = card or {}
    prep = card.get("preprocessing") or dict(pp.IMAGENET, input_size=[3, *input_size])
    # The artifact was exported (and verified) at the card's resolution: feed that, not the profile's default.
    input_size = tuple(prep["input_size"][-2:])
    head = card.get("head") or {}
    model = card.get("model") or {}
    host_info = host_info or fp.host()
    path = Path(artifact["abs_path"])
    sha = artifact.get("sha256") or fp.sha256_path(path)
    art = {"path": artifact.get("path", path.name), "format": artifact.get("format"), "precision": artifact.get("precision", "fp32"),
           "sha256": sha, "size_bytes": artifact.get("size_bytes") or fp.size_bytes(path)}
    rows = []
    for conf in sweep(threads, batches, expand_options(options)):
        row: dict[str, Any] = {"target": target, "hardware": hardware, "model": model.get("name"), "head": head.get("type"),
                               "runtime": runtime, "threads": conf["threads"], "batch": conf["batch"],
                               "options": conf["options"], "artifact": art, "parity": artifact.get("parity"),
                               "accuracy": artifact.get("accuracy"),
                               "macs": model.get("macs"), "flops": model.get("flops"), "params": model.get("params"),
                               "golden": None, "skipped": None}
        runner = get_runner(runtime, threads=conf["threads"], precision=art["precision"], **conf["options"])
        state: dict[str, Any] = {}

        def load() -> None:
            runner.load(path, batch=conf["batch"])
            state["crop"] = pp.decode_and_crop(image_bytes, prep) if image_bytes is not None else None
            state["inputs"] = model_inputs(runner, conf["batch"], input_size, image=state["crop"])

        def run() -> None:
            runner.run(state["inputs"])

        def end_to_end() -> None:
            crop = pp.decode_and_crop(image_bytes, prep)
            batch = np.repeat(crop[None], conf["batch"], 0)
            x = batch if runner.takes_images else pp.normalize(batch, prep)
            outs = runner.run({next(iter(state["inputs"])): x})
            pp.postprocess(outs, head.get("type", "classifier"), head.get("labels"))

        try:
            result = measure(load, run, cfg, end_to_end if image_bytes is not None else None, clock, progress)
        except QBHeatError as e:
            if "fixed batch" not in str(e):
                raise
            row.update(skipped=str(e), warnings=[], fingerprint=fp.fingerprint(runner.describe(), sha, host_info))
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        row["input_shapes"] = {k: list(v.shape) for k, v in state["inputs"].items()}
        row.update(result)
        if golden is not None:
            row["golden"] = check_golden(runner, golden, art["precision"])
        row["fingerprint"] = fp.fingerprint(runner.describe(), sha, host_info)
        runner.close()
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
