"""Cost of ``qbheat-export eval``: every runnable artifact of an export and its PyTorch model on the
10,000 Fashion-MNIST test images, wall time in a child process.

Target (issue 21): all runnable quickstart artifacts (ONNX and OpenVINO, FP32/FP16/INT8; Core ML
cannot predict on Linux) plus PyTorch, on the 10k test images, within 60 s on the project's 2-core
machines. The export folder is copied first so its card is left as it was.

    python benchmarks/eval_cost.py quickstart_out/export [--out benchmarks/results] [--batch-size 64]
        [--baseline-root DIR] [--rounds N]

``--baseline-root DIR``: another source tree of qbheat (e.g. ``git archive`` of an older commit) whose
``qbheat-export eval`` is timed on the same export in the same run, alternating with this tree's
``--rounds`` times, so the before/after ratio does not depend on what else the shared machine runs.

Writes ``eval_cost.json`` and ``eval_cost.md`` (date, CPU model, command, per-artifact top-1 and drop).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from deploy_targets.fingerprint import cpu_model

ROOT = Path(__file__).resolve().parents[1]

TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--baseline-root", help="another qbheat source tree, timed alternately on the same export")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each tree, alternating (default 1)")
    args = ap.parse_args()
    trees = {"this": ROOT} | ({"baseline": Path(args.baseline_root).resolve()} if args.baseline_root else {})
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    load_before = os.getloadavg()[0]  # a shared machine: other work competes for the cores
    for i in range(args.rounds):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            run, card = _run(trees[name], args.export_dir, args.batch_size)
            if run is None:
                return 1
            runs[name].append(run)
            if name == "this":
                this_card = card
    card = this_card
    wall = min(r["wall_s"] for r in runs["this"])
    cpu = min(r["cpu_s"] for r in runs["this"])
    ev = card["evaluation"]
    rows = [{"artifact": a["path"], "format": a["format"], "precision": a["precision"], **a.get("accuracy", {})} for a in card["artifacts"]]
    ran = [r for r in rows if "top1" in r]
    doc = {"benchmark": "eval_cost", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": os.cpu_count(), "python": platform.python_version(),
           "command": ["python", "benchmarks/eval_cost.py", args.export_dir, "--batch-size", str(args.batch_size)],
           "child_command": ["qbheat-export", "eval", "EXPORT", "--data", "fashion-mnist", "--batch-size", str(args.batch_size)],
           "model": card["model"]["name"], "images": ev["data"]["count"], "pytorch": ev["pytorch"], "artifacts_run": len(ran),
           "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_average_before": round(load_before, 2), "target_s": TARGET_S, "met": wall <= TARGET_S,
           "runs": runs, "rows": rows}
    if args.baseline_root:
        doc["command"] += ["--baseline-root", args.baseline_root, "--rounds", str(args.rounds)]
        base = min(r["wall_s"] for r in runs["baseline"])
        doc["baseline"] = {"root": args.baseline_root, "wall_s": base, "ratio_this_to_baseline": round(wall / base, 3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# eval_cost — {doc['date']}", "",
             f"Machine: {doc['cpu']}, {doc['cores']} cores. Command: `{' '.join(doc['command'])}` "
             f"(runs `{' '.join(doc['child_command'])}` in a child process, process start and imports included).", "",
             f"**{doc['wall_s']:.1f} s** for PyTorch + {len(ran)} artifacts on {doc['images']} test images of {doc['model']} "
             f"(target ≤ {TARGET_S:.0f} s: {'met' if doc['met'] else 'NOT met'}); CPU time {doc['cpu_s']:.1f} s; "
             f"1-min load average before the run {doc['load_average_before']:.2f} on {doc['cores']} cores"
             f"{f' (fastest of {args.rounds} runs)' if args.rounds > 1 else ''}.", ""]
    if args.baseline_root:
        b = doc["baseline"]
        lines += [f"Before/after in this run ({args.rounds} alternating rounds per tree, fastest of each): baseline tree `{b['root']}` "
                  f"{b['wall_s']:.1f} s, this tree {doc['wall_s']:.1f} s: **{b['wall_s'] / doc['wall_s']:.1f}× faster** "
                  f"(ratio {b['ratio_this_to_baseline']:.3f}). Every run: " + "; ".join(
                      n + " " + ", ".join(f"{r['wall_s']:.1f}" for r in rs) + " s" for n, rs in runs.items()) + ".", ""]
    lines += [
             f"PyTorch top-1 {ev['pytorch']['top1']:.2f} %, top-5 {ev['pytorch']['top5']:.2f} %.", "",
             "| artifact | top-1 % | top-5 % | drop top-1 (pts) | 95 % CI |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if "top1" in r:
            lines.append(f"| `{r['artifact']}` | {r['top1']:.2f} | {r['top5']:.2f} | {r['drop_top1']:+.2f} | "
                         f"[{r['drop_top1_ci'][0]:+.2f}, {r['drop_top1_ci'][1]:+.2f}] |")
        else:
            lines.append(f"| `{r['artifact']}` | – | – | – | not run: {r.get('skipped')} |")
    (out / "eval_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _run(root: Path, export_dir: str, batch: int) -> tuple[dict | None, dict | None]:
    """One ``qbheat-export eval`` of a fresh copy of the export, from the source tree ``root``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        shutil.copytree(export_dir, folder)
        argv = [sys.executable, "-m", "export.cli", "eval", str(folder), "--data", "fashion-mnist", "--quiet", "--batch-size", str(batch)]
        env = dict(os.environ, PYTHONPATH=str(root))
        before = os.times()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = os.times()
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return None, None
        cpu = sum(getattr(after, k) - getattr(before, k) for k in ("children_user", "children_system"))
        return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_average_before": round(load, 2)}, \
            json.loads((folder / "model_card.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
