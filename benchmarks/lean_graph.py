"""The lean exported graph of Mobile-Former-294M against MobileNetV3-Large, rewrite by rewrite, in one run.

    .venv/bin/python benchmarks/lean_graph.py [--rounds 6] [--runs 10] [--warmup 10] [--threads 2]
                                               [--size 224] [--out-dir benchmarks/results]

What it does, in one process:
  1. builds ``mobileformer_294m`` and ``mobilenetv3_large_100`` (random weights; BN statistics and
     Linear weights re-drawn so that activations are O(1) and parity numbers mean something), and
     five forms of the Mobile-Former: the plain (training-form) model, then the ``fuse()`` rewrites
     applied cumulatively one family at a time (``qbheat.models.mobileformer.fuse_modules``):
     Mobile sub-blocks (BN folded, one DyReLU MLP per block, hsigmoid constants folded), the two
     bridges (head-batched attention without feature-map transposes, scales folded), the Former
     (head-batched attention), the merge classifier (BN folded). The last stage is what
     ``timm.utils.model.reparameterize_model`` gives, and the script checks that it is;
  2. exports each to ONNX (``torch.onnx.export(dynamo=True)``, dynamic batch, example batch 2) and
     to OpenVINO IR (``openvino.convert_model`` of that ONNX file, ``save_model``, read back);
  3. times every artifact at 224², batch 1, ``--threads`` threads, ONNX Runtime (default graph
     optimisations) and OpenVINO CPU with the f32 hint: ``--warmup`` runs each, then ``--rounds``
     rounds in which every artifact runs ``--runs`` times in turn (interleaved, so drift on this
     shared machine hits all alike); p50 over the pooled samples;
  4. prints node counts, p50, the ratio to MobileNetV3-L per runtime and stage, and the parity of each
     stage against the plain PyTorch model on natural images; records JSON + Markdown under
     ``--out-dir`` (``lean_graph.json``, ``lean_graph.md``) with date, machine and the command.

Targets (issue 6): MF-294M p50 ÷ MobileNetV3-L p50 ≤ 2.2 on ONNX Runtime and ≤ 1.8 on OpenVINO f32,
with outputs within 1e-4 relative of the plain model.
"""
from __future__ import annotations

import argparse
import json
import math
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

from qbheat.data.samples import sample_images
from qbheat.models import create_model
from qbheat.models.mobileformer import (
    Former,
    FormerToMobile,
    MergeClassifier,
    MobileBottleneck,
    MobileDownsample,
    MobileToFormer,
    fuse_modules,
)

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
TARGETS = {"onnxruntime": 2.2, "openvino_f32": 1.8}
PARITY_RTOL = 1e-4
# Cumulative rewrite stages: (label, module families fused at this stage).
STAGES = [
    ("plain", ()),
    ("+ mobile (BN fold, one DyReLU MLP, constants)", (MobileBottleneck, MobileDownsample)),
    ("+ bridges (batched heads, no transposes)", (MobileToFormer, FormerToMobile)),
    ("+ former (batched heads)", (Former,)),
    ("+ head (BN fold) = fuse()", (MergeClassifier,)),
]


def images(n: int, size: int) -> np.ndarray:
    x = sample_images(n, size=size, seed=0).astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2))


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """PyTorch-default Linear init and random BN statistics, so activations are O(1) (the official
    Mobile-Former init, Linear N(0, 0.01), gives outputs near 1e-3 and would make parity vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        with torch.no_grad():
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound * math.sqrt(3), bound * math.sqrt(3), generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


def export_onnx(model: nn.Module, size: int, path: Path) -> Path:
    x = torch.randn(2, 3, size, size)  # a batch-1 example can silently fix the batch (env_feasibility §2)
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False, optimize=True)
    return path


def onnx_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: x})[0]


class OpenVinoRunner:
    def __init__(self, onnx_path: Path, threads: int):
        import openvino as ov

        ir = onnx_path.with_suffix(".xml")
        ov.save_model(ov.convert_model(str(onnx_path)), str(ir))
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(ir)), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10, help="runs per artifact per round (≥ 50 in total by default)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    x1 = images(1, args.size)
    xs = images(4, args.size)
    rows: list[dict] = []
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
        print(f"exporting {len(stage_models) + 1} models to ONNX and OpenVINO IR ...", file=sys.stderr)
        for i, (label, model) in enumerate([("mobilenetv3_large_100", peer)] + stage_models):
            t0 = time.perf_counter()
            path = export_onnx(model, args.size, tmp / f"m{i}.onnx")
            export_s = time.perf_counter() - t0
            ort_run, ov_run = OrtRunner(path, args.threads), OpenVinoRunner(path, args.threads)
            with torch.no_grad():
                torch_out = model(torch.from_numpy(xs)).numpy()
            row = dict(model="mobilenetv3_large_100" if i == 0 else "mobileformer_294m", stage=label,
                       onnx_nodes=onnx_nodes(path), export_s=round(export_s, 1))
            if i > 0:
                scale = float(np.abs(ref).max())
                row["parity_vs_plain_torch"] = {
                    "torch": float(np.abs(torch_out - ref).max() / scale),
                    "onnxruntime": float(np.abs(ort_run(xs) - ref).max() / scale),
                    "openvino_f32": float(np.abs(ov_run(xs) - ref).max() / scale),
                }
            rows.append(row)
            artifacts.append((ort_run, ov_run))
            print(f"  {row['model']:22s} {label:48s} {row['onnx_nodes']:5d} nodes  ({export_s:.0f} s)", file=sys.stderr)

        # Interleaved timing: warmup, then rounds × (every artifact × runs).
        samples = {(i, rt): [] for i in range(len(artifacts)) for rt in ("onnxruntime", "openvino_f32")}
        for ort_run, ov_run in artifacts:
            for _ in range(args.warmup):
                ort_run(x1)
                ov_run(x1)
        for r in range(args.rounds):
            print(f"timing round {r + 1}/{args.rounds}", file=sys.stderr)
            for i, (ort_run, ov_run) in enumerate(artifacts):
                for rt, fn in (("onnxruntime", ort_run), ("openvino_f32", ov_run)):
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        fn(x1)
                        samples[(i, rt)].append(time.perf_counter() - t0)
    for i, row in enumerate(rows):
        row["p50_ms"] = {rt: round(float(np.median(samples[(i, rt)])) * 1e3, 3) for rt in ("onnxruntime", "openvino_f32")}
        row["runs"] = len(samples[(i, "onnxruntime")])
    base = rows[0]["p50_ms"]
    for row in rows[1:]:
        row["ratio_to_mnv3"] = {rt: round(row["p50_ms"][rt] / base[rt], 3) for rt in base}
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
                    "load_average_at_end": list(os.getloadavg()),
                    "note": "shared machine: other jobs ran beside this one; compare only the ratios measured in this run"},
        "protocol": {"size": args.size, "batch": 1, "threads": args.threads, "warmup": args.warmup,
                     "rounds": args.rounds, "runs_per_round": args.runs, "statistic": "p50 of pooled samples"},
        "targets": {"mf_over_mnv3": TARGETS, "parity_rtol": PARITY_RTOL},
        "rows": rows,
        "result": {"ratio_plain": rows[1]["ratio_to_mnv3"], "ratio_lean": final["ratio_to_mnv3"],
                   "meets_target": verdict, "parity_ok": parity_ok},
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "lean_graph.json", json.dumps(record, indent=2) + "\n")
    md = markdown(record)
    _atomic_write(out / "lean_graph.md", md)
    print(md)
    return 0


def markdown(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        "# Lean exported graph: Mobile-Former-294M vs MobileNetV3-Large",
        "",
        f"- date: {rec['date']}",
        f"- machine: {m['platform']}, {m['cpu']}, {m['cores']} cores; load average at end {m['load_average_at_end']}",
        f"- {m['note']}",
        f"- versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}",
        f"- command: `{rec['command']}`",
        f"- protocol: {rec['protocol']['size']}², batch 1, {rec['protocol']['threads']} threads, "
        f"{rec['protocol']['warmup']} warmup, {rec['protocol']['rounds']} interleaved rounds × "
        f"{rec['protocol']['runs_per_round']} runs, p50",
        "",
        "| model | stage | ONNX nodes | ORT p50 ms | ORT ÷ MNV3 | OV f32 p50 ms | OV ÷ MNV3 | max rel. diff vs plain (torch / ORT / OV) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        ratio = r.get("ratio_to_mnv3", {"onnxruntime": 1.0, "openvino_f32": 1.0})
        par = r.get("parity_vs_plain_torch")
        par_s = " / ".join(f"{v:.1e}" for v in par.values()) if par else "—"
        lines.append(f"| {r['model']} | {r['stage']} | {r['onnx_nodes']} | {r['p50_ms']['onnxruntime']:.2f} | "
                     f"{ratio['onnxruntime']:.2f} | {r['p50_ms']['openvino_f32']:.2f} | {ratio['openvino_f32']:.2f} | {par_s} |")
    res = rec["result"]
    lines += [
        "",
        f"Targets: ORT ratio ≤ {rec['targets']['mf_over_mnv3']['onnxruntime']}, OpenVINO f32 ratio ≤ "
        f"{rec['targets']['mf_over_mnv3']['openvino_f32']}, parity ≤ {rec['targets']['parity_rtol']} relative.",
        f"Plain ratio: {res['ratio_plain']}; lean ratio: {res['ratio_lean']}; met: {res['meets_target']}; "
        f"parity ok: {res['parity_ok']}.",
        "",
    ]
    return "\n".join(lines)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
