"""Transport helpers build argv lists with validated hosts, serials and paths."""
from __future__ import annotations

import shlex
import subprocess

import pytest

from qbheat_contract.errors import QBHeatError
from deploy_targets.transport import (adb_push_argv, adb_shell_argv, execute, parse_reach, remote_run_plan, scp_to_argv,
                                      ssh_argv)


def test_ssh_quotes_the_remote_command_and_ends_options():
    r = parse_reach("ssh://pi@raspberrypi.local:2200")
    argv = ssh_argv(r, ["python3", "run bundle.py", "--out", "a;rm -rf ~"])
    assert argv[:5] == ["ssh", "-p", "2200", "--", "pi@raspberrypi.local"]
    assert shlex.split(argv[5]) == ["python3", "run bundle.py", "--out", "a;rm -rf ~"]  # one quoted string, parsed back intact
    assert scp_to_argv(r, "/tmp/b", "qbheat_bundle") == ["scp", "-r", "-q", "-P", "2200", "--", "/tmp/b", "pi@raspberrypi.local:qbheat_bundle"]


def test_adb_argv():
    r = parse_reach("adb:R58M123ABC")
    assert adb_push_argv(r, "/tmp/b", "/data/local/tmp/q") == ["adb", "-s", "R58M123ABC", "push", "/tmp/b", "/data/local/tmp/q"]
    assert adb_shell_argv(r, ["ls", "a b"]) == ["adb", "-s", "R58M123ABC", "shell", "ls 'a b'"]
    plan = remote_run_plan(r, "/tmp/b", "/tmp/r.json")
    assert [a[3] for a in plan] == ["shell", "push", "shell", "pull"]
    assert plan[2][4] == "python3 /data/local/tmp/qbheat_bundle/run_bundle.py --out /data/local/tmp/qbheat_bundle/result.json"


@pytest.mark.parametrize("reach", ["ssh://-oProxyCommand=evil", "ssh://host;rm", "ssh://a b", "adb:-s", "adb:a;b", "ssh://h:99999", "ftp://h"])
def test_injection_attempts_are_refused(reach):
    with pytest.raises(QBHeatError):
        parse_reach(reach)


def test_remote_paths_are_validated():
    r = parse_reach("ssh://box")
    for bad in ("-r", "a;b", "../etc", "a b"):
        with pytest.raises(QBHeatError):
            scp_to_argv(r, "/tmp/x", bad)


def test_execute_runs_argv_lists_without_a_shell_and_stops_at_failure():
    seen = []

    def fake_run(argv, check):
        assert isinstance(argv, list) and check is False
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0 if len(seen) == 1 else 3)

    with pytest.raises(QBHeatError, match="failed with exit status 3"):
        execute([["true"], ["scp", "x"], ["never"]], run=fake_run)
    assert seen == [["true"], ["scp", "x"]]
