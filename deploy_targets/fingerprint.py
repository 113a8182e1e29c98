"""The environment fingerprint attached to every result row.

CPU model (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), logical cores and the cores this process
may run on, the CPU's vector and INT8 instruction sets (they decide what INT8 gains), OS and kernel, the
runtime and its version, device, precision, threads, the artifact's SHA-256
(``qbheat_contract.hashing``), and — where the OS
exposes them — the CPU frequency governor and a thermal-zone temperature. Standard library only.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


# x86 feature flags that change what a quantised or vectorised graph gains: AVX2 only (no VNNI) makes
# INT8 convolutions about 2 × faster at best; VNNI and AMX do dot products of INT8 in one instruction.
CPU_FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` the CPU reports (``/proc/cpuinfo`` flags; empty where it has none)."""
    flags: set[str] = set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in CPU_FEATURES if f in flags]


def usable_cores() -> int | None:
    """Cores this process may run on (``taskset`` and cgroup CPU sets narrow it below ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def cores_text(f: dict[str, Any]) -> str:
    """'16 cores', or '2 of 16 cores' when the process was pinned, then the instruction sets if known."""
    cores, usable = f.get("cores"), f.get("usable_cores")
    text = f"{usable} of {cores} cores" if usable and usable != cores else f"{cores} cores"
    return text + (f", {' '.join(f['cpu_features'])}" if f.get("cpu_features") else "")


def interpreter() -> str:
    """The Python running this, as a recorded command should name it: relative to the working
    directory when inside it (``.venv/bin/python``), else its file name (``python3``)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return exe.name


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host() -> dict[str, Any]:
    """What does not change between rows of one run."""
    temp = _read("/sys/class/thermal/thermal_zone0/temp")
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_features": cpu_features(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "temperature_c": round(int(temp) / 1000, 1) if temp and temp.lstrip("-").isdigit() else None,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # > cores: timings are contended
    }


def fingerprint(runner_description: dict[str, Any], artifact_sha256: str | None, host_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row's fingerprint: the host facts plus the runner's own description and the artifact hash."""
    fp = dict(host_info or host())
    fp.update({
        "runtime": runner_description.get("runtime"),
        "runtime_version": runner_description.get("runtime_version"),
        "device": runner_description.get("device"),
        "device_name": runner_description.get("device_name"),
        "precision": runner_description.get("precision"),
        "threads": runner_description.get("threads"),
        "artifact_sha256": artifact_sha256,
    })
    extra = {k: v for k, v in runner_description.items() if k not in fp and k != "options"}
    if extra:
        fp["runtime_details"] = extra
    return fp
