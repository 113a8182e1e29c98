"""The environment fingerprint attached to every result row.

CPU model (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), logical cores, OS and kernel, the
runtime and its version, device, precision, threads, the artifact's SHA-256, and — where the OS
exposes them — the CPU frequency governor and a thermal-zone temperature. Standard library only.
"""
from __future__ import annotations

import hashlib
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


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def companion_files(path: str | Path) -> list[Path]:
    """Files that belong to an artifact: an OpenVINO ``.xml``'s ``.bin``; an ONNX file's external
    weights ``<name>.onnx.data`` (torch.onnx's naming)."""
    path = Path(path)
    extra = []
    if path.suffix == ".xml" and path.with_suffix(".bin").exists():
        extra.append(path.with_suffix(".bin"))
    if path.suffix == ".onnx" and path.with_name(path.name + ".data").exists():
        extra.append(path.with_name(path.name + ".data"))
    return extra


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file together with its companion files (see ``companion_files``); of a folder
    (``.mlpackage``) over its relative file names and contents in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, *companion_files(path)]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_bytes(path: str | Path) -> int:
    """Bytes on disk of an artifact with its companion files, or of a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in [path, *companion_files(path)])


def host() -> dict[str, Any]:
    """What does not change between rows of one run."""
    temp = _read("/sys/class/thermal/thermal_zone0/temp")
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
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
