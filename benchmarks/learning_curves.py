"""Learning curves on Fashion-MNIST: probes of checkpoints of one run per method and seed, at growing schedules.

Rows: random init (no training), a supervised reference (same backbone, labels), MoCo-v2 and QB-Heat
(the trainer's YAML configs ``qbheat/configs/*_fashion_mnist_micro.yaml``). Each (method, seed) is
**one** pre-training run with the schedule of its longest milestone (``--max-epochs``); it stops at
each milestone (``stop_after``, schedule unchanged), saves a copy of its checkpoint, and that
checkpoint is probed with every protocol of ``repro_fashion_mnist.evaluate_backbone``: kNN, linear,
non-linear (one transformer block) and frozen-backbone detection, hyper-parameters chosen on
held-out training images, the test split read once per (row, milestone).

Two x-axes: **epochs** and **pre-training compute** (FLOPs of one training step, forward + backward,
counted with ``torch.utils.flop_counter.FlopCounterMode`` on one batch, × steps; wall-clock seconds are
recorded too). MoCo-v2's milestones include the points of equal compute with QB-Heat's milestones.

Resumes across sessions: every finished milestone is its own JSON file under ``--work-dir`` and is
merged into ``benchmarks/results/learning_curves.{json,md,svg}`` (the results file keeps what earlier
runs measured, so the work dir may be lost); an unfinished run continues from its last checkpoint.
``--max-minutes`` stops starting new milestones after that long, so a session can commit partial curves.

Run:  .venv/bin/python benchmarks/learning_curves.py --work-dir /work/qbheat_runs/learning_curves
      .venv/bin/python benchmarks/learning_curves.py --smoke        (tiny, minutes; CI)
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

import qbheat  # noqa: E402,F401  (torchvision shim before timm)
from deploy_targets.fingerprint import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAME = "learning_curves"
ROWS = ("random", "supervised", "mocov2", "qbheat")
METRICS = ("knn_k20", "knn_k200", "linear", "nonlinear", "det_mAP", "det_AP50")
TITLES = {"random": "random init", "supervised": "supervised (labels)", "mocov2": "MoCo-v2", "qbheat": "QB-Heat",
          "raw": "raw pixels"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--qbheat-epochs", type=float, nargs="+", default=[1, 3, 10])
    p.add_argument("--mocov2-epochs", type=float, nargs="+", default=[1, 3],
                   help="MoCo-v2 milestones; the equal-compute points of QB-Heat's milestones are added")
    p.add_argument("--supervised-epochs", type=float, nargs="+", default=[1, 3])
    p.add_argument("--max-epochs", type=float, default=None,
                   help="schedule length of every run (default: its method's largest milestone); keep it fixed "
                        "across sessions, the schedule depends on it")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the QB-Heat config (e.g. qbheat.visible_corner=random)")
    # probes (repro_fashion_mnist's protocol; smaller detection set for the many checkpoints)
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--test-size", type=int, default=5_000)
    p.add_argument("--nl-epochs", type=int, default=6)
    p.add_argument("--nl-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--det-train", type=int, default=600)
    p.add_argument("--det-val", type=int, default=150)
    p.add_argument("--det-test", type=int, default=300)
    p.add_argument("--det-size", type=int, default=96)
    p.add_argument("--det-epochs", type=int, default=8)
    p.add_argument("--det-lrs", type=float, nargs="+", default=[3e-3])
    p.add_argument("--jobs", type=int, default=2, help="(row, seed) runs in parallel processes, 1 thread each")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new milestone after this many minutes")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / NAME))
    p.add_argument("--results-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="everything tiny (CI): minutes, not meaningful numbers")
    args = p.parse_args(argv)
    if args.smoke:
        args.qbheat_epochs, args.mocov2_epochs, args.supervised_epochs = [0.004, 0.008], [0.004], [0.004]
        args.batch_size, args.train_size, args.test_size, args.nl_epochs, args.nl_lrs = 32, 200, 100, 1, [3e-3]
        args.det_train, args.det_val, args.det_test, args.det_epochs = 32, 16, 16, 1
    if args.results_dir is None:
        args.results_dir = str(Path(args.work_dir) / "results") if args.smoke else str(RESULTS)
    # repro_fashion_mnist.evaluate_backbone reads these
    args.no_progress, args.threads = True, 1
    return args


# ---------------------------------------------------------------------------------------------
# Training configs, FLOPs and milestones
# ---------------------------------------------------------------------------------------------

def pretrain_config(row: str, seed: int, max_epochs: float, args: argparse.Namespace):
    from qbheat.config import load_config, parse_assignment

    overrides = dict(parse_assignment(s) for s in args.set) if row == "qbheat" else {}
    cfg = load_config(ROOT / "qbheat" / "configs" / f"{row}_fashion_mnist_micro.yaml", {
        **overrides, "epochs": max_epochs, "batch_size": args.batch_size, "image_size": args.image_size,
        "seed": seed, "out_dir": str(Path(args.work_dir) / run_name(row, seed, schedule_of(row, max_epochs))),
        "num_workers": 0, "progress": False,
        "tensorboard": False, "resume": "auto", "ckpt_every": 500, "log_every": 50})
    if row == "mocov2":
        cfg.mocov2.queue_size = min(cfg.mocov2.queue_size, args.batch_size * 32)  # ≤ 32 batches (tiny runs)
    return cfg


def step_flops(row: str, args: argparse.Namespace) -> int:
    """Forward + backward FLOPs of one training step of ``row`` (FlopCounterMode; optimizer not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from qbheat.models import create_model

    torch.manual_seed(0)
    s = args.image_size
    if row == "supervised":
        backbone = create_model("mobileformer_micro", num_classes=10)
        with FlopCounterMode(display=False) as counter:
            backbone(torch.randn(args.batch_size, 3, s, s)).sum().backward()
        return int(counter.get_total_flops())
    from qbheat.train import build_objective

    objective = build_objective(pretrain_config(row, 0, 1.0, args)).train()
    views = [torch.randn(args.batch_size, 3, s, s) for _ in range(objective.method.num_views)]
    with FlopCounterMode(display=False) as counter:
        objective(views)["loss"].backward()
    return int(counter.get_total_flops())


def milestones(args: argparse.Namespace, flops: dict[str, int]) -> dict[str, list[float]]:
    steps_per_epoch = 60_000 // args.batch_size
    snap = lambda e: max(1, round(e * steps_per_epoch)) / steps_per_epoch  # noqa: E731
    out = {"random": [0.0], "qbheat": sorted({snap(e) for e in args.qbheat_epochs}),
           "supervised": sorted({snap(e) for e in args.supervised_epochs})}
    ratio = flops["qbheat"] / flops["mocov2"]
    out["mocov2"] = sorted({snap(e) for e in args.mocov2_epochs} | {snap(e * ratio) for e in args.qbheat_epochs})
    return out


# ---------------------------------------------------------------------------------------------
# One (row, seed) run: train to each milestone, probe it (worker process)
# ---------------------------------------------------------------------------------------------

def run_name(row: str, seed: int, schedule: float) -> str:
    """One run per (row, seed, schedule): the learning-rate schedule depends on the schedule's length, so a
    milestone of a 30-epoch run is not the same point as that milestone of a 10-epoch run."""
    return f"{row}_s{seed}_sch{schedule:g}"


def schedule_of(row: str, max_epochs: float) -> float:
    """A run's schedule as its points record it (random init has none)."""
    return round(max_epochs, 4) if row != "random" else 0.0


def point_key(p: dict[str, Any]) -> tuple[str, int, float, float]:
    return p["row"], p["seed"], round(p.get("schedule_epochs", 0.0), 4), round(p["epochs"], 4)


def _milestone_file(args, row: str, seed: int, epochs: float, schedule: float) -> Path:
    return Path(args.work_dir) / "milestones" / f"{run_name(row, seed, schedule)}_e{epochs:.4f}.json"


def train_supervised(seed: int, epochs: float, max_epochs: float, args: argparse.Namespace) -> Path:
    """repro_fashion_mnist's supervised reference over a ``max_epochs`` schedule, resumed from and saved to its
    own checkpoint; returns the checkpoint at ``epochs``, in the trainer's format (kind "pretrain") so that
    probes load it the same way."""
    from repro_fashion_mnist import SupervisedReference

    from qbheat.checkpoint import save_checkpoint
    from qbheat.data.build import GlobalStepSampler

    out = Path(args.work_dir) / run_name("supervised", seed, schedule_of("supervised", max_epochs))
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    steps = GlobalStepSampler(60_000, args.batch_size)
    ref = SupervisedReference("mobileformer_micro", args.image_size, args.batch_size, seed,
                              steps.steps_for_epochs(max_epochs))
    start = 0
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        ref.load_state_dict(ck)
        start = int(ck["step"])
    end = max(start, steps.steps_for_epochs(epochs))
    ref.train(start, end)
    save_checkpoint(last, {"kind": "pretrain", "model": {"name": "mobileformer_micro", "kwargs": {}}, **ref.state_dict(),
                           "step": end, "method": "supervised"})
    return last


def run_task(row: str, seed: int, todo: list[float], max_epochs: float, flops: int, args: argparse.Namespace,
             deadline: float | None) -> list[float]:
    """Train ``row`` / ``seed`` through each milestone of ``todo`` and probe it; returns the milestones done."""
    torch.set_num_threads(1)
    from repro_fashion_mnist import Data, evaluate_backbone

    from qbheat.checkpoint import build_backbone, load_checkpoint
    from qbheat.models import create_model
    from qbheat.train import pretrain

    data = Data(args, Path(args.work_dir))
    done = []
    for epochs in todo:
        if deadline is not None and time.time() > deadline:
            break
        t0 = time.perf_counter()
        steps = max(0, round(epochs * (60_000 // args.batch_size)))
        if row == "random":
            torch.manual_seed(seed)
            backbone = create_model("mobileformer_micro", num_classes=0)
        elif row == "supervised":
            ck = load_checkpoint(train_supervised(seed, epochs, max_epochs, args), kinds=("pretrain",))
            backbone = create_model("mobileformer_micro", num_classes=0)
            backbone.load_state_dict(ck["backbone"])
        else:
            cfg = pretrain_config(row, seed, max_epochs, args)
            cfg.stop_after = steps
            path = pretrain(cfg)
            snapshot = path.with_name(f"epoch_{epochs:.4f}.pt")
            shutil.copyfile(path, snapshot)
            backbone = build_backbone(load_checkpoint(snapshot, kinds=("pretrain",)))
        train_s = time.perf_counter() - t0
        res = evaluate_backbone(backbone, data, args, seed)
        schedule = schedule_of(row, max_epochs)
        prev = _load_prev_train_s(args, row, seed, epochs, schedule)
        record = {"row": row, "seed": seed, "epochs": epochs, "schedule_epochs": schedule,
                  "steps": steps, "step_flops": flops,
                  "pretrain_flops": flops * steps, "pretrain_wall_s": prev + (train_s if row != "random" else 0.0),
                  "cpu": cpu_model(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **res}
        f = _milestone_file(args, row, seed, epochs, schedule)
        f.parent.mkdir(parents=True, exist_ok=True)
        from qbheat.checkpoint import atomic_write_bytes

        atomic_write_bytes(f, (json.dumps(record, indent=1) + "\n").encode())
        done.append(epochs)
    return done


def _load_prev_train_s(args, row: str, seed: int, epochs: float, schedule: float) -> float:
    """Wall-clock pre-training seconds of this run up to its previous milestone (cumulative compute)."""
    best, when = 0.0, -1.0
    for f in (Path(args.work_dir) / "milestones").glob(f"{run_name(row, seed, schedule)}_e*.json"):
        r = json.loads(f.read_text())
        if when < r["epochs"] < epochs:
            best, when = r["pretrain_wall_s"], r["epochs"]
    return best


# ---------------------------------------------------------------------------------------------
# Results: merge, aggregate, table, plot
# ---------------------------------------------------------------------------------------------

def merge_results(args: argparse.Namespace, previous: dict[str, Any]) -> dict[str, Any]:
    points = {point_key(p): p for p in previous.get("points", [])}
    for f in sorted((Path(args.work_dir) / "milestones").glob("*.json")):
        p = json.loads(f.read_text())
        points[point_key(p)] = p
    return dict(previous, points=sorted(points.values(), key=lambda p: (ROWS.index(p["row"]), p.get("schedule_epochs", 0.0),
                                                                         p["epochs"], p["seed"])))


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for p in points:
        row, _, schedule, epochs = point_key(p)
        groups.setdefault((row, schedule, epochs), []).append(p)
    out = []
    for (row, schedule, epochs), ps in groups.items():
        agg = {"row": row, "epochs": epochs, "n": len(ps), "seeds": sorted(p["seed"] for p in ps),
               "schedule_epochs": schedule,
               "pretrain_flops": statistics.fmean(p["pretrain_flops"] for p in ps),
               "pretrain_wall_s": statistics.fmean(p["pretrain_wall_s"] for p in ps)}
        for m in METRICS:
            v = [p["metrics"][m] for p in ps if p["metrics"].get(m) is not None]
            agg[m] = {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else 0.0}
        out.append(agg)
    return sorted(out, key=lambda a: (ROWS.index(a["row"]), a["epochs"], a["schedule_epochs"]))


def _beats(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, float]:
    """'yes' when mean(a) − mean(b) exceeds twice the larger spread over seeds (issue 19's rule), with the margin."""
    margin = a["mean"] - b["mean"]
    spread = max(a["std"], b["std"])
    return ("yes" if margin > 2 * spread else "no" if margin < -2 * spread else "within 2 × spread"), margin


def verdicts(agg: list[dict[str, Any]], raw_linear: float | None, ratio: float) -> list[str]:
    """Issue 19's targets, judged at every schedule where both sides were measured."""
    at: dict[tuple[str, float], dict[str, Any]] = {}
    for a in sorted(agg, key=lambda a: a["schedule_epochs"]):  # the same milestone of several schedules: the longest
        at[(a["row"], round(a["epochs"], 2))] = a
    qb = sorted((a for a in agg if a["row"] == "qbheat"), key=lambda a: a["epochs"])
    out = []
    rnd = at.get(("random", 0.0))
    for a in qb:
        e = round(a["epochs"], 2)
        parts = []
        if rnd:
            v, m = _beats(a["linear"], rnd["linear"])
            parts.append(f"linear vs random init {100 * m:+.1f} ({v})")
        if raw_linear is not None:
            m = a["linear"]["mean"] - raw_linear
            parts.append(f"vs raw pixels {100 * m:+.1f} ({'yes' if m > 2 * a['linear']['std'] else 'no'})")
        mo = at.get(("mocov2", e))
        if mo:
            v, m = _beats(a["linear"], mo["linear"])
            parts.append(f"linear vs MoCo-v2 at equal epochs {100 * m:+.1f} "
                         f"({'better' if v == 'yes' else 'below' if v == 'no' else 'on par, within 2 × spread'})")
            v, m = _beats(a["nonlinear"], mo["nonlinear"])
            parts.append(f"non-linear vs MoCo-v2 {100 * m:+.1f} ({v})")
        eq = at.get(("mocov2", round(round(a["epochs"] * ratio * (60_000 // 128)) / (60_000 // 128), 2)))
        if eq:
            m = a["det_mAP"]["mean"] - eq["det_mAP"]["mean"]
            spread = max(a["det_mAP"]["std"], eq["det_mAP"]["std"])
            v = "at least MoCo-v2's" if m >= 0 else "below, within 2 × spread" if m >= -2 * spread else "below"
            parts.append(f"detection vs MoCo-v2 at equal compute ({eq['epochs']:.2f} ep) {100 * m:+.1f} mAP ({v})")
        out.append(f"- QB-Heat at {a['epochs']:g} epochs (schedule {a['schedule_epochs']:g}): " + "; ".join(parts))
    return out


def write_svg(agg: list[dict[str, Any]], path: Path, raw_linear: float | None) -> None:
    """Two panels per metric row (linear, non-linear, detection mAP): vs epochs and vs TFLOPs (log x)."""
    colours = {"random": "#888888", "supervised": "#2ca02c", "mocov2": "#1f77b4", "qbheat": "#d62728"}
    metrics = [("linear", "linear probe top-1 %"), ("nonlinear", "non-linear probe top-1 %"), ("det_mAP", "detection mAP %")]
    W, H, pad = 360, 220, 48
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 20}" height="{len(metrics) * H + 40}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    legend_x = 10
    for row, col in colours.items():
        svg.append(f'<rect x="{legend_x}" y="8" width="12" height="3" fill="{col}"/>'
                   f'<text x="{legend_x + 16}" y="13">{TITLES[row]}</text>')
        legend_x += 120
    for mi, (m, title) in enumerate(metrics):
        pts = [a for a in agg if a[m]["mean"] is not None]
        if not pts:
            continue
        ys = [100 * a[m]["mean"] for a in pts] + ([100 * raw_linear] if m == "linear" and raw_linear else [])
        lo, hi = math.floor(min(ys) - 1), math.ceil(max(ys) + 1)
        for pi, (xkey, xtitle) in enumerate((("epochs", "pre-training epochs"), ("pretrain_flops", "pre-training TFLOPs (log)"))):
            ox, oy = 10 + pi * (W + 10), 30 + mi * H
            trained = [a for a in pts if a[xkey] > 0]
            if not trained:
                continue
            xv = [a[xkey] for a in trained]
            logx = xkey == "pretrain_flops"
            f = (lambda v: math.log10(v)) if logx else (lambda v: v)
            x0, x1 = (f(min(xv)) - 0.1, f(max(xv)) + 0.1) if logx else (0.0, max(xv) * 1.05)
            X = lambda v: ox + pad + (f(v) - x0) / (x1 - x0 or 1) * (W - pad - 10)  # noqa: E731
            Y = lambda v: oy + H - 30 - (v - lo) / (hi - lo or 1) * (H - 50)  # noqa: E731
            svg.append(f'<rect x="{ox + pad}" y="{oy + 20}" width="{W - pad - 10}" height="{H - 50}" fill="none" stroke="#ccc"/>')
            svg.append(f'<text x="{ox + pad}" y="{oy + 14}" font-weight="bold">{title}</text>')
            svg.append(f'<text x="{ox + pad}" y="{oy + H - 8}">{xtitle}</text>')
            for v in (lo, hi):
                svg.append(f'<text x="{ox + 8}" y="{Y(v) + 4}">{v}</text>')
            last_tick = -1e9
            for v in sorted(set(xv)):  # a tick per measured x, skipping those that would overlap
                if X(v) - last_tick < 30:
                    continue
                last_tick = X(v)
                svg.append(f'<text x="{X(v) - 8}" y="{oy + H - 20}" fill="#666">{v / 1e12:.3g}</text>' if logx else
                           f'<text x="{X(v) - 4}" y="{oy + H - 20}" fill="#666">{v:.2g}</text>')
            for ref, val, dash in (("random", next((100 * a[m]["mean"] for a in pts if a["row"] == "random"), None), "4,3"),
                                   ("raw", 100 * raw_linear if m == "linear" and raw_linear else None, "1,3")):
                if val is not None:
                    svg.append(f'<line x1="{ox + pad}" x2="{ox + W - 10}" y1="{Y(val)}" y2="{Y(val)}" stroke="#888" '
                               f'stroke-dasharray="{dash}"/><text x="{ox + W - 80}" y="{Y(val) - 3}" fill="#666">{TITLES[ref]}</text>')
            lines = [(row, col, si, sched) for row, col in colours.items()
                     for si, sched in enumerate(sorted({a["schedule_epochs"] for a in trained if a["row"] == row}))]
            for row, col, si, sched in lines:  # one line per run schedule; a row's longer schedules dashed
                series = sorted((a for a in trained if a["row"] == row and a["schedule_epochs"] == sched),
                                key=lambda a: a[xkey])
                dash = "" if si == 0 else ' stroke-dasharray="6,3"' if si == 1 else ' stroke-dasharray="2,2"'
                svg.append('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>' % (
                    col, dash, " ".join(f"{X(a[xkey]):.1f},{Y(100 * a[m]['mean']):.1f}" for a in series)))
                for a in series:
                    y, e = 100 * a[m]["mean"], 100 * a[m]["std"]
                    svg.append(f'<circle cx="{X(a[xkey]):.1f}" cy="{Y(y):.1f}" r="3" fill="{col}"/>')
                    if e > 0:
                        svg.append(f'<line x1="{X(a[xkey]):.1f}" x2="{X(a[xkey]):.1f}" y1="{Y(y - e):.1f}" y2="{Y(y + e):.1f}" stroke="{col}"/>')
    svg.append("</svg>")
    from qbheat.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "\n".join(svg).encode())


def write_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    from qbheat.checkpoint import atomic_write_bytes

    d = Path(args.results_dir)
    d.mkdir(parents=True, exist_ok=True)
    agg = aggregate(result["points"])
    result["summary"] = agg
    atomic_write_bytes(d / f"{NAME}.json", (json.dumps(result, indent=1) + "\n").encode())
    raw = result.get("raw_pixels_linear")
    write_svg(agg, d / f"{NAME}.svg", raw)
    fmt = lambda s: "–" if s["mean"] is None else (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["std"] else f"{100 * s['mean']:.1f}")  # noqa: E731
    lines = ["# Learning curves on Fashion-MNIST (mobileformer_micro, 64 px)" + (" — SMOKE" if args.smoke else ""), "",
             "Top-1 % (kNN, linear, non-linear) and COCO mAP % (frozen-backbone detection), mean ± sample std over seeds; "
             "each row a checkpoint of one run per seed whose learning-rate schedule is the 'schedule' column's epochs (a "
             "milestone added later is its own run with its own schedule). Compute: FLOPs of the training steps (forward + "
             "backward, FlopCounterMode) and wall-clock seconds on the machine named (runs of different sessions shared "
             "the machine differently: compare wall-clock within one session only).", "",
             "Runs: " + "; ".join(f"{r['date']} on {r['cpu']}: `{r['command']}`" for r in result["runs"]), ""]
    if raw is not None:
        lines += [f"Raw pixels (logistic regression on the 28×28 pixels): linear {100 * raw:.1f} %.", ""]
    lines += ["| row | epochs | schedule | seeds | TFLOPs | wall s | kNN k=20 | kNN k=200 | linear | non-linear | det. mAP | det. AP50 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        lines.append(f"| {TITLES[a['row']]} | {a['epochs']:.2f} | {a['schedule_epochs']:g} | {a['seeds']} | {a['pretrain_flops'] / 1e12:.1f} | "
                     f"{a['pretrain_wall_s']:.0f} | " + " | ".join(fmt(a[m]) for m in METRICS) + " |")
    ratio = result["step_flops"]["qbheat"] / result["step_flops"]["mocov2"]
    lines += ["", "Targets (issue 19; \"yes\" = margin above twice the larger spread over seeds; points):", ""]
    lines += verdicts(agg, raw, ratio)
    lines += ["", f"Plot: `{NAME}.svg` (probe accuracy vs epochs and vs compute)."]
    atomic_write_bytes(d / f"{NAME}.md", ("\n".join(lines) + "\n").encode())


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    res_path = Path(args.results_dir) / f"{NAME}.json"
    result = json.loads(res_path.read_text()) if res_path.exists() else {"schema": "qbheat.bench.learning_curves/1",
                                                                         "runs": [], "points": []}
    result["runs"].append({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
                           "cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "command": "python benchmarks/learning_curves.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("no_progress", "threads")}
    flops = result.get("step_flops") or {}
    for row in ("qbheat", "mocov2", "supervised"):
        if row not in flops:
            flops[row] = step_flops(row, args)
    result["step_flops"] = flops
    plan = milestones(args, flops)
    result["milestones"] = plan
    from repro_fashion_mnist import Data, evaluate_raw

    data = Data(args, work)  # writes the detection canvases once, before any worker reads them
    if "raw_pixels_linear" not in result:
        result["raw_pixels_linear"] = evaluate_raw(data, 0)["metrics"]["linear"]
    result = merge_results(args, result)
    have = {point_key(p) for p in result["points"]}
    tasks = []
    for row in args.rows:
        max_epochs = args.max_epochs or max(plan[row]) or 1.0
        schedule = schedule_of(row, max_epochs)
        for seed in args.seeds:
            missing = [e for e in plan[row] if (row, seed, schedule, round(e, 4)) not in have]
            if missing:
                tasks.append((row, seed, missing, max_epochs))
    # Milestone by milestone across runs: every run's first milestone before any run's second, so that a
    # session that stops early leaves comparable points of every row (a run's milestones stay in order).
    print(f"{NAME}: {len(tasks)} runs to continue: " + ", ".join(f"{r}/s{s} → {m}" for r, s, m, _ in tasks), file=sys.stderr)
    queue = {(row, seed): (list(todo), max_e) for row, seed, todo, max_e in tasks}
    running: dict[cf.Future, tuple[str, int]] = {}
    with cf.ProcessPoolExecutor(max(1, args.jobs), mp_context=mp.get_context("spawn")) as pool:
        while queue or running:
            idle = [k for k in queue if k not in running.values() and queue[k][0]]
            idle.sort(key=lambda k: (plan[k[0]].index(queue[k][0][0]), -flops.get(k[0], 0), k[1]))
            while idle and len(running) < max(1, args.jobs) and (deadline is None or time.time() < deadline):
                row, seed = idle.pop(0)
                todo, max_e = queue[(row, seed)]
                fut = pool.submit(run_task, row, seed, [todo[0]], max_e, flops.get(row, 0), args, deadline)
                running[fut] = (row, seed)
            if not running:
                break
            fut = next(cf.as_completed(running))
            row, seed = running.pop(fut)
            done = fut.result()
            todo, max_e = queue[(row, seed)]
            todo = [e for e in todo if e not in done]
            if todo and done:
                queue[(row, seed)] = (todo, max_e)
            else:
                queue.pop((row, seed))
            print(f"{row} seed {seed}: milestone {done} done [{(time.time() - t_start) / 60:.1f} min]", file=sys.stderr, flush=True)
            result = merge_results(args, result)
            write_report(result, args)
    result = merge_results(args, result)
    write_report(result, args)
    print((Path(args.results_dir) / f"{NAME}.md").read_text())
    return result


if __name__ == "__main__":
    main()
