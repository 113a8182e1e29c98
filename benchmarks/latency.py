"""Latency of Mobile-Former-294M against its MAC peer MobileNetV3-Large, through one protocol, in one run.

    .venv/bin/python benchmarks/latency.py [--rounds 3] [--min-seconds 1.0] [--out-dir benchmarks/results]

At 224×224, batch 1, 2 threads, for each model: PyTorch eager (``inference_mode``), ONNX Runtime
fp32, OpenVINO f32 (the f32 hint: this CPU would otherwise run bf16; compiled for a static batch of 1,
as ``deploy_targets``' runner does, with the dynamic-batch compile timed beside it for the lean graphs),
each for the *plain* export and
the *lean* one (after ``timm.utils.model.reparameterize_model``, which Mobile-Former's ``fuse()``
hooks into), plus OpenVINO INT8 of the lean graph for Mobile-Former (the export's own INT8 step,
``export.openvino_format.quantize_int8`` with ``--int8-scope``, calibrated on natural images). After the protocol's warmup, each of ``--rounds`` rounds times
all configurations with ``deploy_targets.protocol.timed_interleaved``: turns of ``--turn-warmup``
untimed and ``--block`` timed runs of each, a ``--settle`` pause after each turn, until every
configuration has its minimum runs and seconds, so load bursts and drift on this shared machine
fall on all of them alike and the previous session's spinning threads are idle when the next runs.

Printed and recorded (``benchmarks/results/latency.{json,md}``): p50 per configuration (all rounds
pooled); the ratios the issue sets targets for — MF/MNV3 per runtime (≤ 2.2 ORT, ≤ 1.8 OV f32), best
exported runtime vs eager for MF (≥ 4×), OV INT8 vs OV f32 for MF (≥ 1.4×) with INT8 parity against
PyTorch — pooled and per round, with a verdict that asks every round to meet the target
(``protocol.target_verdict``); OpenVINO's per-node time by node type for f32 and INT8 with the most
INT8 could gain here (``int8_profile``); ONNX node counts and MACs (counted from the graphs) and the
lean graphs' parity with the plain model.

The export here uses torch.onnx (dynamo, dynamic batch, example batch 2), and OpenVINO converts that
ONNX file with ``openvino.convert_model``, as the export pipeline and ``deploy_targets``' runner do; weights are random (timm init, no download), so INT8
agreement numbers show that the pipeline keeps the function, not the accuracy on a dataset.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import qbheat  # noqa: F401  (torchvision shim before timm)
import torch
from timm.utils.model import reparameterize_model

import export  # noqa: F401  (switches OpenVINO/NNCF telemetry off before openvino / nncf are imported)
from deploy_targets import fingerprint
from deploy_targets.flops import count_onnx
from deploy_targets.protocol import ProtocolConfig, round_ratios, summarize, target_verdict, timed_interleaved, warmup
from deploy_targets.runners import get_runner
from qbheat_contract.parity import agreement
from export.quantize import INT8_SCOPES
from common import INPUT_NAME, export_onnx, images  # benchmarks/common.py
from lean_graph import openvino_by_type  # benchmarks/lean_graph.py: OpenVINO PERF_COUNT time by node type
from qbheat.models import create_model

TARGETS = {"mf_over_mnv3_ort": 2.2, "mf_over_mnv3_ov_f32": 1.8, "best_exported_speedup_vs_eager": 4.0, "ov_int8_speedup_vs_f32": 1.4}


CONVOLUTIONS = ("Convolution", "GroupConvolution")  # OpenVINO CPU node types that NNCF's 'convs' scope quantises


def int8_profile(f32_path: Path, int8_path: Path, x: np.ndarray, threads: int) -> dict:
    """Where OpenVINO f32 and INT8 spend their time (ms per inference by node type, from the CPU
    plugin's PERF_COUNT counters, compiled as the runner compiles it), and the most INT8 could gain
    on this CPU.

    The bounds (Amdahl): the f32 time of the convolution nodes (1×1 and depthwise), and then also of
    the FullyConnected nodes, divided by the speedup INT8 gets on the 1×1 Convolution nodes here,
    with nothing added for quantising and dequantising and the rest of the graph (token attention,
    softmax, normalisation, layout reorders, the dynamic ReLUs' elementwise work) unchanged. Both are
    upper bounds: OpenVINO runs the depthwise convs in f32 even when NNCF quantises their inputs, and
    most FullyConnected time is per-op overhead on 6-token tensors, which INT8 does not shorten.
    """
    f32, int8 = ({t: v["ms"] for t, v in openvino_by_type(path, x, threads, warmup_runs=10, runs=30).items()}
                 for path in (f32_path, int8_path))
    speedup = f32.get("Convolution", 0.0) / max(int8.get("Convolution", 0.0), 1e-9)
    total = sum(f32.values())

    def bound(types: tuple[str, ...]) -> float:
        q = sum(f32.get(t, 0.0) for t in types)
        return total / (total - q + q / speedup)

    return {"f32_ms_by_type": f32, "int8_ms_by_type": int8, "convolution_int8_speedup": speedup,
            "convolution_share_of_f32": sum(f32.get(t, 0.0) for t in CONVOLUTIONS) / total,
            "int8_speedup_bound_convolutions": bound(CONVOLUTIONS),
            "int8_speedup_bound_convolutions_and_fc": bound((*CONVOLUTIONS, "FullyConnected"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobileformer_294m,mobilenetv3_large_100")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0, help="per configuration and round")
    p.add_argument("--min-runs", type=int, default=20, help="per configuration and round")
    p.add_argument("--block", type=int, default=10, help="timed runs per turn when cycling through the configurations")
    p.add_argument("--turn-warmup", type=int, default=2, help="untimed runs at the start of each turn")
    p.add_argument("--settle", type=float, default=0.1,
                   help="seconds of pause after each turn (lets ONNX Runtime's spinning threads go idle)")
    p.add_argument("--calibration", type=int, default=32, help="natural images for NNCF INT8 calibration")
    p.add_argument("--int8-scope", choices=tuple(INT8_SCOPES), default="convs",
                   help="the export's --int8-scope (export.quantize.INT8_SCOPES): 'convs' (convolutions quantised; token "
                        "matmuls, softmax, LayerNorm and the DyReLU/bridge elementwise ops float, MatMul weights INT8) or 'all'")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = fingerprint.host()["load_average_1m"]
    names = args.models.split(",")
    mf, peer = names[0], names[1]
    work = Path(tempfile.mkdtemp(prefix="qbheat_latency_"))
    x1 = images(1, args.size)
    calib = images(args.calibration, args.size)
    check = images(16, args.size)
    configs: dict[str, callable] = {}
    graphs, parities, closers = {}, {}, []
    for name in names:
        torch.manual_seed(0)
        plain = create_model(name).eval()
        lean = reparameterize_model(copy.deepcopy(plain)).eval()
        with torch.inference_mode():
            ref = plain(torch.from_numpy(check)).numpy()
            parities[f"{name} lean vs plain (PyTorch)"] = agreement(ref, lean(torch.from_numpy(check)).numpy())
        xt = torch.from_numpy(x1)

        def eager(model=plain, xt=xt):
            with torch.inference_mode():
                model(xt)

        configs[f"{name} | eager"] = eager
        for variant, model in (("plain", plain), ("lean", lean)):
            t0 = time.perf_counter()
            path = export_onnx(model, args.size, work / f"{name}_{variant}.onnx", "logits")
            print(f"exported {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            count = count_onnx(path)
            graphs[f"{name} {variant}"] = {k: count[k] for k in ("nodes", "macs", "flops", "params", "size_bytes")}
            graphs[f"{name} {variant}"]["top_ops"] = dict(list(count["nodes_by_op"].items())[:8])
            runs = [("onnxruntime", "ORT fp32", {}), ("openvino", "OV f32", {})]
            if variant == "lean":  # the runner's former default, for the static-shape compile's effect
                runs.append(("openvino", "OV f32 dynamic-batch", {"static_shapes": False}))
            for runtime, label, options in runs:
                r = get_runner(runtime, threads=args.threads, precision="fp32", **options).load(path, batch=1)
                out = np.concatenate([next(iter(r.run({INPUT_NAME: check[i:i + 1]}).values())) for i in range(len(check))])
                parities[f"{name} {variant} {label} vs PyTorch"] = agreement(ref, out)
                configs[f"{name} | {label} {variant}"] = (lambda r=r: r.run({INPUT_NAME: x1}))
                closers.append(r)
        if name == mf:
            import openvino as ov

            from export.openvino_format import from_onnx, quantize_int8

            t0 = time.perf_counter()
            ov_model = from_onnx(work / f"{name}_lean.onnx", INPUT_NAME, ("logits",), {})  # as the export converts it
            # The export's own INT8 step (export.quantize.INT8_SCOPES; 'convs' is its default): NNCF's
            # default scope also quantises the ~100 token MatMuls and the attention, which on this AVX2
            # CPU ran slower than f32 (0.71×) and, with O(1) activations, broke parity (lean_graph.md).
            q = quantize_int8(ov_model, calib, detector=False, scope=args.int8_scope)
            ov.save_model(q, str(work / f"{name}_int8.xml"), compress_to_fp16=False)
            print(f"NNCF INT8 in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            r = get_runner("openvino", threads=args.threads, precision="int8").load(work / f"{name}_int8.xml", batch=1)
            out = np.concatenate([next(iter(r.run({INPUT_NAME: check[i:i + 1]}).values())) for i in range(len(check))])
            parities[f"{name} OV INT8 vs PyTorch"] = agreement(ref, out)
            configs[f"{name} | OV INT8 lean"] = (lambda r=r: r.run({INPUT_NAME: x1}))

    cfg = ProtocolConfig(warmup_runs=5, warmup_seconds=0.3, min_runs=args.min_runs, min_seconds=args.min_seconds)
    for fn in configs.values():
        warmup(fn, cfg)
    per_round: dict[str, list[list[float]]] = {k: [] for k in configs}
    for rnd in range(args.rounds):
        got = timed_interleaved(configs, cfg, block=args.block, turn_warmup=args.turn_warmup, settle_seconds=args.settle)
        for key, s in got.items():
            per_round[key].append(s)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    samples = {k: [x for r in rs for x in r] for k, rs in per_round.items()}
    stats = {k: summarize(s) for k, s in samples.items()}
    p50 = {k: s["p50"] for k, s in stats.items()}

    def key(name: str, variant: str, label: str) -> str:
        return f"{name} | {label} {variant}"

    pairs = {}  # ratio name -> (numerator config, denominator config): pooled p50s and per-round p50s
    for variant in ("plain", "lean"):
        pairs[f"mf_over_mnv3_ort ({variant})"] = (key(mf, variant, "ORT fp32"), key(peer, variant, "ORT fp32"))
        pairs[f"mf_over_mnv3_ov_f32 ({variant})"] = (key(mf, variant, "OV f32"), key(peer, variant, "OV f32"))
    pairs["mf_over_mnv3_ov_f32 (lean, dynamic batch)"] = (key(mf, "lean", "OV f32 dynamic-batch"), key(peer, "lean", "OV f32 dynamic-batch"))
    pairs["mf_ov_f32_lean_static_speedup_vs_dynamic_batch"] = (key(mf, "lean", "OV f32 dynamic-batch"), key(mf, "lean", "OV f32"))
    exported = {k: v for k, v in p50.items() if k.startswith(f"{mf} |") and "eager" not in k}
    best_key = min(exported, key=exported.get)
    peer_best = min((k for k in p50 if k.startswith(f"{peer} |") and "eager" not in k), key=p50.get)
    pairs["best_exported_speedup_vs_eager"] = (f"{mf} | eager", best_key)
    pairs["ov_int8_speedup_vs_f32"] = (key(mf, "lean", "OV f32"), f"{mf} | OV INT8 lean")
    pairs["mnv3_best_exported_speedup_vs_eager"] = (f"{peer} | eager", peer_best)
    ratios = {name: p50[a] / p50[b] for name, (a, b) in pairs.items()}
    rounds = {name: round_ratios(per_round[a], per_round[b]) for name, (a, b) in pairs.items()}
    # The verdict takes the better of plain and lean (the lean graph is what the export ships) and asks
    # every round, not only the pooled value, to meet the target.
    verdict_of = {"mf_over_mnv3_ort": min(("mf_over_mnv3_ort (plain)", "mf_over_mnv3_ort (lean)"), key=ratios.get),
                  "mf_over_mnv3_ov_f32": min(("mf_over_mnv3_ov_f32 (plain)", "mf_over_mnv3_ov_f32 (lean)"), key=ratios.get),
                  "best_exported_speedup_vs_eager": "best_exported_speedup_vs_eager",
                  "ov_int8_speedup_vs_f32": "ov_int8_speedup_vs_f32"}
    verdicts = {t: {"ratio": name, "pooled": ratios[name], "met_pooled": (ratios[name] <= TARGETS[t]) if t.startswith("mf_over") else (ratios[name] >= TARGETS[t]),
                    **target_verdict(rounds[name], TARGETS[t], at_most=t.startswith("mf_over"))}
                for t, name in verdict_of.items()}
    profile = int8_profile(work / f"{mf}_lean.onnx", work / f"{mf}_int8.xml", x1, args.threads)

    host = fingerprint.host()
    host["load_average_1m_at_start"] = load_at_start
    command = " ".join([fingerprint.interpreter(), "benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"schema": "qbheat.latency_benchmark/1", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "machine": {**host, "platform": platform.platform()},
              "settings": {"size": args.size, "batch": 1, "threads": args.threads, "rounds": args.rounds, "protocol": cfg.to_dict(),
                           "block": args.block, "turn_warmup": args.turn_warmup, "settle_seconds": args.settle,
                           "calibration_images": args.calibration, "int8_scope": args.int8_scope},
              "p50_ms": p50, "stats": {k: {kk: v for kk, v in s.items() if kk != "samples_ms"} for k, s in stats.items()},
              "ratios": ratios, "ratios_per_round": rounds, "best_exported": best_key, "targets": TARGETS, "verdicts": verdicts,
              "ov_profile": profile,
              "graphs": graphs, "parity": parities,
              "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                           "openvino": __import__("openvino").get_version(), "nncf": __import__("nncf").__version__}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Latency: {mf} vs {peer}", "", f"- date: {result['date']}", f"- machine: {host['cpu_model']} ({fingerprint.cores_text(host)}), {result['machine']['platform']}; "
          f"1-min load average {load_at_start} at start, {host['load_average_1m']} at end (above {host['cores']} = other work competed for the cores)",
          f"- command: `{command}`", f"- settings: {args.size}×{args.size}, batch 1, {args.threads} threads, {args.rounds} interleaved rounds × "
          f"(≥ {args.min_runs} runs and ≥ {args.min_seconds} s per configuration, in turns of {args.turn_warmup} untimed + "
          f"{args.block} timed runs with a {args.settle} s pause after each), samples pooled", "",
          "| configuration | p50 ms | p90 ms | CV % |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {s['p50']:.2f} | {s['p90']:.2f} | {s['cv'] * 100:.1f} |" for k, s in stats.items()]
    md += ["", "| ratio | pooled p50s | per round (min – median – max) | target | rounds meeting it | verdict |",
           "|---|---:|---:|---:|---:|---|"]
    by_ratio = {v["ratio"]: (t, v) for t, v in verdicts.items()}
    for k, v in ratios.items():
        r = rounds[k]
        t, vd = by_ratio.get(k, (None, None))
        target = "" if t is None else ("≤ " if t.startswith("mf_over") else "≥ ") + str(TARGETS[t])
        md.append(f"| {k} | {v:.2f} | {min(r):.2f} – {np.median(r):.2f} – {max(r):.2f} | {target} | "
                  f"{'' if vd is None else str(vd['rounds_met']) + ' / ' + str(vd['rounds'])} | {'' if vd is None else vd['verdict']} |")
    md += ["", "A target counts as met only when every round meets it; 'mixed' means the rounds straddle it (noise)."]
    f32p, i8p = profile["f32_ms_by_type"], profile["int8_ms_by_type"]
    md += ["", f"OpenVINO per-node time by type, {mf} lean, static batch 1 (PERF_COUNT, ms per inference; sums exclude "
           "the time between nodes):", "", "| node type | f32 | INT8 |", "|---|---:|---:|"]
    md += [f"| {t} | {f32p.get(t, 0.0):.3f} | {i8p.get(t, 0.0):.3f} |" for t in dict.fromkeys([*f32p, *i8p])]
    md += [f"| total | {sum(f32p.values()):.3f} | {sum(i8p.values()):.3f} |", "",
           f"INT8 speeds the 1×1 Convolution nodes up {profile['convolution_int8_speedup']:.2f} ×. All convolution nodes are "
           f"{profile['convolution_share_of_f32'] * 100:.0f} % of the f32 node time: if every one of them (depthwise included) got "
           f"that speedup and quantising cost nothing, INT8 would be at most {profile['int8_speedup_bound_convolutions']:.2f} × "
           f"faster than f32 here; with every FullyConnected node sped up as well, at most "
           f"{profile['int8_speedup_bound_convolutions_and_fc']:.2f} ×."]
    md += ["", f"Best exported configuration for {mf}: {best_key}.", "", "| graph | ONNX nodes | MACs (M) | params (M) | top ops |", "|---|---:|---:|---:|---|"]
    md += [f"| {k} | {g['nodes']} | {g['macs'] / 1e6:.1f} | {g['params'] / 1e6:.2f} | {', '.join(f'{o} {n}' for o, n in g['top_ops'].items())} |" for k, g in graphs.items()]
    md += ["", "| parity | max abs | cosine (min) | top-1 agreement | n |", "|---|---:|---:|---:|---:|"]
    md += [f"| {k} | {v['max_abs']:.2e} | {v['cosine_min']:.6f} | {v['top1_agreement']:.3f} | {v['n']} |" for k, v in parities.items()]
    md += ["", "Weights are random (timm init); INT8 agreement shows the quantised graph keeps the function on natural images, not dataset accuracy.", ""]
    (out / "latency.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
