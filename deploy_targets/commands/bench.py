"""``qbheat-export bench ARTIFACTS --target PROFILE``: run the benchmark protocol here.

ARTIFACTS is an export folder (its ``model_card.json`` says which artifacts exist; those the
profile's runtime can run at its precision are measured) or artifact files (a ``model_card.json``
next to a file is used when it lists that file). Writes a ``qbheat.bench_report/1`` JSON and prints
a table. The work is ``deploy_targets.bench.bench``, the Python API.
"""
from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must list non-negative integers")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", help="an export folder (with model_card.json) or artifact files")
    p.add_argument("--target", required=True, help="a shipped profile name (e.g. local-cpu-ort) or a path to your own .toml")
    p.add_argument("--threads", type=_ints, help="comma-separated intra-op thread counts (default: the profile's)")
    p.add_argument("--batch", type=_ints, help="comma-separated batch sizes (default: the profile's)")
    p.add_argument("--out", default="bench.json", help="result JSON (default: bench.json)")
    p.add_argument("--quick", action="store_true", help="a short protocol (2 warmup, 5 timed runs): a smoke test, not for reporting")
    p.add_argument("--min-runs", type=int, help="override the protocol's minimum timed runs")
    p.add_argument("--min-seconds", type=float, help="override the protocol's minimum timed seconds")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (decode + preprocess + infer + top-k) timing")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deploy_targets import results
    from deploy_targets.bench import bench, count_configurations, resolve
    from deploy_targets.profiles import load_profile

    profile = load_profile(args.target)
    threads, batches = args.threads or list(profile.threads), args.batch or list(profile.batch)
    total = count_configurations(resolve(args.artifacts, profile), threads, batches, profile) if profile.reach == "local" else 0
    command = ["qbheat-export", *sys.argv[1:]] if sys.argv[0].endswith("qbheat-export") else sys.argv
    with tqdm(total=total, desc=f"bench {profile.name}", unit="config", file=sys.stderr) as bar:
        doc = bench(args.artifacts, args.target, threads=args.threads, batches=args.batch, quick=args.quick,
                    min_runs=args.min_runs, min_seconds=args.min_seconds, e2e=not args.no_e2e, command=command,
                    on_artifact=bar.set_postfix_str, on_row=lambda _row: bar.update(1))
    results.write_document(doc, args.out)
    print(results.format_table(doc["rows"]))
    for row in doc["rows"]:
        for w in row.get("warnings", []):
            print(f"qbheat-export bench: warning: {results.row_label(row)}: {w}", file=sys.stderr)
    print(f"qbheat-export bench: wrote {args.out}", file=sys.stderr)
    return 0
