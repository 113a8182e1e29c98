"""Peak resident memory of this process over a phase (loading a model, its steady-state runs).

Linux and Android: the kernel's high-water mark ``VmHWM`` in ``/proc/self/status``, reset at the
start of the phase by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0, see proc(5)), so
the peak is the phase's own and includes short-lived allocations a sampler would miss. Elsewhere
(macOS) only the process-lifetime peak exists (``getrusage`` ``ru_maxrss``, bytes on macOS): it is
reported with ``method: "lifetime"``, an upper bound for the phase. Standard library only (it runs
in device bundles too).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


class PeakRss:
    """``with PeakRss() as m: ...`` → ``m.result()``: {start_mb, peak_mb, method} for the block."""

    def __enter__(self) -> "PeakRss":
        self.method = "VmHWM" if _reset_peak() and _status_kb("VmHWM") is not None else "lifetime"
        self.start = rss_bytes()
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method == "VmHWM":
            self.peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            import resource

            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = maxrss if sys.platform == "darwin" else maxrss * 1024

    def result(self) -> dict[str, Any]:
        mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        return {"start_mb": mb(self.start), "peak_mb": mb(self.peak), "method": self.method}
