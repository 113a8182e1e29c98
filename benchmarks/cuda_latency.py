"""PyTorch CUDA latency of Mobile-Former-294M against MobileNetV3-Large, side by side in one run.

    python benchmarks/cuda_latency.py [--batch 1 32] [--runs 200] [--out FILE.md]

Needs a CUDA GPU (the desktop-GPU device profile's hardware without TensorRT). For each model, for
the plain and the lean (``reparameterize_model``) module, in fp32 and fp16 (``.half()``), at each
batch: 20 warm-up runs, then ``--runs`` runs timed one by one with CUDA events; the samples of
two interleaved rounds are pooled and the p50 is reported, with images/s at that batch. The
Mobile-Former / MobileNetV3 ratio is printed per precision and batch. Weights are random (no
download); latency does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import qbheat.models  # noqa: F401  (torchvision shim before timm; registers mobileformer_*)
import timm
import torch
from timm.utils.model import reparameterize_model

MODELS = ("mobileformer_294m", "mobilenetv3_large_100")


def time_runs(model: torch.nn.Module, x: torch.Tensor, runs: int) -> list[float]:
    """Milliseconds per forward, each run timed with its own pair of CUDA events."""
    samples = []
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    return samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, help="write the Markdown table here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: this torch sees no CUDA GPU.", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    configs = {}
    for name in MODELS:
        plain = timm.create_model(name, pretrained=False).eval()
        lean = reparameterize_model(copy.deepcopy(plain)).eval()
        for variant, module in (("plain", plain), ("lean", lean)):
            for dtype in (torch.float32, torch.float16):
                configs[(name, variant, str(dtype).split(".")[-1])] = copy.deepcopy(module).to(dev, dtype)
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for (name, variant, dt), module in configs.items():
            for b in args.batch:
                dtype = getattr(torch, dt)
                x = torch.randn(b, 3, args.image_size, args.image_size, device=dev, dtype=dtype)
                samples.setdefault((name, variant, dt, b), []).extend(time_runs(module, x, args.runs))
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    lines = [
        f"# PyTorch CUDA latency, {args.image_size}px",
        "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}",
        f"- command: `python benchmarks/cuda_latency.py {' '.join(sys.argv[1:])}`",
        f"- protocol: 20 warm-up runs, {args.runs} runs × {args.rounds} interleaved rounds, CUDA events, "
        "cudnn.benchmark on, inference_mode; random weights",
        "",
        "| model | graph | dtype | batch | p50 ms | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for (name, variant, dt, b), v in p50.items():
        lines.append(f"| {name} | {variant} | {dt} | {b} | {v:.3f} | {b * 1000 / v:.0f} |")
    lines += ["", "| ratio MF-294M / MNV3-L p50 | graph | dtype | batch | ratio |", "|---|---|---|---|---|"]
    for variant in ("plain", "lean"):
        for dt in ("float32", "float16"):
            for b in args.batch:
                r = p50[(MODELS[0], variant, dt, b)] / p50[(MODELS[1], variant, dt, b)]
                lines.append(f"| | {variant} | {dt} | {b} | {r:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
