"""Getting a bundle to a device and its result back: argv lists for ssh/scp and adb, never shell strings.

Hosts, users, ports, adb serials and remote paths are validated against conservative patterns
before they reach an argv (a leading ``-`` could otherwise become an option). The command run on
the device is the only string that a remote shell parses (ssh and ``adb shell`` both hand their
command to ``sh -c`` on the other side), so it is built with ``shlex.join`` from an argv list.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qbheat_contract.errors import QBHeatError

_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REMOTE_PATH = re.compile(r"^[A-Za-z0-9._/~+-]+$")


@dataclass(frozen=True)
class Reach:
    kind: str                 # local | macos | ssh | adb
    host: str | None = None
    user: str | None = None
    port: int | None = None
    serial: str | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else str(self.host)


def parse_reach(reach: str) -> Reach:
    """``local`` | ``macos`` | ``ssh://[user@]host[:port]`` | ``adb:<serial>``, validated."""
    if reach in ("local", "macos"):
        return Reach(reach)
    if reach.startswith("ssh://"):
        rest = reach[len("ssh://"):]
        user, _, hostport = rest.rpartition("@")
        host, _, port = hostport.partition(":")
        if not _HOST.match(host) or (user and not _USER.match(user)) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise QBHeatError(f"reach {reach!r} is not a valid ssh://[user@]host[:port]; use letters, digits, '.', '-' in the host name.")
        return Reach("ssh", host=host, user=user or None, port=int(port) if port else None)
    if reach.startswith("adb:"):
        serial = reach[len("adb:"):]
        if not _SERIAL.match(serial):
            raise QBHeatError(f"adb serial {serial!r} is not valid; 'adb devices' lists the serials.")
        return Reach("adb", serial=serial)
    raise QBHeatError(f"reach {reach!r} must be 'local', 'macos', 'ssh://[user@]host[:port]' or 'adb:<serial>'.")


def _remote_path(path: str) -> str:
    if not _REMOTE_PATH.match(path) or path.startswith("-") or ".." in path.split("/"):
        raise QBHeatError(f"remote path {path!r} may only use letters, digits and ._/~+- (no '..').")
    return path


def _ssh_opts(reach: Reach, flag: str) -> list[str]:
    return [flag, str(reach.port)] if reach.port else []


def ssh_argv(reach: Reach, remote_argv: list[str]) -> list[str]:
    """``ssh [-p port] -- dest 'quoted command'``."""
    return ["ssh", *_ssh_opts(reach, "-p"), "--", reach.destination, shlex.join(remote_argv)]


def scp_to_argv(reach: Reach, local: str | Path, remote: str) -> list[str]:
    return ["scp", "-r", "-q", *_ssh_opts(reach, "-P"), "--", str(local), f"{reach.destination}:{_remote_path(remote)}"]


def scp_from_argv(reach: Reach, remote: str, local: str | Path) -> list[str]:
    return ["scp", "-q", *_ssh_opts(reach, "-P"), "--", f"{reach.destination}:{_remote_path(remote)}", str(local)]


def adb_push_argv(reach: Reach, local: str | Path, remote: str) -> list[str]:
    return ["adb", "-s", reach.serial, "push", str(local), _remote_path(remote)]


def adb_pull_argv(reach: Reach, remote: str, local: str | Path) -> list[str]:
    return ["adb", "-s", reach.serial, "pull", _remote_path(remote), str(local)]


def adb_shell_argv(reach: Reach, remote_argv: list[str]) -> list[str]:
    return ["adb", "-s", reach.serial, "shell", shlex.join(remote_argv)]


def remote_run_plan(reach: Reach, bundle_dir: str | Path, result: str | Path, remote_dir: str = "qbheat_bundle",
                    python: str = "python3", extra_args: list[str] | None = None) -> list[list[str]]:
    """The argv lists that copy the bundle over, run it, and fetch its JSON result."""
    bundle_dir = Path(bundle_dir)
    remote_dir = _remote_path(remote_dir)
    run = [python, f"{remote_dir}/run_bundle.py", "--out", f"{remote_dir}/result.json", *(extra_args or [])]
    if reach.kind == "ssh":
        return [ssh_argv(reach, ["rm", "-rf", remote_dir]), scp_to_argv(reach, bundle_dir, remote_dir),
                ssh_argv(reach, run), scp_from_argv(reach, f"{remote_dir}/result.json", result)]
    if reach.kind == "adb":
        remote_dir = remote_dir if remote_dir.startswith("/") else f"/data/local/tmp/{remote_dir}"
        run = [python, f"{remote_dir}/run_bundle.py", "--out", f"{remote_dir}/result.json", *(extra_args or [])]
        return [adb_shell_argv(reach, ["rm", "-rf", remote_dir]), adb_push_argv(reach, bundle_dir, remote_dir),
                adb_shell_argv(reach, run), adb_pull_argv(reach, f"{remote_dir}/result.json", result)]
    # local / macos: run in place
    return [[python, str(bundle_dir / "run_bundle.py"), "--out", str(result), *(extra_args or [])]]


def execute(plan: list[list[str]], run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Run each argv in turn (no shell); stop with a one-line error at the first failure."""
    for argv in plan:
        try:
            done = run(argv, check=False)
        except FileNotFoundError:
            raise QBHeatError(f"{argv[0]!r} is not installed on this machine; install it or run the printed commands by hand.") from None
        if done.returncode != 0:
            raise QBHeatError(f"'{shlex.join(argv)}' failed with exit status {done.returncode}.")
