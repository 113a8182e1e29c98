#!/usr/bin/env python3
"""Verify and benchmark this bundle on the device it was made for.

Needs Python 3.11+, numpy and the runtime named in bundle.json — not qbheat, not torch
(ExecuTorch's Python runtime is the exception: it needs torch). Pillow is optional: without it the
end-to-end timing (JPEG decode + preprocessing + inference + softmax/top-k) is skipped.

    python3 run_bundle.py --out result.json [--threads 1,4] [--batch 1] [--quick]

1. checks every artifact's SHA-256 against bundle.json (a truncated copy fails here);
2. runs the golden inputs and compares with the expected outputs (tolerance in bundle.json);
3. runs the benchmark protocol and writes the same JSON as 'qbheat-export bench'
   (schema qbheat.bench_report/1); merge it on the host with 'qbheat-export report'.

Exit status: 0 all golden checks passed, 1 a golden check failed (the JSON is still written),
2 the bundle or the environment is wrong (one-line message).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from qbheat_bench import fingerprint, harness, results  # noqa: E402
from qbheat_contract.errors import CHECK_FAILED, OK, USER_ERROR, QBHeatError  # noqa: E402
from qbheat_contract.hashing import artifact_sha256  # noqa: E402
from qbheat_bench.protocol import ProtocolConfig  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "result.json"), help="where to write the JSON result")
    parser.add_argument("--threads", type=_ints, default=None, help="comma-separated thread counts (default: the profile's)")
    parser.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (default: the profile's)")
    parser.add_argument("--quick", action="store_true", help="a short protocol (smoke test, not for reporting)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end timing")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QBHeatError as e:
        print(f"run_bundle: error: {e}", file=sys.stderr)
        return USER_ERROR


def run(args: argparse.Namespace) -> int:
    bundle = json.loads((HERE / "bundle.json").read_text())
    profile = bundle["profile"]
    protocol = dict(bundle["protocol"])
    if args.quick:
        protocol.update(warmup_runs=2, warmup_seconds=0.0, min_runs=5, min_seconds=0.0)
    cfg = ProtocolConfig.from_dict(protocol)
    with np.load(HERE / "golden.npz") as z:
        golden = {"inputs": {k[len("input:"):]: z[k] for k in z.files if k.startswith("input:")},
                  "outputs": {k[len("output:"):]: z[k] for k in z.files if k.startswith("output:")},
                  "images": z["images"] if "images" in z.files else None,
                  "tolerance": bundle.get("tolerance")}
    image = None
    if not args.no_e2e:
        try:
            import PIL  # noqa: F401
            image = (HERE / "golden.jpg").read_bytes()
        except ImportError:
            print("run_bundle: Pillow is not installed; skipping the end-to-end timing.", file=sys.stderr)
    host = fingerprint.host()
    doc = results.new_document([sys.executable, *sys.argv], cfg.to_dict(), {profile["name"]: profile})
    doc["bundle"] = {"created": bundle["created"], "golden_reference": bundle["golden_reference"]}
    for artifact in bundle["artifacts"]:
        path = HERE / artifact["path"]
        if not path.exists():
            raise QBHeatError(f"{artifact['path']} is missing from the bundle; copy the whole folder.")
        sha = artifact_sha256(path)
        if sha != artifact["sha256"]:
            raise QBHeatError(f"{artifact['path']} has SHA-256 {sha[:12]}…, not {artifact['sha256'][:12]}… as bundled; the copy is damaged.")
        print(f"run_bundle: {artifact['path']} on {profile['runtime']}", file=sys.stderr)
        doc["rows"] += harness.bench_artifact(
            dict(artifact, abs_path=str(path)), profile["runtime"], cfg,
            threads=args.threads or profile["threads"], batches=args.batch or profile["batch"],
            options=profile.get("options", {}), input_size=tuple(profile["input_size"]), target=profile["name"],
            hardware=profile["hardware"], card=bundle["card"], image_bytes=image, golden=golden, host_info=host,
            progress=None)
    results.write_document(doc, args.out)
    print(results.format_table(doc["rows"]))
    print(f"run_bundle: wrote {args.out}", file=sys.stderr)
    failed = [r for r in doc["rows"] if r.get("golden") and not r["golden"]["passed"]]
    if failed:
        print(f"run_bundle: {len(failed)} configuration(s) FAILED the golden-output check.", file=sys.stderr)
        return CHECK_FAILED
    return OK


if __name__ == "__main__":
    sys.exit(main())
