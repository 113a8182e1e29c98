"""``qbheat-export bundle EXPORT_DIR --target PROFILE --out DIR``: a self-contained folder for a device.

See ``deploy_targets.bundle``. With ``--run`` the bundle is also copied to the profile's reach
(ssh / adb / here for local and macos), run there, and its result JSON fetched back.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", help="an export folder holding model_card.json and the artifacts")
    p.add_argument("--target", required=True, help="a shipped profile name or a path to your own .toml")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--run", action="store_true", help="copy the bundle to the device, run it and fetch result.json next to --out")
    p.add_argument("--best", nargs="+", metavar="RUNS", help="bundle only the configuration 'report --recommend' picks for this target "
                   "from these bench results (or a report.json that holds recommendations); needs --max-drop unless a report is given")
    p.add_argument("--max-drop", type=float, metavar="POINTS", help="the accuracy budget for --best, in top-1 points (detector exports: COCO mAP points)")


def run(args: argparse.Namespace) -> int:
    from qbheat_contract.card import ModelCardError, read_model_card

    from qbheat_contract.errors import QBHeatError
    from deploy_targets.bundle import write_bundle
    from deploy_targets.profiles import load_profile
    from deploy_targets.transport import execute, parse_reach, remote_run_plan

    profile = load_profile(args.target)
    try:
        card = read_model_card(args.export_dir)
    except ModelCardError as e:
        raise QBHeatError(f"{e}.") from None
    if args.best:
        from deploy_targets.recommend import best_for

        choice = best_for(args.best, profile.name, args.max_drop)
        only = [choice["artifact"]]
        profile = dataclasses.replace(profile, threads=(choice["threads"],), batch=(choice["batch"],),
                                      precision=choice["precision"])
        print(f"qbheat-export bundle: best on {profile.name}: {choice['format']}/{choice['precision']} {choice['artifact']}, "
              f"threads {choice['threads']}, batch {choice['batch']} (p50 {choice['p50_ms']:.3f} ms, {choice.get('drop_metric') or 'top-1'} "
              f"drop {choice.get('drop', choice['drop_top1']):+.2f} points)", file=sys.stderr)
    out = write_bundle(card, args.export_dir, profile, args.out, overwrite=args.force, only=only if args.best else None)
    result = Path(str(out).rstrip("/") + ".result.json")
    plan = remote_run_plan(parse_reach(profile.reach), out, result)
    print(f"qbheat-export bundle: wrote {out} for {profile.name} ({profile.runtime}); to run it:", file=sys.stderr)
    for argv in plan:
        print("  " + shlex.join(argv))
    if args.run:
        execute(plan)
        print(f"qbheat-export bundle: result in {result}", file=sys.stderr)
    return 0
