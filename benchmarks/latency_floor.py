"""How far down can Mobile-Former-294M's latency ratio to MobileNetV3-L go? Parts removed, in one run.

    .venv/bin/python benchmarks/latency_floor.py [--rounds 6] [--runs 10] [--threads 2] [--out-dir benchmarks/results]

Issue 6 asks for MF-294M p50 ÷ MobileNetV3-L p50 ≤ 2.2 on ONNX Runtime and ≤ 1.8 on OpenVINO f32. This
script measures what each part of the lean (``fuse()``) graph costs by deleting it: the Mobile→Former
bridges (tokens pass through), the Formers, the Former→Mobile bridges (the map passes through), all three,
and all three with each dynamic ReLU replaced by a plain ReLU. These graphs do **not** compute the model's
function; they are lower bounds for what any rewrite of the kept parts can reach. Every graph and
MobileNetV3-L are exported the same way (``torch.onnx.export(dynamo=True)``, dynamic batch), then timed at
224², batch 1, ``--threads`` threads, on ONNX Runtime (spinning on) and OpenVINO CPU (f32 hint, LATENCY,
one stream, compiled for batch 1), all in interleaved rounds so load bursts on a shared machine hit every
configuration alike (``protocol.timed_interleaved``: each turn starts with 2 untimed runs and ends
with a ``--settle`` pause, so one session's spinning threads do not slow the next). Prints and
records (``latency_floor.json`` / ``.md``) p50 and minimum per graph and runtime and each graph's
ratio to MobileNetV3-L.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import qbheat  # noqa: F401  (torchvision shim before timm)
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model import reparameterize_model

import export  # noqa: F401  (OpenVINO telemetry off before openvino is imported)
from deploy_targets import fingerprint
from deploy_targets.protocol import ProtocolConfig, timed_interleaved, warmup
from deploy_targets.runners import get_runner
from common import INPUT_NAME, export_onnx, images, onnx_nodes, realistic  # benchmarks/common.py
from qbheat.models import create_model
from qbheat.models.mobileformer_lean import LeanMobile


class TokensPassThrough(nn.Module):
    """In place of Mobile→Former: the tokens plus one pixel of the map.

    The pixel keeps the tokens dependent on the input. Returned unchanged, they would be the
    initial tokens, a constant, and both runtimes would fold everything computed from them (the
    Formers, the dynamic-ReLU coefficients, Former→Mobile's keys and values) into constants, which
    would bound nothing. The cost is a slice and an add per block, so the bound stays conservative.
    """

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z + x[:, :1, 0, 0].unsqueeze(1)


class FormerRemoved(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class MapPassThrough(nn.Module):
    """In place of Former→Mobile: the feature map is returned unchanged."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x


class StaticReLUMobile(nn.Module):
    """A lean Mobile sub-block with each dynamic ReLU replaced by a plain ReLU (fuses into the conv)."""

    def __init__(self, m: LeanMobile):
        super().__init__()
        self.downsample, self.convs = m.downsample, m.convs

    def forward(self, x: torch.Tensor, token0: torch.Tensor) -> torch.Tensor:
        c = self.convs
        if self.downsample:
            r = c[1](F.relu(c[0](x)))
            return c[3](F.relu(c[2](r))) + r
        return c[2](F.relu(c[1](F.relu(c[0](x)))))


def without(model: nn.Module, parts: set[str]) -> nn.Module:
    """A copy of the lean model with the named parts removed from every block that has them."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        if not hasattr(block, "former"):
            continue  # the lite first block has no bridges
        if "mobile_to_former" in parts:
            block.mobile_to_former = TokensPassThrough()
        if "former" in parts:
            block.former = FormerRemoved()
        if "former_to_mobile" in parts:
            block.former_to_mobile = MapPassThrough()
        if "dynamic_relu" in parts:
            block.mobile = StaticReLUMobile(block.mobile)
    return model.eval()


TOKENS = {"mobile_to_former", "former", "former_to_mobile"}
VARIANTS = [  # (label, parts removed)
    ("lean (the model)", set()),
    ("- Mobile->Former", {"mobile_to_former"}),
    ("- Former", {"former"}),
    ("- Former->Mobile", {"former_to_mobile"}),
    ("- all token parts", TOKENS),
    ("- all token parts, static ReLU", TOKENS | {"dynamic_relu"}),
]
PEER = "mobilenetv3_large_100"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10, help="runs per configuration per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.1, help="seconds of pause after each configuration's turn")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = fingerprint.host()["load_average_1m"]
    torch.manual_seed(0)
    lean = reparameterize_model(realistic(create_model("mobileformer_294m"))).eval()
    graphs = {label: without(lean, parts) for label, parts in VARIANTS}
    graphs[PEER] = realistic(create_model(PEER))
    x = images(1, args.size)
    configs, nodes = {}, {}
    with tempfile.TemporaryDirectory(prefix="qbheat_floor_") as work:
        for i, (label, model) in enumerate(graphs.items()):
            path = export_onnx(model, args.size, Path(work) / f"g{i}.onnx")
            nodes[label] = onnx_nodes(path)
            for runtime in ("onnxruntime", "openvino"):
                runner = get_runner(runtime, threads=args.threads, precision="fp32").load(path, batch=1)
                configs[(label, runtime)] = (lambda r=runner: r.run({INPUT_NAME: x}))
            print(f"exported {label}: {nodes[label]} ONNX nodes", file=sys.stderr)
        # The protocol's warmup and turns, by count only (no time minimum): args.runs per round.
        cfg = ProtocolConfig(warmup_runs=args.warmup, warmup_seconds=0.0, min_runs=args.runs, min_seconds=0.0)
        for fn in configs.values():
            warmup(fn, cfg)
        samples = {k: [] for k in configs}
        for rnd in range(args.rounds):  # one turn per configuration and round: 2 untimed runs, args.runs timed, a pause
            for k, s in timed_interleaved(configs, cfg, block=args.runs, turn_warmup=2, settle_seconds=args.settle).items():
                samples[k] += s
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    stats = {k: {"p50": float(np.median(v)), "min": float(np.min(v)), "n": len(v)} for k, v in samples.items()}
    rows = []
    for label in graphs:
        row = {"graph": label, "onnx_nodes": nodes[label]}
        for runtime in ("onnxruntime", "openvino"):
            s, peer = stats[(label, runtime)], stats[(PEER, runtime)]
            row[runtime] = {**s, "ratio_p50": s["p50"] / peer["p50"], "ratio_min": s["min"] / peer["min"]}
        rows.append(row)
    host = fingerprint.host()
    command = " ".join([fingerprint.interpreter(), "benchmarks/latency_floor.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"schema": "qbheat.latency_floor/1", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "machine": {**host, "load_average_1m_at_start": load_at_start, "platform": platform.platform()},
              "settings": {"size": args.size, "batch": 1, "threads": args.threads, "rounds": args.rounds, "runs": args.runs,
                           "turn_warmup": 2, "settle_seconds": args.settle},
              "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_floor.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Latency floor: mobileformer_294m with parts removed, vs mobilenetv3_large_100", "",
          f"- date: {result['date']}", f"- machine: {host['cpu_model']} ({fingerprint.cores_text(host)}); 1-min load average "
          f"{load_at_start} at start, {host['load_average_1m']} at end", f"- command: `{command}`",
          f"- settings: {args.size}², batch 1, {args.threads} threads, {args.rounds} interleaved rounds × {args.runs} runs; "
          "ONNX Runtime (spinning on) and OpenVINO f32 (compiled for batch 1)",
          "- graphs other than the first compute a different function: they bound what rewriting the kept parts can reach", "",
          "| graph | ONNX nodes | ORT p50 ms | ORT ÷ MNV3 (p50 / min) | OV f32 p50 ms | OV ÷ MNV3 (p50 / min) |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, v = r["onnxruntime"], r["openvino"]
        md.append(f"| {r['graph']} | {r['onnx_nodes']} | {o['p50']:.2f} | {o['ratio_p50']:.2f} / {o['ratio_min']:.2f} | "
                  f"{v['p50']:.2f} | {v['ratio_p50']:.2f} / {v['ratio_min']:.2f} |")
    (out / "latency_floor.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
