"""Cost of one full export: wall time and peak memory of ``qbheat-export export`` in a child process.

Target (issue 5): ``mobileformer_294m`` + classifier head, every format × precision that runs here
(ONNX Runtime, OpenVINO, Core ML spec; FP32/FP16/INT8), parity included, in ≤ 90 s and ≤ 3 GB on
the project's 2-core machines.

The backbone checkpoint is a random initialisation whose BatchNorm statistics are re-estimated on
32 real photographs (scikit-image), written before the timed run: with BN statistics of 0/1 an INT8
calibration measures noise (see tests/export/conftest.py). Parity runs for every artifact and is
recorded; ``--allow-mismatch`` keeps an artifact of this *untrained* network that misses its INT8
tolerance (a cost benchmark must not stop there), and the table says which. The export runs in a child process;
peak memory is the child's high-water mark (``VmHWM`` polled from /proc, and ``ru_maxrss`` of the
child from ``os.wait4``, whichever is larger) plus the high-water mark of the worker process it forks
(the Core ML builder, found by its process name and polled): an upper bound, since forked pages shared with the parent count
twice. CPU time is the child's and its reaped workers'. Both numbers are printed as ratios to the target.

    python benchmarks/export_cost.py [--model mobileformer_294m] [--image-size 224] [--out benchmarks/results] [--compare-serial]

The export builds Core ML in a forked worker beside ONNX and OpenVINO (export.worker);
``--compare-serial`` times the same export with ``--serial`` right after, for the side-by-side ratio.
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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from export.worker import WORKER_NAME  # noqa: E402  (the kernel name of the Core ML builder the export forks)
from deploy_targets.fingerprint import cpu_model  # noqa: E402
TARGET_S, TARGET_GB = 90.0, 3.0


def write_checkpoint(path: Path, name: str, size: int) -> None:
    import torch

    import qbheat  # noqa: F401
    from qbheat.checkpoint import save_checkpoint
    from qbheat.data.samples import sample_images
    from qbheat.models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create_model(name, num_classes=0)
    imgs = torch.from_numpy(sample_images(32, size, seed=5)).permute(0, 3, 1, 2).float() / 255
    imgs = (imgs - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, 32, 8):
            model(imgs[i:i + 8])
    save_checkpoint(path, {"kind": "pretrain", "model": {"name": name, "kwargs": {}}, "backbone": model.eval().state_dict(),
                           "method": None})


def _vmhwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, … (Linux /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
        except OSError:
            continue
    return found


def run_child(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"kib": 0}
    worker_peak: dict[int, int] = {}  # the export's own worker processes (Core ML's forked builder)
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak["kib"] = max(peak["kib"], _vmhwm_kib(proc.pid))
            for pid in _descendants(proc.pid):  # not the short-lived fork+exec helpers: only the named worker
                if _comm(pid) == WORKER_NAME.decode():
                    worker_peak[pid] = max(worker_peak.get(pid, 0), _vmhwm_kib(pid))
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    t_out.start(), t_err.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    t_out.join(), t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    main_kib = max(peak["kib"], rusage.ru_maxrss)  # Linux: ru_maxrss in KiB
    workers_kib = sum(worker_peak.values())
    # Upper bound: each process's own high-water mark, summed. A forked worker shares the parent's pages
    # until either writes them, so this counts those pages twice; the true peak of the tree is lower.
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": rusage.ru_utime + rusage.ru_stime,
            "peak_rss_gb": (main_kib + workers_kib) / 1024 ** 2, "main_peak_rss_gb": main_kib / 1024 ** 2,
            "worker_peak_rss_gb": [round(k / 1024 ** 2, 2) for k in worker_peak.values()],
            "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobileformer_294m")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--formats", default="onnx,openvino,coreml")
    ap.add_argument("--precision", default="fp32,fp16,int8")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--compare-serial", action="store_true",
                    help="also time the same export with --serial (everything in one process, in order), right after")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "backbone.pt"
        write_checkpoint(ckpt, args.model, args.image_size)
        export_dir = Path(tmp) / "export"
        cmd = [sys.executable, "-m", "export.cli", "export", "--checkpoint", str(ckpt), "--head", "classifier",
               "--formats", args.formats, "--precision", args.precision, "--image-size", str(args.image_size),
               "--out", str(export_dir), "--json", "--quiet", "--allow-mismatch"]
        print("running:", " ".join(cmd[1:]), file=sys.stderr)
        res = run_child(cmd)
        serial = None
        if args.compare_serial:
            shutil.rmtree(export_dir, ignore_errors=True)
            serial = run_child([*cmd, "--serial"])
    if res["returncode"] != 0:
        print(res["stderr"][-3000:], file=sys.stderr)
        print(f"export failed with exit status {res['returncode']}", file=sys.stderr)
    card = json.loads(res["stdout"][res["stdout"].index("{"):]) if res["returncode"] == 0 else None
    artifacts = [{"format": a["format"], "precision": a["precision"], "verified": a["verified"],
                  "mismatch": bool(a.get("mismatch")),
                  "mismatch_reason": next((n[len("MISMATCH: "):] for n in a.get("notes", []) if n.startswith("MISMATCH: ")), None),
                  "size_mb": round(a["size_bytes"] / 1e6, 2),
                  "min_cosine": (min(v["cosine_min"] for b in a["parity"].values() for v in b["outputs"].values())
                                 if a["parity"] else None)} for a in (card or {}).get("artifacts", [])]
    result = {
        "schema": "qbheat.bench.export_cost/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "command": "python benchmarks/export_cost.py " + " ".join(sys.argv[1:]),
        "child_command": "qbheat-export " + " ".join(cmd[3:]).replace(str(ckpt), "<bn-recalibrated checkpoint>").replace(str(export_dir), "<tmp>"),
        "model": args.model, "image_size": args.image_size, "returncode": res["returncode"],
        "wall_s": round(res["wall_s"], 1), "cpu_s": round(res["cpu_s"], 1), "peak_rss_gb": round(res["peak_rss_gb"], 2),
        "main_peak_rss_gb": round(res["main_peak_rss_gb"], 2), "worker_peak_rss_gb": res["worker_peak_rss_gb"],
        "target": {"wall_s": TARGET_S, "peak_rss_gb": TARGET_GB},
        "ratio_to_target": {"wall": round(res["wall_s"] / TARGET_S, 2), "memory": round(res["peak_rss_gb"] / TARGET_GB, 2)},
        "meets_target": res["returncode"] == 0 and res["wall_s"] <= TARGET_S and res["peak_rss_gb"] <= TARGET_GB,
        "serial": None if serial is None else {"returncode": serial["returncode"], "wall_s": round(serial["wall_s"], 1),
                                               "cpu_s": round(serial["cpu_s"], 1), "peak_rss_gb": round(serial["peak_rss_gb"], 2)},
        "artifacts": artifacts,
        "not_built": [{"format": n["format"], "reason": n["reason"]} for n in (card or {}).get("not_built", [])],
        "steps_s": (card or {}).get("timings_s", {}),
        "model_params": (card or {}).get("model", {}).get("params"), "model_macs": (card or {}).get("model", {}).get("macs"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Export cost: {args.model} + classifier, {args.image_size}px", "",
             f"- date: {result['date']}", f"- machine: {result['machine']['platform']}, {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores (shared with other jobs: wall time is noisy)",
             f"- command: `{result['command']}`", f"- child: `{result['child_command']}`", "",
             "| measure | value | target | ratio |", "|---|---|---|---|",
             f"| wall time | {result['wall_s']} s | ≤ {TARGET_S:.0f} s | {result['ratio_to_target']['wall']} |",
             f"| CPU time (user+sys) | {result['cpu_s']} s | – | – |",
             f"| peak memory (export process + its worker, VmHWM summed) | {result['peak_rss_gb']} GB | ≤ {TARGET_GB:.0f} GB | {result['ratio_to_target']['memory']} |",
             f"| of which: export process / worker | {result['main_peak_rss_gb']} GB / "
             f"{', '.join(map(str, result['worker_peak_rss_gb'])) or '–'} GB | – | – |"]
    if result["serial"]:
        ser = result["serial"]
        lines += [f"| same export with `--serial` (no worker), run right after | {ser['wall_s']} s wall, {ser['cpu_s']} s CPU, "
                  f"{ser['peak_rss_gb']} GB | – | parallel / serial wall {result['wall_s'] / ser['wall_s']:.2f} |"]
    lines += ["", "| format | precision | verified | min cosine | size MB | mismatch |", "|---|---|---|---|---|---|"]
    lines += [f"| {a['format']} | {a['precision']} | {a['verified']} | {a['min_cosine'] if a['min_cosine'] is not None else '–'} "
              f"| {a['size_mb']} | {a['mismatch_reason'] or a['mismatch']} |" for a in artifacts]
    lines += ["", "Step times (s): " + ", ".join(f"{k}: {v}" for k, v in result["steps_s"].items())]
    lines += [f"Not built: {n['format']} — {n['reason']}" for n in result["not_built"]]
    (out / "export_cost.md").write_text("\n".join(lines) + "\n")
    print(f"wall {result['wall_s']} s (×{result['ratio_to_target']['wall']} of {TARGET_S:.0f} s), "
          f"peak {result['peak_rss_gb']} GB (×{result['ratio_to_target']['memory']} of {TARGET_GB:.0f} GB), "
          f"CPU {result['cpu_s']} s; meets target: {result['meets_target']}")
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
