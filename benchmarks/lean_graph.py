"""The lean exported graph of Mobile-Former-294M against MobileNetV3-Large, rewrite by rewrite, in one run.

    .venv/bin/python benchmarks/lean_graph.py [--rounds 6] [--runs 10] [--warmup 10] [--threads 2]
                                               [--size 224] [--out-dir benchmarks/results]

What it does, in one process:
  1. builds ``mobileformer_294m`` and ``mobilenetv3_large_100`` (random weights; BN statistics and
     Linear weights re-drawn so that activations are O(1) and parity numbers mean something), and
     five forms of the Mobile-Former: the plain (training-form) model, then the ``fuse()`` rewrites
     applied cumulatively one family at a time (``qbheat.models.mobileformer.fuse_modules``):
     Mobile sub-blocks and the lite block (BN folded, one DyReLU MLP per block, hsigmoid constants
     folded, depthwise convs with a channel multiplier split into plain ones), the two
     bridges (head-batched attention without feature-map transposes, scales folded), the Former
     (head-batched attention), the merge classifier (BN folded). The last stage is what
     ``timm.utils.model.reparameterize_model`` gives, and the script checks that it is;
  2. exports each to ONNX (``torch.onnx.export(dynamo=True)``, dynamic batch, example batch 2);
     OpenVINO converts that ONNX file on load (``openvino.convert_model``), as ``deploy_targets``' runner does. (An IR written with
     ``openvino.save_model``'s default ``compress_to_fp16=True`` stores the weights in fp16: that,
     not the ONNX reader, is what gave a 1.3-1.6e-3 relative parity error in the first version of
     this script.);
  3. times every artifact at 224², batch 1, ``--threads`` threads, in three configurations: ONNX
     Runtime (graph optimisation ALL, sequential) with its default spinning thread pool, the same
     with ``session.intra_op.allow_spinning = 0``, and OpenVINO CPU (f32 hint, LATENCY hint, one
     stream, compiled for the input's static shape, as ``deploy_targets``' runner does, ``--threads``
     threads): ``--warmup`` runs each, then ``--rounds`` rounds in which every artifact and
     configuration takes one turn (``deploy_targets.protocol.timed_interleaved``: 2 untimed runs,
     ``--runs`` timed, a 0.1 s pause; an earlier version ran each configuration once in turn, which
     timed every run right after another session's, with its spinning threads and cold caches, up to
     3× slow); p50 and minimum over the pooled samples;
  4. profiles MobileNetV3-L and the final (``fuse()``) stage by op type: ONNX Runtime's profiler
     (``enable_profiling``, written to a temporary folder) and OpenVINO's ``PERF_COUNT`` counters,
     as milliseconds per inference and node counts per op type;
  5. quantises MobileNetV3-L and the final stage to INT8 with NNCF (OpenVINO post-training
     quantisation, ``--calibration`` natural images) for each ``--int8-scopes`` entry: NNCF's default
     (everything), its TRANSFORMER model type, and convolutions only (``IgnoredScope`` on MatMul,
     Softmax, MVN and the elementwise ops); times them in the same interleaved rounds against the
     OpenVINO f32 artifact and reports agreement with it on 16 natural images;
  6. prints node counts, p50/min, the ratios to MobileNetV3-L (of p50 and of min) per configuration
     and stage, and the parity of each stage against the plain PyTorch model on natural images;
     records JSON + Markdown under ``--out-dir`` (``lean_graph.json``, ``lean_graph.md``) with date,
     machine, load average at start and end, and the command.

Spinning: on a shared machine whose load average exceeds its core count, ONNX Runtime's spinning
workers fight the other processes for the cores; turning spinning off is a session option a
deployment can set, so both are recorded and the target is checked for each.

Targets (issue 6): MF-294M p50 ÷ MobileNetV3-L p50 ≤ 2.2 on ONNX Runtime and ≤ 1.8 on OpenVINO f32,
with outputs within 1e-4 relative of the plain model; OpenVINO INT8 ≥ 1.4× OpenVINO f32 for MF-294M.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import qbheat  # noqa: F401  (torchvision shim before timm)
import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model

import export  # noqa: F401  (switches OpenVINO/NNCF telemetry off before openvino / nncf are imported)
from qbheat_contract.parity import agreement
from export.quantize import INT8_SCOPES as EXPORT_INT8_SCOPES
from deploy_targets.protocol import ProtocolConfig, timed_interleaved, warmup
from common import OpenVinoRunner, OrtRunner, atomic_write, export_onnx, images, onnx_nodes, realistic  # benchmarks/common.py
from deploy_targets.runners import get_runner
from deploy_targets.fingerprint import cpu_model
from qbheat.models import create_model
from qbheat.models.mobileformer import (
    Former,
    FormerToMobile,
    LiteBottleneck,
    MergeClassifier,
    MobileBottleneck,
    MobileDownsample,
    MobileToFormer,
    fuse_modules,
)

INT8_TARGET = 1.4  # OpenVINO INT8 ≥ 1.4× OpenVINO f32 for mobileformer_294m (issue 6)
TARGETS = {"onnxruntime": 2.2, "onnxruntime_nospin": 2.2, "openvino_f32": 1.8}
RUNTIMES = ("onnxruntime", "onnxruntime_nospin", "openvino_f32")
PARITY_RTOL = 1e-4
# Cumulative rewrite stages: (label, module families fused at this stage).
STAGES = [
    ("plain", ()),
    ("+ mobile (BN fold, one DyReLU MLP, constants, split depthwise)", (LiteBottleneck, MobileBottleneck, MobileDownsample)),
    ("+ bridges (one projection per side, constants folded)", (MobileToFormer, FormerToMobile)),
    ("+ former (scale folded)", (Former,)),
    ("+ head (BN fold) = fuse()", (MergeClassifier,)),
]


def openvino_by_type(path: Path, x: np.ndarray, threads: int, warmup_runs: int = 5, runs: int = 20) -> dict:
    """OpenVINO's PERF_COUNT counters of ``path`` at batch 1 by node type (executed nodes only):
    {type: {"ms": per inference, "nodes": count}}, slowest first."""
    import collections

    r = get_runner("openvino", threads=threads, precision="fp32", perf_count=True).load(path, batch=1)
    name = r.inputs()[0]["name"]
    for _ in range(warmup_runs):
        r.run({name: x})
    ms, count = collections.defaultdict(float), collections.Counter()
    for _ in range(runs):
        r.run({name: x})
        for info in r.request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                ms[info.node_type] += info.real_time.total_seconds() * 1e3
                count[info.node_type] += 1
    r.close()
    return {k: {"ms": v / runs, "nodes": count[k] // runs} for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def profile_by_op(path: Path, x: np.ndarray, threads: int, runs: int = 20) -> dict:
    """Milliseconds per inference and node count per op type: ONNX Runtime's profiler (spinning off,
    trace in a temporary folder, deleted after) and OpenVINO's PERF_COUNT (executed nodes only)."""
    import collections

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="lean_graph_prof_") as d:
        ort_run = OrtRunner(path, threads, spinning=False, profile_prefix=str(Path(d) / "ort"))
        for _ in range(5 + runs):
            ort_run(x)
        trace = json.loads(Path(ort_run.session.end_profiling()).read_text())
    ms, count = collections.defaultdict(float), collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms[e["args"]["op_name"]] += e["dur"] / 1e3
            count[e["args"]["op_name"]] += 1
    n = 5 + runs
    out["onnxruntime_nospin"] = {k: {"ms": round(v / n, 3), "nodes": count[k] // n}
                                 for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}
    out["openvino_f32"] = {k: {"ms": round(v["ms"], 3), "nodes": v["nodes"]}
                           for k, v in openvino_by_type(path, x, threads, runs=runs).items()}
    return out


INT8_SCOPES = {  # what NNCF quantises (OpenVINO post-training quantisation, natural-image calibration)
    "all": {},  # NNCF's default: convolutions, every MatMul (token projections, attention), elementwise ops
    "transformer": {"model_type": "TRANSFORMER"},  # NNCF's transformer preset (SmoothQuant, no Softmax/LN)
    # ours: the op types the export's default scope leaves in float. The export also stores the float
    # MatMuls' weights as INT8 (weight compression); this benchmark measures the quantisation alone.
    "convs": {"ignored_scope": EXPORT_INT8_SCOPES["convs"]["openvino_ignored_types"]},
}


def quantize_int8(path: Path, calib: np.ndarray, scope: str, threads: int) -> "ArrayRunner":
    """NNCF INT8 of the ONNX file at ``path`` under ``INT8_SCOPES[scope]``, run by the package's OpenVINO runner.

    It calls NNCF itself rather than ``export.openvino_format.quantize_int8``: 'transformer' is not one of
    the export's scopes, and the export's 'convs' also compresses the float MatMuls' weights, which this
    benchmark leaves out to measure activation quantisation alone (see ``INT8_SCOPES``)."""
    import logging

    import nncf
    from nncf.common.logging import nncf_logger

    nncf_logger.setLevel(logging.WARNING)
    kw = dict(INT8_SCOPES[scope])
    if "model_type" in kw:
        kw["model_type"] = nncf.ModelType[kw["model_type"]]
    if "ignored_scope" in kw:
        kw["ignored_scope"] = nncf.IgnoredScope(types=kw["ignored_scope"], validate=False)
    import openvino as ov

    q = nncf.quantize(ov.convert_model(str(path)), nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                      subset_size=len(calib), **kw)
    xml = path.with_name(f"{path.stem}_int8_{scope}.xml")
    ov.save_model(q, str(xml), compress_to_fp16=False)
    runner = OpenVinoRunner(xml, threads)
    runner.quantised_ops = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
    return runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10, help="runs per artifact per round (≥ 50 in total by default)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calibration", type=int, default=32, help="natural images for NNCF INT8 calibration")
    ap.add_argument("--int8-scopes", default="all,transformer,convs", help=f"of {sorted(INT8_SCOPES)}; '' for none")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    x1 = images(1, args.size)
    xs = images(4, args.size)
    calib, check = images(args.calibration, args.size), images(16, args.size)
    int8: dict = {}
    ov_props: dict = {}
    load_at_start = list(os.getloadavg())
    rows: list[dict] = []
    profiles: dict = {}
    with tempfile.TemporaryDirectory(prefix="lean_graph_") as tmp:
        tmp = Path(tmp)
        peer = realistic(create_model("mobilenetv3_large_100"))
        mf = realistic(create_model("mobileformer_294m"))
        with torch.no_grad():
            ref = mf(torch.from_numpy(xs)).numpy()
        stage_models = []
        current = mf
        for label, kinds in STAGES:
            if kinds:
                current = fuse_modules(_copy(current), kinds)
            stage_models.append((label, current))
        with torch.no_grad():  # the cumulative stages end where timm's reparameterize_model ends
            timm_lean = reparameterize_model(mf)(torch.from_numpy(xs)).numpy()
            last = stage_models[-1][1](torch.from_numpy(xs)).numpy()
        assert np.array_equal(timm_lean, last), "the last stage differs from reparameterize_model(model)"

        artifacts = []
        print(f"exporting {len(stage_models) + 1} models to ONNX ...", file=sys.stderr)
        for i, (label, model) in enumerate([("mobilenetv3_large_100", peer)] + stage_models):
            t0 = time.perf_counter()
            path = export_onnx(model, args.size, tmp / f"m{i}.onnx")
            export_s = time.perf_counter() - t0
            runners = {"onnxruntime": OrtRunner(path, args.threads, spinning=True),
                       "onnxruntime_nospin": OrtRunner(path, args.threads, spinning=False),
                       "openvino_f32": OpenVinoRunner(path, args.threads)}
            with torch.no_grad():
                torch_out = model(torch.from_numpy(xs)).numpy()
            row = dict(model="mobilenetv3_large_100" if i == 0 else "mobileformer_294m", stage=label,
                       onnx_nodes=onnx_nodes(path), export_s=round(export_s, 1))
            if i > 0:
                scale = float(np.abs(ref).max())
                row["parity_vs_plain_torch"] = {
                    "torch": float(np.abs(torch_out - ref).max() / scale),
                    "onnxruntime": float(np.abs(runners["onnxruntime"](xs) - ref).max() / scale),
                    "openvino_f32": float(np.abs(runners["openvino_f32"](xs) - ref).max() / scale),
                }
            if (i == 0 or i == len(stage_models)) and args.int8_scopes:
                f32_out = runners["openvino_f32"](check)
                for scope in args.int8_scopes.split(","):
                    print(f"  NNCF INT8 ({scope}) of {label} ...", file=sys.stderr)
                    q = quantize_int8(path, calib, scope, args.threads)
                    runners[f"openvino_int8_{scope}"] = q
                    int8[(i, scope)] = {"model": row["model"], "stage": label, "scope": scope, "options": INT8_SCOPES[scope],
                                        "fake_quantize_nodes": q.quantised_ops, "agreement_vs_ov_f32": agreement(f32_out, q(check))}
            if i == len(stage_models):  # what OpenVINO compiled with (the f32 hint is really in force)
                compiled = runners["openvino_f32"].compiled
                ov_props = {k: str(compiled.get_property(k)) for k in (
                    "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")}
            if i == 0 or i == len(stage_models):
                print(f"  profiling {label} by op type ...", file=sys.stderr)
                profiles[row["model"] if i == 0 else f"mobileformer_294m {label}"] = profile_by_op(path, x1, args.threads)
            rows.append(row)
            artifacts.append(runners)
            print(f"  {row['model']:22s} {label:48s} {row['onnx_nodes']:5d} nodes  ({export_s:.0f} s)", file=sys.stderr)

        # Interleaved timing: warmup, then per round one turn of every configuration (2 untimed runs,
        # args.runs timed, a pause), so load bursts land on all alike and no run follows another session directly.
        fns = {(i, rt): (lambda fn=fn: fn(x1)) for i, runners in enumerate(artifacts) for rt, fn in runners.items()}
        cfg = ProtocolConfig(warmup_runs=args.warmup, warmup_seconds=0.0, min_runs=args.runs, min_seconds=0.0)
        for fn in fns.values():
            warmup(fn, cfg)
        samples = {k: [] for k in fns}
        for r in range(args.rounds):
            print(f"timing round {r + 1}/{args.rounds}", file=sys.stderr)
            for k, got in timed_interleaved(fns, cfg, block=args.runs, turn_warmup=2, settle_seconds=0.1).items():
                samples[k] += [ms / 1e3 for ms in got]  # seconds, as before
    for i, row in enumerate(rows):
        row["p50_ms"] = {rt: round(float(np.median(samples[(i, rt)])) * 1e3, 3) for rt in RUNTIMES}
        row["min_ms"] = {rt: round(float(np.min(samples[(i, rt)])) * 1e3, 3) for rt in RUNTIMES}
        row["runs"] = len(samples[(i, "onnxruntime")])
    base, base_min = rows[0]["p50_ms"], rows[0]["min_ms"]
    for row in rows[1:]:
        row["ratio_to_mnv3"] = {rt: round(row["p50_ms"][rt] / base[rt], 3) for rt in RUNTIMES}
        row["min_ratio_to_mnv3"] = {rt: round(row["min_ms"][rt] / base_min[rt], 3) for rt in RUNTIMES}
    for (i, scope), rec in int8.items():
        ms = np.array(samples[(i, f"openvino_int8_{scope}")]) * 1e3
        f32 = np.array(samples[(i, "openvino_f32")]) * 1e3
        rec.update(p50_ms=round(float(np.median(ms)), 3), min_ms=round(float(ms.min()), 3),
                   speedup_vs_f32_p50=round(float(np.median(f32) / np.median(ms)), 3),
                   speedup_vs_f32_min=round(float(f32.min() / ms.min()), 3))
    final = rows[-1]
    parity_ok = all(v <= PARITY_RTOL for r in rows[1:] for v in r["parity_vs_plain_torch"].values())
    verdict = {rt: final["ratio_to_mnv3"][rt] <= t for rt, t in TARGETS.items()}

    record = {
        "schema": "qbheat.bench.lean_graph/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
                    "note": "shared machine: other jobs ran beside this one; compare only the ratios measured in this run"},
        "protocol": {"size": args.size, "batch": 1, "threads": args.threads, "warmup": args.warmup,
                     "rounds": args.rounds, "runs_per_round": args.runs, "statistic": "p50 and min of pooled samples",
                     "turns": "per round one turn per configuration: 2 untimed runs, runs_per_round timed, 0.1 s pause",
                     "onnxruntime": "graph optimisation ALL, sequential, inter-op 1 thread; spinning on (default) and off",
                     "openvino": "ONNX converted on load (openvino.convert_model), compiled for batch 1; INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY, NUM_STREAMS 1",
                     "openvino_compiled_properties": ov_props},
        "targets": {"mf_over_mnv3": TARGETS, "parity_rtol": PARITY_RTOL},
        "rows": rows,
        "profile_by_op": profiles,
        "openvino_int8": list(int8.values()),
        "result": {"ratio_plain": rows[1]["ratio_to_mnv3"], "ratio_lean": final["ratio_to_mnv3"],
                   "min_ratio_plain": rows[1]["min_ratio_to_mnv3"], "min_ratio_lean": final["min_ratio_to_mnv3"],
                   "meets_target": verdict, "parity_ok": parity_ok},
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "lean_graph.json", json.dumps(record, indent=2) + "\n")
    md = markdown(record)
    atomic_write(out / "lean_graph.md", md)
    print(md)
    return 0


def markdown(rec: dict) -> str:
    m = rec["machine"]
    names = {"onnxruntime": "ORT", "onnxruntime_nospin": "ORT no-spin", "openvino_f32": "OV f32"}
    lines = [
        "# Lean exported graph: Mobile-Former-294M vs MobileNetV3-Large",
        "",
        f"- date: {rec['date']}",
        f"- machine: {m['platform']}, {m['cpu']}, {m['cores']} cores; load average at start "
        f"{[round(v, 2) for v in m['load_average_at_start']]}, at end {[round(v, 2) for v in m['load_average_at_end']]}",
        f"- {m['note']}",
        f"- versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}",
        f"- command: `{rec['command']}`",
        f"- protocol: {rec['protocol']['size']}², batch 1, {rec['protocol']['threads']} threads, "
        f"{rec['protocol']['warmup']} warmup, {rec['protocol']['rounds']} rounds, "
        f"one turn of every configuration per round (2 untimed runs, {rec['protocol']['runs_per_round']} timed, a 0.1 s pause); "
        "p50 and min of the pooled samples",
        f"- ONNX Runtime: {rec['protocol']['onnxruntime']}; OpenVINO: {rec['protocol']['openvino']} "
        f"(compiled model reports {rec['protocol']['openvino_compiled_properties']})",
        "",
        "Latency, ms, as p50 / min; ratio to MobileNetV3-L as p50 ratio / min ratio:",
        "",
        "| model | stage | ONNX nodes | " + " | ".join(f"{n} ms | {n} ÷ MNV3" for n in names.values())
        + " | max rel. diff vs plain (torch / ORT / OV) |",
        "|---|---|---|" + "---|---|" * len(names) + "---|",
    ]
    for r in rec["rows"]:
        cells = []
        for rt in names:
            ratio = (f"{r['ratio_to_mnv3'][rt]:.2f} / {r['min_ratio_to_mnv3'][rt]:.2f}" if "ratio_to_mnv3" in r else "1 / 1")
            cells.append(f"{r['p50_ms'][rt]:.1f} / {r['min_ms'][rt]:.1f} | {ratio}")
        par = r.get("parity_vs_plain_torch")
        par_s = " / ".join(f"{v:.1e}" for v in par.values()) if par else "—"
        lines.append(f"| {r['model']} | {r['stage']} | {r['onnx_nodes']} | " + " | ".join(cells) + f" | {par_s} |")
    res = rec["result"]
    lines += [
        "",
        f"Targets: MF ÷ MNV3 p50 ≤ {rec['targets']['mf_over_mnv3']['onnxruntime']} on ONNX Runtime (either thread-pool "
        f"setting), ≤ {rec['targets']['mf_over_mnv3']['openvino_f32']} on OpenVINO f32; parity ≤ {rec['targets']['parity_rtol']} relative.",
        f"Plain p50 ratio: {res['ratio_plain']}; lean p50 ratio: {res['ratio_lean']}; lean min ratio: {res['min_ratio_lean']}; "
        f"met (p50): {res['meets_target']}; parity ok: {res['parity_ok']}.",
        "",
    ]
    if rec.get("openvino_int8"):
        lines += ["## OpenVINO INT8 (NNCF post-training quantisation, natural-image calibration)", "",
                  f"Target: INT8 ≥ {INT8_TARGET}× OpenVINO f32 for mobileformer_294m with parity. Agreement is against "
                  "OpenVINO f32 of the same graph on 16 natural images; weights are random (O(1) activations), so it "
                  "shows what quantisation does to the function, not dataset accuracy.", "",
                  "| model | scope | FakeQuantize nodes | p50 / min ms | speedup vs f32 (p50 / min) | max rel. diff | cosine min | top-1 agreement |",
                  "|---|---|---:|---|---|---:|---:|---:|"]
        for q in rec["openvino_int8"]:
            a = q["agreement_vs_ov_f32"]
            lines.append(f"| {q['model']} | {q['scope']} | {q['fake_quantize_nodes']} | {q['p50_ms']:.1f} / {q['min_ms']:.1f} | "
                         f"{q['speedup_vs_f32_p50']:.2f} / {q['speedup_vs_f32_min']:.2f} | {a['rel_max']:.1e} | "
                         f"{a['cosine_min']:.4f} | {a['top1_agreement']:.2f} |")
        lines.append("")
    lines += [
        "## Where the time goes, by op type (ms per inference, nodes)",
        "",
        "ONNX Runtime's profiler (spinning off; the optimised graph's node types) and OpenVINO's PERF_COUNT "
        "(executed nodes). Profiler totals exceed the wall-clock latency (per-node timing overhead, load while "
        "profiling): read them as shares of the time, not as latencies.",
        "",
    ]
    for rt in ("onnxruntime_nospin", "openvino_f32"):
        models = list(rec["profile_by_op"])
        tables = [rec["profile_by_op"][k][rt] for k in models]
        ops = sorted({op for t in tables for op in t}, key=lambda op: -max(t.get(op, {"ms": 0})["ms"] for t in tables))
        lines += [f"**{names[rt]}**", "", "| op type | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines.append("| **total** | " + " | ".join(f"**{sum(v['ms'] for v in t.values()):.1f}** ({sum(v['nodes'] for v in t.values())})"
                                                  for t in tables) + " |")
        for op in ops[:14]:
            lines.append(f"| {op} | " + " | ".join(f"{t[op]['ms']:.2f} ({t[op]['nodes']})" if op in t else "—" for t in tables) + " |")
        lines.append("")
    return "\n".join(lines)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    sys.exit(main())
