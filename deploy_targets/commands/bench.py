"""``qbheat-export bench ARTIFACTS --target PROFILE``: run the benchmark protocol here.

ARTIFACTS is an export folder (its ``model_card.json`` says which artifacts exist; those the
profile's runtime can run at its precision are measured) or artifact files (a ``model_card.json``
next to a file is used when it lists that file). Writes a ``qbheat.bench_report/1`` JSON and prints
a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qbheat_contract.errors import QBHeatError


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


def resolve(paths: list[str], profile) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(artifact entry with abs_path, model card or None) for each artifact the profile can run."""
    from qbheat_contract.card import FILENAME, ModelCardError, read_model_card

    from deploy_targets.bundle import select_artifacts
    from deploy_targets.runners import FORMAT_RUNTIMES, format_of

    out = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise QBHeatError(f"{path} does not exist; pass an export folder or artifact files.")
        try:
            if path.is_dir() and path.suffix != ".mlpackage":
                card = read_model_card(path)
                out += [(dict(a, abs_path=str(path / a["path"])), card) for a in select_artifacts(card, profile)]
                continue
            card = read_model_card(path.parent) if (path.parent / FILENAME).exists() else None
        except ModelCardError as e:
            raise QBHeatError(f"{e}.") from None
        fmt = format_of(path)
        if profile.runtime not in FORMAT_RUNTIMES[fmt]:
            raise QBHeatError(f"{path.name} is {fmt}, which target {profile.name} ({profile.runtime}) cannot run.")
        entry = next((a for a in (card or {}).get("artifacts", []) if (path.parent / a["path"]).resolve() == path.resolve()), None)
        out.append((dict(entry or {"path": path.name, "format": fmt, "precision": "fp32"}, abs_path=str(path)), card if entry else None))
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deploy_targets import fingerprint, flops, harness, results
    from deploy_targets.profiles import load_profile
    from deploy_targets.protocol import ProtocolConfig, expand_options

    profile = load_profile(args.target)
    if profile.reach != "local":
        raise QBHeatError(f"target {profile.name} is reached by {profile.reach}, not from here; "
                          f"run 'qbheat-export bundle EXPORT --target {profile.name} --out DIR' and run the bundle on the device.")
    settings = dict(profile.protocol)
    if args.quick:
        settings.update(warmup_runs=2, warmup_seconds=0.0, min_runs=5, min_seconds=0.0)
    if args.min_runs is not None:
        settings["min_runs"] = args.min_runs
    if args.min_seconds is not None:
        settings["min_seconds"] = args.min_seconds
    cfg = ProtocolConfig.from_dict(settings)
    threads, batches = args.threads or list(profile.threads), args.batch or list(profile.batch)
    items = resolve(args.artifacts, profile)
    doc = results.new_document(["qbheat-export", *sys.argv[1:]] if sys.argv[0].endswith("qbheat-export") else sys.argv,
                               cfg.to_dict(), {profile.name: profile.to_dict()})
    host = fingerprint.host()
    total = len(items) * len(threads) * len(batches) * len(expand_options(profile.options))
    image = None
    if not args.no_e2e:
        from deploy_targets.bundle import _golden_images
        image = _golden_images(1, *profile.input_size)[1]
    with tqdm(total=total, desc=f"bench {profile.name}", unit="config", file=sys.stderr) as bar:
        for artifact, card in items:
            bar.set_postfix_str(Path(artifact["abs_path"]).name)
            rows = harness.bench_artifact(artifact, profile.runtime, cfg, threads=threads, batches=batches,
                                          options=profile.options, input_size=profile.input_size, target=profile.name,
                                          hardware=profile.hardware, card=card, image_bytes=image, host_info=host,
                                          on_row=lambda _row: bar.update(1))
            if artifact.get("format") == "onnx":
                graph = flops.count_onnx(artifact["abs_path"])
                for row in rows:
                    row["graph"] = {k: graph[k] for k in ("nodes", "macs", "flops", "nodes_by_op", "macs_by_op", "convention")}
            doc["rows"] += rows
    results.write_document(doc, args.out)
    print(results.format_table(doc["rows"]))
    for row in doc["rows"]:
        for w in row.get("warnings", []):
            print(f"qbheat-export bench: warning: {results.row_label(row)}: {w}", file=sys.stderr)
    print(f"qbheat-export bench: wrote {args.out}", file=sys.stderr)
    return 0
