"""The host fingerprint names the cores a process may use and the CPU's INT8/vector instruction sets."""
from __future__ import annotations

import os

import pytest

from deploy_targets import fingerprint

CPUINFO = """processor\t: 0
model name\t: Some Xeon
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 hypervisor
"""


def test_cpu_features_keeps_the_known_flags_in_order(monkeypatch):
    monkeypatch.setattr(fingerprint, "_read", lambda path: CPUINFO if path == "/proc/cpuinfo" else None)
    assert fingerprint.cpu_features() == ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
    monkeypatch.setattr(fingerprint, "_read", lambda path: None)  # macOS, or no /proc
    assert fingerprint.cpu_features() == []


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_usable_cores_follows_the_affinity_mask():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        host = fingerprint.host()
        assert host["usable_cores"] == 1 and host["cores"] == os.cpu_count()
    finally:
        os.sched_setaffinity(0, before)
    assert fingerprint.usable_cores() == len(before)
