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

from qbheat_contract.errors import QBHeatError
from qbheat_contract.hashing import artifact_sha256, artifact_size
from qbheat_contract.parity import check_outputs
from qbheat_contract.preprocessing import Preprocessing

from . import fingerprint as fp
from . import postprocess
from .protocol import ProtocolConfig, expand_options, measure, sweep
from .runners import get_runner


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
                    tolerance: dict[str, Any] | None = None, fmt: str | None = None) -> dict[str, Any]:
    """Golden-output check against the export's own tolerance table (``qbheat_contract.parity``)."""
    return check_outputs(got, expected, precision, fmt, tolerance)


def check_golden(runner, golden: dict[str, Any], precision: str, fmt: str | None = None) -> dict[str, Any]:
    """Run the golden inputs one image at a time (fits static-batch models and image inputs) and compare."""
    feeds = golden["inputs"]
    if runner.takes_images:
        if golden.get("images") is None:
            raise QBHeatError("this model takes images but the golden set has none; rebuild the bundle.")
        feeds = {runner.inputs()[0]["name"]: golden["images"]}
    n = next(iter(feeds.values())).shape[0]
    parts = [runner.run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return compare_outputs(got, golden["outputs"], precision, golden.get("tolerance"), fmt)


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
    prep = Preprocessing.from_dict(card["preprocessing"]) if card.get("preprocessing") else Preprocessing((3, *input_size))
    # The artifact was exported (and verified) at the card's resolution: feed that, not the profile's default.
    input_size = (prep.height, prep.width)
    head = card.get("head") or {}
    model = card.get("model") or {}
    host_info = host_info or fp.host()
    path = Path(artifact["abs_path"])
    sha = artifact.get("sha256") or artifact_sha256(path)
    art = {"path": artifact.get("path", path.name), "format": artifact.get("format"), "precision": artifact.get("precision", "fp32"),
           "sha256": sha, "size_bytes": artifact.get("size_bytes") or artifact_size(path)}
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
            state["crop"] = prep.decode_and_crop(image_bytes) if image_bytes is not None else None
            state["inputs"] = model_inputs(runner, conf["batch"], input_size, image=state["crop"])

        def run() -> None:
            runner.run(state["inputs"])

        def end_to_end() -> None:
            crop = prep.decode_and_crop(image_bytes)
            batch = np.repeat(crop[None], conf["batch"], 0)
            x = batch if runner.takes_images else prep.normalize(batch)
            outs = runner.run({next(iter(state["inputs"])): x})
            postprocess.postprocess(outs, head.get("type", "classifier"), head.get("labels"))

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
            row["golden"] = check_golden(runner, golden, art["precision"], art["format"])
        row["fingerprint"] = fp.fingerprint(runner.describe(), sha, host_info)
        runner.close()
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
