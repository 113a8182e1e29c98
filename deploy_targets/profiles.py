"""Device profiles: one small TOML file per device + runtime (the shipped ones live in ``profiles/``).

A profile says what to run and how to reach the device::

    name       = "local-cpu-ort"                  # unique; what ``--target`` names
    hardware   = "x86-64 CPU (this machine)"      # free text, copied into every result row
    runtime    = "onnxruntime"                    # one of deploy_targets.runners.RUNTIMES
    precision  = "fp32"                           # fp32 | fp16 | int8 | any: which artifacts to run
    threads    = [2]                              # intra-op threads; a list is a sweep (0 = runtime default)
    input_size = [224, 224]                       # H, W fed to artifacts without a model card (a card's size wins)
    batch      = [1]                              # a list is a sweep
    reach      = "local"                          # local | ssh://[user@]host[:port] | adb:<serial> | macos
    notes      = "..."                            # free text
    [options]                                     # runtime-specific, passed to the runner (optional)
    [protocol]                                    # overrides of deploy_targets.protocol.ProtocolConfig (optional)

Users add their own by copying one of the shipped files and passing its path to ``--target``.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbheat_contract.errors import QBHeatError

PROFILE_DIR = Path(__file__).with_name("profiles")
RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "coreml", "executorch", "litert")
PRECISIONS = ("fp32", "fp16", "int8", "any")
_REACH = re.compile(r"^(local|macos|ssh://[A-Za-z0-9._-]+(@[A-Za-z0-9._-]+)?(:\d{1,5})?|adb:[A-Za-z0-9._:-]+)$")
_FIELDS = {"name", "hardware", "runtime", "precision", "threads", "input_size", "batch", "reach", "notes",
           "options", "protocol"}


@dataclass(frozen=True)
class Profile:
    name: str
    hardware: str
    runtime: str
    precision: str = "fp32"
    threads: tuple[int, ...] = (0,)
    input_size: tuple[int, int] = (224, 224)
    batch: tuple[int, ...] = (1,)
    reach: str = "local"
    notes: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hardware": self.hardware, "runtime": self.runtime, "precision": self.precision,
                "threads": list(self.threads), "input_size": list(self.input_size), "batch": list(self.batch),
                "reach": self.reach, "notes": self.notes, "options": dict(self.options),
                "protocol": dict(self.protocol)}


def _int_list(value: Any, key: str, where: str, minimum: int) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise QBHeatError(f"profile {where}: {key} must be an integer ≥ {minimum} or a non-empty list of them, not {value!r}.")
    return tuple(values)


def profile_from_dict(data: dict[str, Any], where: str = "<dict>") -> Profile:
    """Validate a parsed profile; every problem is one sentence naming the file and the key."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise QBHeatError(f"profile {where}: unknown keys {unknown}; allowed keys are {sorted(_FIELDS)}.")
    for key in ("name", "hardware", "runtime"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise QBHeatError(f"profile {where}: {key!r} is required and must be a non-empty string.")
    if data["runtime"] not in RUNTIMES:
        raise QBHeatError(f"profile {where}: runtime {data['runtime']!r} is not one of {list(RUNTIMES)}.")
    precision = data.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise QBHeatError(f"profile {where}: precision {precision!r} is not one of {list(PRECISIONS)}.")
    size = data.get("input_size", [224, 224])
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise QBHeatError(f"profile {where}: input_size must be [H, W] with positive integers, not {size!r}.")
    reach = data.get("reach", "local")
    if not isinstance(reach, str) or not _REACH.match(reach):
        raise QBHeatError(f"profile {where}: reach {reach!r} must be 'local', 'macos', 'ssh://[user@]host[:port]' or 'adb:<serial>'.")
    for key in ("options", "protocol"):
        if not isinstance(data.get(key, {}), dict):
            raise QBHeatError(f"profile {where}: [{key}] must be a table.")
    return Profile(
        name=data["name"], hardware=data["hardware"], runtime=data["runtime"], precision=precision,
        threads=_int_list(data.get("threads", 0), "threads", where, 0), input_size=(size[0], size[1]),
        batch=_int_list(data.get("batch", 1), "batch", where, 1), reach=reach, notes=str(data.get("notes", "")),
        options=dict(data.get("options", {})), protocol=dict(data.get("protocol", {})), source=where,
    )


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise QBHeatError(f"no device profile at {path}; pass a shipped profile name or a path to a .toml file.") from None
    except tomllib.TOMLDecodeError as e:
        raise QBHeatError(f"device profile {path} is not valid TOML ({e}).") from None
    return profile_from_dict(data, str(path))


def list_profiles() -> list[Profile]:
    """The shipped profiles, sorted by name."""
    return sorted((load_profile_file(p) for p in PROFILE_DIR.glob("*.toml")), key=lambda p: p.name)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or any profile file by path (``--target path/to/my.toml``)."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or Path(text).is_file():
        return load_profile_file(text)
    profiles = {p.name: p for p in list_profiles()}
    if text not in profiles:
        raise QBHeatError(f"unknown target {text!r}; shipped profiles are {sorted(profiles)}, or pass a path to your own .toml.")
    return profiles[text]
