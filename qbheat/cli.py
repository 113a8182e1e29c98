"""The ``qbheat`` command: model zoo, pre-training and probes.

Each sub-command lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches. ``dispatch`` is shared with ``qbheat-export``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from qbheat.errors import QBHeatError
from qbheat_contract.errors import INTERRUPTED, USER_ERROR

COMMANDS = {
    "models": ("qbheat.commands.models", "print the model zoo: params, MACs at 224, published top-1"),
    "pretrain": ("qbheat.commands.pretrain", "self-supervised pre-training (QB-Heat, MoCo-v2, ...)"),
    "probe": ("qbheat.commands.probe", "frozen-backbone kNN / linear / non-linear probes"),
    "detect": ("qbheat.commands.detect", "train or evaluate the light detector on frozen features"),
}


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_path, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the chosen command's module (or all of them for a bare --help listing).
        if chosen == name:
            modules[name] = importlib.import_module(module_path)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except QBHeatError as e:
        if args.debug:
            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    return dispatch("qbheat", "Pre-train and probe lightweight vision backbones.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
