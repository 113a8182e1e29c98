"""``qbheat-export report RUNS... [--compare BASELINE] [--recommend --max-drop POINTS] --out DIR``: merge runs
into JSON, Markdown, HTML; with ``--recommend``, per target the fastest configuration whose top-1 drop (detector: mAP drop) fits
(``deploy_targets.recommend``)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="result JSON files from 'qbheat-export bench' or bundles")
    p.add_argument("--compare", metavar="BASELINE", help="a previous result or report JSON; flags p50 changes beyond the noise")
    p.add_argument("--out", required=True, help="folder for report.json, report.md and report.html")
    p.add_argument("--probe", action="append", default=[], metavar="LABEL=JSON",
                   help="a 'qbheat probe --out' results file for the report's task-accuracy section, e.g. "
                        "'pre-trained=linear_probe.json' (repeatable)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any row regressed beyond the noise")
    p.add_argument("--recommend", action="store_true",
                   help="per target, the fastest configuration whose top-1 drop (from 'qbheat-export eval') is at most --max-drop")
    p.add_argument("--max-drop", type=float, metavar="POINTS", help="the accuracy budget for --recommend, in top-1 points (detector exports: COCO mAP points)")


def run(args: argparse.Namespace) -> int:
    from qbheat_contract.errors import CHECK_FAILED, OK, QBHeatError
    from deploy_targets.recommend import format_recommendations
    from deploy_targets.report import build_report

    if args.recommend and (args.max_drop is None or args.max_drop < 0):
        raise QBHeatError("--recommend needs --max-drop POINTS, the top-1 points a configuration may lose (e.g. --max-drop 1.0).")
    probes = []
    for item in args.probe:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise QBHeatError(f"--probe expects LABEL=JSON (e.g. 'random init=random_probe.json'), not {item!r}.")
        probes.append((label, path))
    merged = build_report(args.runs, args.out, args.compare, args.max_drop if args.recommend else None, probes)
    for line in format_recommendations(merged.get("recommendations") or []):
        print(line)
    regressions = [c for c in merged.get("comparisons", []) if c["verdict"] == "regression"]
    for c in merged.get("comparisons", []):
        print(f"{c['verdict']:>12}  {c['delta'] * 100:+6.1f} % (threshold {c['threshold'] * 100:.1f} %)  {c['key']}")
    print(f"qbheat-export report: {len(merged['rows'])} rows from {len(args.runs)} run(s) -> {args.out}/report.{{json,md,html}}", file=sys.stderr)
    return CHECK_FAILED if regressions and args.fail_on_regression else OK
