"""Peak resident memory per phase: the kernel's high-water mark, reset at the start of each phase."""
from __future__ import annotations

import numpy as np
import pytest

from deploy_targets.memory import PeakRss
from deploy_targets.protocol import ProtocolConfig, measure

MB = 2**20


def _linux_peaks() -> bool:
    with PeakRss() as m:
        pass
    return m.method == "VmHWM"


pytestmark = pytest.mark.skipif(not _linux_peaks(), reason="per-phase peaks need /proc/self/clear_refs (Linux)")


def test_peak_sees_a_short_lived_allocation_and_resets_between_phases():
    with PeakRss() as big:
        a = np.ones(200 * MB, np.uint8)  # touched pages: resident
        del a
    with PeakRss() as small:
        b = np.ones(20 * MB, np.uint8)
        del b
    big, small = big.result(), small.result()
    assert big["peak_mb"] - big["start_mb"] >= 190
    assert small["peak_mb"] - small["start_mb"] < 100  # the 200 MB peak was forgotten


def test_measure_reports_the_load_and_steady_state_peaks():
    state = {}

    def load():
        state["weights"] = np.ones(150 * MB, np.uint8)

    def run():
        np.ones(60 * MB, np.uint8).sum()  # a temporary activation buffer

    cfg = ProtocolConfig(warmup_runs=1, warmup_seconds=0.0, min_runs=3, min_seconds=0.0)
    mem = measure(load, run, cfg)["memory"]
    assert mem["load"]["peak_mb"] - mem["load"]["start_mb"] >= 140
    assert mem["steady"]["start_mb"] - mem["load"]["start_mb"] >= 140  # the loaded model stays resident
    assert 50 <= mem["steady"]["peak_mb"] - mem["steady"]["start_mb"] < 140
