"""``qbheat-export doctor``: which backends import, their versions, and what can run on this machine."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the probe as JSON")


def run(args: argparse.Namespace) -> int:
    from export.backends import probe

    info = probe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["machine"]
    print(f"machine: {m['platform']} | {m['processor']} | python {m['python']} | CUDA GPU: {'yes' if m['cuda_gpu'] else 'no'}")
    print("packages:")
    for name, version in info["packages"].items():
        print(f"  {name:<12} {version or '-- not importable'}")
    print("formats:")
    for fmt, st in info["formats"].items():
        build = "build: yes" if st["can_build"] else f"build: no ({st['why_not_build']})"
        run_ = "run here: yes" if st["can_run"] else f"run here: no ({st['why_not_run']})"
        print(f"  {fmt:<9} {build}; {run_}; precisions {','.join(st['precisions'])}")
        for note in st["notes"]:
            print(f"  {'':<9} note: {note}")
    return 0
