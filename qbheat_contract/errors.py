"""The one exception type for errors a user can cause, and the exit codes of every command.

Raise ``QBHeatError`` with one sentence that says what happened and what to do. The CLIs
(``qbheat``, ``qbheat-export``, a bundle's ``run_bundle.py``) print it without a traceback and exit
with ``USER_ERROR``. Programming errors stay ordinary exceptions.
"""
from __future__ import annotations

OK = 0
CHECK_FAILED = 1  # a bundle's golden-output check failed, or ``report --fail-on-regression`` found one
USER_ERROR = 2  # QBHeatError: bad input, files or environment
PARITY_FAILED = 3  # an exported artifact is outside its parity tolerance; nothing was written
ACCURACY_FAILED = 4  # an artifact loses more accuracy than --max-drop allows
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class QBHeatError(Exception):
    """A problem with the user's input, files or environment, explained in one sentence."""

    exit_code = USER_ERROR
