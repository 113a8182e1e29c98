"""``qbheat models``: print the model zoo (params and MACs measured here beside the published ones).

Examples:
    qbheat models
    qbheat models --filter 'mobileformer_*' --json
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    parser.add_argument("--filter", metavar="PATTERN", default=None,
                        help="only models whose name matches this glob, e.g. 'mobileformer_*'")


def run(args: argparse.Namespace) -> int:
    from qbheat.zoo import format_table, zoo_rows

    rows = zoo_rows(args.filter)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
