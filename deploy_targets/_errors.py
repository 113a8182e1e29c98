"""The error type of deploy_targets, usable both on the host and inside a device bundle.

On the host this is ``qbheat.errors.QBHeatError`` (the CLIs print it as one line and exit 2).
Inside a bundle (see ``deploy_targets.bundle``) qbheat is not installed, and the same modules are
copied next to the runner script: there the fallback class below stands in, with the same meaning.
"""
from __future__ import annotations

try:
    from qbheat.errors import QBHeatError
except ImportError:  # inside a device bundle: no qbheat, no torch

    class QBHeatError(Exception):  # type: ignore[no-redef]
        """A problem with the user's input, files or environment, explained in one sentence."""


__all__ = ["QBHeatError"]
