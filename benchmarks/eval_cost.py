"""Cost of ``qbheat-export eval``: every runnable artifact of an export and its PyTorch model on the
10,000 Fashion-MNIST test images, wall time in a child process.

Target (issue 21): all runnable quickstart artifacts (ONNX and OpenVINO, FP32/FP16/INT8; Core ML
cannot predict on Linux) plus PyTorch, on the 10k test images, within 60 s on the project's 2-core
machines. The export folder is copied first so its card is left as it was.

    python benchmarks/eval_cost.py quickstart_out/export [--out benchmarks/results] [--batch-size 64]

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deploy_targets.fingerprint import cpu_model  # noqa: E402

TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        shutil.copytree(args.export_dir, folder)
        argv = [sys.executable, "-m", "export.cli", "eval", str(folder), "--data", "fashion-mnist", "--quiet",
                "--batch-size", str(args.batch_size)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        load_before = os.getloadavg()[0]  # a shared machine: other work competes for the cores
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cpu = sum(getattr(os.times(), k) for k in ("children_user", "children_system"))
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        card = json.loads((folder / "model_card.json").read_text())
    ev = card["evaluation"]
    rows = [{"artifact": a["path"], "format": a["format"], "precision": a["precision"], **a.get("accuracy", {})} for a in card["artifacts"]]
    ran = [r for r in rows if "top1" in r]
    doc = {"benchmark": "eval_cost", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": os.cpu_count(), "python": platform.python_version(),
           "command": ["python", "benchmarks/eval_cost.py", args.export_dir, "--batch-size", str(args.batch_size)],
           "child_command": ["qbheat-export", "eval", "EXPORT", "--data", "fashion-mnist", "--batch-size", str(args.batch_size)],
           "model": card["model"]["name"], "images": ev["data"]["count"], "pytorch": ev["pytorch"], "artifacts_run": len(ran),
           "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_average_before": round(load_before, 2), "target_s": TARGET_S, "met": wall <= TARGET_S, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# eval_cost — {doc['date']}", "",
             f"Machine: {doc['cpu']}, {doc['cores']} cores. Command: `{' '.join(doc['command'])}` "
             f"(runs `{' '.join(doc['child_command'])}` in a child process, process start and imports included).", "",
             f"**{doc['wall_s']:.1f} s** for PyTorch + {len(ran)} artifacts on {doc['images']} test images of {doc['model']} "
             f"(target ≤ {TARGET_S:.0f} s: {'met' if doc['met'] else 'NOT met'}); CPU time {doc['cpu_s']:.1f} s; "
             f"1-min load average before the run {doc['load_average_before']:.2f} on {doc['cores']} cores.", "",
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


if __name__ == "__main__":
    sys.exit(main())
