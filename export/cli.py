"""The ``qbheat-export`` command: export, verify, benchmark, bundle, report, quickstart.

This is the composition root of the product: sub-commands from ``export`` and from
``deploy_targets`` are imported by module path only when chosen.
"""
from __future__ import annotations

import sys

from qbheat.cli import dispatch

COMMANDS = {
    "export": ("export.commands.export", "convert a checkpoint or timm model plus head to runtime formats, verified"),
    "eval": ("export.commands.eval", "top-1 / top-5 of PyTorch and every runnable artifact on a labelled set, with the drop"),
    "doctor": ("export.commands.doctor", "which backends are installed and what can run on this machine"),
    "bench": ("deploy_targets.commands.bench", "benchmark exported artifacts on a device profile"),
    "bundle": ("deploy_targets.commands.bundle", "write a self-contained folder to verify and benchmark on a device"),
    "report": ("deploy_targets.commands.report", "merge benchmark runs into JSON, Markdown and HTML reports"),
    "quickstart": ("export.commands.quickstart", "pre-train -> head -> export -> verify -> benchmark, end to end"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("qbheat-export", "Export, verify and benchmark qbheat backbones.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
