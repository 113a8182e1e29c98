"""Why is OpenVINO INT8 not faster than FP32 for Mobile-Former here? Side by side in one run.

Issue 21's target "``--int8-scope auto --max-drop 1.0`` not slower than FP32 on OpenVINO" was missed:
INT8 IRs measured 1.3–1.4× slower than FP32 at 64 px (``trained_accuracy.md``). This script measures,
in one process and alternating rounds (so the ratios survive a shared machine):

1. input size: ``mobileformer_micro`` (random init, seed 0: latency does not depend on the weights) at
   ``--sizes`` (64, 128, 224 px), exported by ``qbheat-export export --formats onnx --precision fp32``;
2. NNCF configurations of the same FP32 IR: the export's ``convs`` and ``all`` scopes (preset
   PERFORMANCE), ``convs`` without the weight compression of the float MatMuls,
   ``all`` with ``model_type=TRANSFORMER``, ``all`` with preset MIXED, and a
   "fast" scope that quantises only the convolutions with at least ``--min-channels`` input channels
   that are not depthwise (the layers where an INT8 kernel has enough arithmetic to pay for the
   re-quantisation around it);
3. threads 1 and 2, batch 1 (``deploy_targets``' OpenVINO runner: LATENCY hint, one stream, f32
   inference precision, as ``qbheat-export bench`` runs it);
4. where the time goes: the CPU plugin's per-node profile (PERF_COUNT) summed by executed layer type
   and kernel, and the number of FakeQuantize ops NNCF inserted and of nodes the plugin runs in INT8.

The CPU's ISA flags (VNNI, AMX) are recorded. No accuracy here: latency only.

    python benchmarks/openvino_int8_latency.py [--sizes 64,128,224] [--rounds 12 --iters 100]

Writes ``benchmarks/results/openvino_int8_latency.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mobileformer_micro"


def isa_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f in ("avx2", "avx512f", "avx512_bf16", "avx512bw"))


def export_fp32(size: int, work: Path) -> Path:
    out = work / f"fp32_{size}"
    if not (out / "onnx" / "model.fp32.onnx").is_file():
        argv = [sys.executable, "-m", "export.cli", "export", "--quiet", "--model", MODEL, "--head", "classifier", "--image-size", str(size),
                "--formats", "onnx", "--precision", "fp32", "--out", str(out), "--overwrite"]
        subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    return out / "onnx" / "model.fp32.onnx"


def variants(onnx_path: Path, size: int, work: Path, min_channels: int) -> dict[str, Path]:
    """{name: IR path}: FP32 and the INT8 configurations of one FP32 ONNX file."""
    import nncf
    import onnx

    from export import openvino_format

    names = tuple(o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output)
    ov_fp32 = openvino_format.from_onnx(onnx_path, "image", names, {})
    calib = np.random.default_rng(0).normal(size=(32, 3, size, size)).astype(np.float32)
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    out: dict[str, Path] = {}

    def save(name, model):
        path = work / f"ir_{size}" / name / "model.xml"
        openvino_format.save(model, path, compress_to_fp16=False)
        out[name] = path

    save("fp32", ov_fp32)
    save("int8 convs", openvino_format.quantize_int8(ov_fp32.clone(), calib, False, quiet=True, scope="convs"))
    save("int8 all", openvino_format.quantize_int8(ov_fp32.clone(), calib, False, quiet=True, scope="all"))
    quiet = dict(subset_size=len(calib))
    from export.quantize import INT8_SCOPES

    with open(os.devnull, "w") as devnull, __import__("contextlib").redirect_stdout(devnull), openvino_format._nncf_log_to(devnull):
        # 'convs' without NNCF's weight compression of the float MatMuls (FullyConnected stays plain f32)
        save("int8 convs, f32 FC weights", nncf.quantize(ov_fp32.clone(), dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                                                          ignored_scope=nncf.IgnoredScope(types=INT8_SCOPES["convs"]["openvino_ignored_types"],
                                                                                          validate=False), **quiet))
        save("int8 all transformer", nncf.quantize(ov_fp32.clone(), dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                                                   model_type=nncf.ModelType.TRANSFORMER, **quiet))
        save("int8 all mixed", nncf.quantize(ov_fp32.clone(), dataset, preset=nncf.QuantizationPreset.MIXED, **quiet))
        # only the dense (non-depthwise) convolutions with at least min_channels input channels
        heavy = heavy_convs(ov_fp32, min_channels)
        others = [op.get_friendly_name() for op in ov_fp32.get_ops()
                  if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul") and op.get_friendly_name() not in heavy]
        save(f"int8 dense convs ≥{min_channels}ch", nncf.quantize(ov_fp32.clone(), dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                                                                  ignored_scope=nncf.IgnoredScope(names=others, types=["Add", "Multiply", "MVN", "Softmax"],
                                                                                                  validate=False), **quiet))
    return out


def heavy_convs(model, min_channels: int) -> set[str]:
    names = set()
    for op in model.get_ops():
        if op.get_type_name() == "Convolution":
            cin = op.input(1).get_partial_shape()[1].get_length()
            if cin >= min_channels:
                names.add(op.get_friendly_name())
    return names


def fake_quantize_count(path: Path) -> int:
    from deploy_targets.runners.openvino_runner import shared_core

    return sum(op.get_type_name() == "FakeQuantize" for op in shared_core().read_model(str(path)).get_ops())


def profile(path: Path, size: int, threads: int, runs: int = 100) -> dict:
    """Per executed layer type/kernel: the median over ``runs`` of its ms per inference, and the INT8-run node count."""
    from deploy_targets.runners import get_runner

    r = get_runner("openvino", threads=threads, precision="fp32", perf_count=True)
    r.load(path, batch=1)
    name = r.inputs()[0]["name"]
    x = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
    for _ in range(20):
        r.run({name: x})
    per_run: dict = defaultdict(list)  # layer/kernel → ms in each run (get_profiling_info holds the last run only)
    i8 = 0
    for _ in range(runs):
        r.run({name: x})
        acc: dict = defaultdict(float)
        i8 = 0
        for info in r.request.get_profiling_info():
            if info.status.name != "EXECUTED":
                continue
            acc[f"{info.node_type} [{info.exec_type}]"] += info.real_time.total_seconds() * 1e3
            i8 += "I8" in info.exec_type or "U8" in info.exec_type
        for k, v in acc.items():
            per_run[k].append(v)
    r.close()
    med = {k: float(np.median(v)) for k, v in per_run.items()}
    total = sum(med.values())
    top = sorted(med.items(), key=lambda kv: -kv[1])[:8]
    return {"profiled_ms": round(total, 4), "int8_kernels": i8, "top": [{"layer": k, "ms": round(v, 4)} for k, v in top]}


def latency(irs: dict[str, Path], size: int, threads: int, rounds: int, iters: int) -> dict:
    """Each IR against the FP32 one, alternating rounds (``export.int8_auto.time_alternating``)."""
    from export.int8_auto import time_alternating

    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    timing = time_alternating(irs, x, rounds=rounds, iters=iters, threads=threads, warmup=30)
    p50 = timing["p50_ms"]
    return {n: {"p50_ms": p50[n], "ratio_to_fp32": round(p50[n] / p50["fp32"], 3),
                "rounds_faster_than_fp32": sum(m[n] < m["fp32"] for m in timing["round_p50_ms"])} for n in irs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/qbheat_ov_int8")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--min-channels", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from deploy_targets.fingerprint import cpu_model
    import openvino
    import nncf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "openvino_int8_latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": os.cpu_count(), "isa": isa_flags(), "python": platform.python_version(), "openvino": openvino.__version__,
           "nncf": nncf.__version__, "model": MODEL, "command": ["python", "benchmarks/openvino_int8_latency.py", *sys.argv[1:]],
           "load_average_start": round(os.getloadavg()[0], 2), "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        irs = variants(export_fp32(size, work), size, work, args.min_channels)
        entry = {"fake_quantize": {n: fake_quantize_count(p) for n, p in irs.items()}, "latency": {}, "profile": {}}
        for threads in [int(t) for t in args.threads.split(",")]:
            entry["latency"][str(threads)] = latency(irs, size, threads, args.rounds, args.iters)
            print(f"[ov_int8] {size} px, {threads} threads: " + ", ".join(
                f"{n} {v['ratio_to_fp32']:.2f}×" for n, v in entry["latency"][str(threads)].items()), file=sys.stderr, flush=True)
        entry["profile"] = {n: profile(p, size, 1) for n, p in irs.items() if n in ("fp32", "int8 all", "int8 convs", "int8 convs, f32 FC weights")}
        doc["sizes"][str(size)] = entry
    doc["load_average_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    (out / "openvino_int8_latency.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "openvino_int8_latency.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    lines = [f"# openvino_int8_latency — {doc['date']}", "",
             f"Machine: {doc['cpu']}, {doc['cores']} cores (shared; load average {doc['load_average_start']} at start, "
             f"{doc['load_average_end']} at the end). ISA: {', '.join(doc['isa'])}. OpenVINO {doc['openvino']}, NNCF {doc['nncf']}. "
             f"Command: `{' '.join(doc['command'])}`.", "",
             f"Model: {doc['model']} (random init), batch 1, deploy_targets' OpenVINO runner (LATENCY hint, 1 stream, f32). "
             "Ratios are p50 ÷ FP32's p50 within the same alternating rounds; below 1 is faster than FP32.", ""]
    for size, e in doc["sizes"].items():
        threads = list(e["latency"])
        lines += [f"## {size} px", "", "| IR | FakeQuantize ops | " + " | ".join(f"p50 ms, {t} thr | ÷ FP32 | rounds faster" for t in threads) + " |",
                  "|---|---:|" + "---:|---:|---:|" * len(threads)]
        for n in e["fake_quantize"]:
            cells = []
            for t in threads:
                v = e["latency"][t][n]
                cells += [f"{v['p50_ms']:.3f}", f"{v['ratio_to_fp32']:.3f}", str(v["rounds_faster_than_fp32"])]
            lines.append(f"| {n} | {e['fake_quantize'][n]} | " + " | ".join(cells) + " |")
        lines += ["", "Where the time goes (1 thread, CPU plugin profile: per layer type [kernel], the median over 100 runs of its ms per "
                  "inference; the sum of those medians; top pairs):", ""]
        for n, p in e["profile"].items():
            top = "; ".join(f"{t['layer']} {t['ms']:.3f}" for t in p["top"][:6])
            lines.append(f"- **{n}**: {p['profiled_ms']:.3f} ms profiled, {p['int8_kernels']} nodes on INT8 kernels — {top}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
