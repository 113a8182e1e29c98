"""What holds QB-Heat back: one change at a time, settled on a validation split of the training images.

Each variant pre-trains ``mobileformer_micro`` on Fashion-MNIST (all 60k training images, no labels)
for ``--epochs`` with the trainer (``qbheat.train.pretrain``), then probes the frozen backbone on
a **validation split carved from the training images**: the probes fit on 10k of them and are
scored on 5k others (a fixed permutation; the test split is never read here). Reported per
variant: linear-probe and kNN (k=20) accuracy, each with the BatchNorm statistics pre-training left
("as trained") and with every BatchNorm layer re-estimated on full-size training images at the
probe's resolution ("BN at probe res."; label-free, ``recalibrate_untracked_batchnorm(every_layer=True)``).

The script extends its results file (``benchmarks/results/qbheat_ablation.json`` + ``.md``): a
(variant, seed) already there is skipped, and pre-training resumes from its checkpoint under
``--work-dir``, so an interrupted run continues where it stopped.

Run:  .venv/bin/python benchmarks/qbheat_ablation.py [--variants KEY ...] [--epochs 1] [--seeds 0]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import qbheat  # noqa: F401  (torchvision shim before timm)
from deploy_targets.fingerprint import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "qbheat_ablation"
OLD = {"qbheat.feature_strides": [16], "qbheat.token_conditioning": False,  # the default before issue 19
       "qbheat.visible_corner": "top_left"}
TOP_LEFT = {"qbheat.visible_corner": "top_left"}  # the rows before the random corner (now the YAML's default)

# key → (what changed, PretrainConfig overrides on top of qbheat_fashion_mnist_micro.yaml)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random init (no pre-training)", {}),
    "old_default": ("issue-7 default: stride 16 only, top-left block, per-patch normalised target", OLD),
    "s16_s32": ("+ loss at strides 16 and 32, decoders read token 0 (trains every part)", TOP_LEFT),
    "s16_s32_notoken": ("strides 16 and 32 without token conditioning", {**TOP_LEFT, "qbheat.token_conditioning": False}),
    "s16_s32_rand": ("+ random visible corner", {"qbheat.visible_corner": "random"}),
    "s16_s32_centre": ("+ centred visible block instead of a corner (steps outwards in 8 directions)",
                       {"qbheat.visible_corner": "centre"}),
    "s16_s32_rand_raw": ("+ random corner, raw-pixel target", {"qbheat.visible_corner": "random",
                                                               "qbheat.norm_pix_loss": False}),
    "s32_rand": ("stride 32 only (+ token 0), random corner", {"qbheat.visible_corner": "random",
                                                                "qbheat.feature_strides": [32]}),
    "s16_s32_rand_crop02": ("+ random corner, crop scale 0.2–1", {"qbheat.visible_corner": "random",
                                                                  "crop_scale": [0.2, 1.0]}),
    "s16_s32_rand_lr2e3": ("+ random corner, lr 2e-3", {"qbheat.visible_corner": "random", "lr": 2e-3}),
    "s16_s32_rand_lr5e4": ("+ random corner, lr 5e-4", {"qbheat.visible_corner": "random", "lr": 5e-4}),
    "s16_s32_rand_wd0": ("+ random corner, weight decay 0.01", {"qbheat.visible_corner": "random",
                                                                "weight_decay": 0.01}),
    "s16_s32_rand_128": ("+ random corner at 128 px (64-px quarters; 4× the compute per epoch)",
                         {"qbheat.visible_corner": "random", "image_size": 128}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=float, default=1.0, help="pre-training epochs per variant (default 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fit-size", type=int, default=10_000, help="training images the probes fit on")
    p.add_argument("--val-size", type=int, default=5_000, help="other training images the probes are scored on")
    p.add_argument("--jobs", type=int, default=2, help="variants run in parallel processes, 1 thread each")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / NAME))
    p.add_argument("--results-dir", default=str(RESULTS))
    return p.parse_args(argv)


def validation_split(fit_size: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets of the 60k training images (fixed permutation, seed 0)."""
    perm = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))
    return perm[:fit_size], perm[-val_size:]


def probe(backbone: torch.nn.Module, image_size: int, fit_size: int, val_size: int, seed: int) -> dict[str, float]:
    from qbheat.data import fashion_mnist
    from qbheat.evaluation.features import ProbePreprocessing, extract_features, recalibrate_untracked_batchnorm
    from qbheat.evaluation.knn import run_knn
    from qbheat.evaluation.linear_probe import LinearProbeConfig, run_linear_probe

    images, labels = fashion_mnist.load("train")
    fit, val = validation_split(fit_size, val_size)
    pre = ProbePreprocessing(input_size=(3, image_size, image_size))
    out = {}
    for tag in ("trained", "bn_probe_res"):
        if tag == "bn_probe_res":
            recalibrate_untracked_batchnorm(backbone, images[fit.numpy()], pre, progress=False, every_layer=True)
        tr = extract_features(backbone, images[fit.numpy()], pre, labels[fit.numpy()], progress=False)
        va = extract_features(backbone, images[val.numpy()], pre, labels[val.numpy()], progress=False)
        out[f"linear_{tag}"] = run_linear_probe(tr, va, LinearProbeConfig(seed=seed), 10).test_accuracy
        out[f"knn_{tag}"] = run_knn(tr, va, settings=((20, 0.07),), num_classes=10)["knn_k20_t0.07"]
    return out


def run_one(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    from qbheat.checkpoint import build_backbone, load_checkpoint
    from qbheat.config import load_config
    from qbheat.models import create_model
    from qbheat.train import pretrain

    t0 = time.perf_counter()
    overrides = dict(VARIANTS[key][1])
    info: dict[str, Any] = {"seed": seed}
    image_size = int(overrides.get("image_size", 64))
    if key == "random":
        torch.manual_seed(seed)
        backbone = create_model("mobileformer_micro", num_classes=0)
    else:
        out_dir = Path(args.work_dir) / f"{key}_e{args.epochs:g}_s{seed}"
        cfg = load_config(ROOT / "qbheat" / "configs" / "qbheat_fashion_mnist_micro.yaml", {
            **overrides, "epochs": args.epochs, "seed": seed, "out_dir": str(out_dir), "num_workers": 0,
            "progress": False, "tensorboard": False, "resume": "auto", "ckpt_every": 200, "log_every": 50})
        path = pretrain(cfg)
        info["pretrain_s"] = time.perf_counter() - t0
        backbone = build_backbone(load_checkpoint(path, kinds=("pretrain",)))
    # probes at the 64-px evaluation resolution whatever the pre-training size
    info |= probe(backbone, 64, args.fit_size, args.val_size, seed)
    info["wall_s"] = time.perf_counter() - t0
    return info


def write(results: dict[str, Any], args: argparse.Namespace) -> None:
    from qbheat.checkpoint import atomic_write_bytes

    d = Path(args.results_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / f"{NAME}.json", (json.dumps(results, indent=2) + "\n").encode())
    cols = ("linear_trained", "linear_bn_probe_res", "knn_trained", "knn_bn_probe_res")
    lines = [
        "# QB-Heat, one change at a time (validation split of the training images)", "",
        "Linear probe and kNN (k=20) top-1 % on 5k training images held out from the probes' 10k fit images "
        "(the test split is not read). 'BN at probe res.': every BatchNorm re-estimated on full 64-px training "
        "images before probing (label-free).", "",
        "Runs (each appends here): " + "; ".join(f"{r['date']} on {r['cpu']}: `{r['command']}`" for r in results["runs"]), "",
        "| variant | epochs | seeds | linear | linear, BN at probe res. | kNN | kNN, BN at probe res. | pre-train s/seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row_key, row in results["rows"].items():
        runs = list(row["seeds"].values())
        if not runs:
            continue
        cells = []
        for c in cols:
            v = [100 * r[c] for r in runs]
            cells.append(f"{statistics.fmean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""))
        pre = [r["pretrain_s"] for r in runs if "pretrain_s" in r]
        epochs, pre_s = (f"{row['epochs']:g}", f"{statistics.fmean(pre):.0f}") if pre else ("–", "–")
        lines.append(f"| {row['title']} | {epochs} | {len(runs)} | " + " | ".join(cells) + f" | {pre_s} |")
    atomic_write_bytes(d / f"{NAME}.md", ("\n".join(lines) + "\n").encode())


def main(argv=None) -> None:
    args = parse_args(argv)
    path = Path(args.results_dir) / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"schema": "qbheat.bench.qbheat_ablation/1",
                                                                  "rows": {}, "runs": []}
    results["runs"].append({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                            "command": "python benchmarks/qbheat_ablation.py " + " ".join(argv or __import__("sys").argv[1:])})
    todo = []
    for key in args.variants:
        row_key = key if key == "random" else f"{key}@{args.epochs:g}ep"
        row = results["rows"].setdefault(row_key, {"title": VARIANTS[key][0] + (f" [{key}]"),
                                                   "epochs": 0 if key == "random" else args.epochs, "seeds": {}})
        todo += [(row_key, key, s) for s in args.seeds if str(s) not in row["seeds"]]
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, key, seed, args): (row_key, seed) for row_key, key, seed in todo}
        for fut in cf.as_completed(futures):
            row_key, seed = futures[fut]
            res = fut.result()
            results["rows"][row_key]["seeds"][str(seed)] = res
            print(f"{row_key} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k != "seed"), flush=True)
            write(results, args)
    write(results, args)


if __name__ == "__main__":
    main()
