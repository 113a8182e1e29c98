"""Build some artifacts in a forked worker process while the parent builds the others.

Converting to Core ML is single-threaded Python (coremltools' MIL passes) and does not depend on
the ONNX or OpenVINO artifacts, so on a machine with two or more cores it can overlap with them.
The worker is a ``fork`` of the exporting process, so it inherits the loaded model, the
ExportedProgram and the calibration data with nothing pickled on the way in. Only the build's
results (the artifact records, plain dicts) come back through a pipe. Verification stays in the parent.

Fork is used only on Linux, before the parent opens any ONNX Runtime or OpenVINO session; the child
uses only PyTorch and coremltools, and limits PyTorch to one thread (the parent's OpenMP pool is
not forked with its threads). macOS (where Core ML prediction runs) and ``--serial`` build
everything in order, in one process.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from qbheat.errors import QBHeatError


def can_fork() -> bool:
    """True where a forked worker is safe and can help: Linux with at least two usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sys.platform.startswith("linux") and cores >= 2


class ForkedBuilds:
    """``build(job)`` for each job, in order, in one forked child process.

    ``results()`` waits for the child and returns ``[(job, value, seconds), ...]``; an exception in
    the child is raised again in the parent (a ``QBHeatError`` with its sentence, anything else as a
    ``RuntimeError`` carrying the child's traceback). ``close()`` ends the child if it still runs
    (used when the parent fails first).
    """

    def __init__(self, build: Callable[[Any], Any], jobs: list[Any]):
        mp = multiprocessing.get_context("fork")
        self._recv, send = mp.Pipe(duplex=False)
        # The child's temporary files (coremltools' in-memory packages) go to a folder of its own, which
        # the parent deletes however the child ends (a killed child cleans up nothing itself).
        self._scratch = tempfile.mkdtemp(prefix="qbheat_worker_")
        self._proc = mp.Process(target=_child, args=(build, jobs, send, self._scratch), name="qbheat-export-worker",
                                daemon=True)
        self._proc.start()
        send.close()  # the parent keeps only the reading end, so a dead child gives EOF instead of a hang

    def results(self) -> list[tuple[Any, Any, float]]:
        try:
            message = self._recv.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the export worker process died without a result (exit code {self._proc.exitcode}).") from None
        finally:
            self._recv.close()
        self._proc.join()
        shutil.rmtree(self._scratch, ignore_errors=True)
        if message[0] == "error":
            _, kind, text, trace = message
            if kind == "QBHeatError":
                raise QBHeatError(text)
            raise RuntimeError(f"{text}\n--- in the export worker process ---\n{trace}")
        return message[1]

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
        self._recv.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


WORKER_NAME = b"qbheat-worker"  # the kernel's process name (comm) of the worker, for tools that watch it


def _name_process(name: bytes) -> None:
    """Set this process's kernel name (``/proc/PID/comm``, ``ps``, ``top``); best effort, Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _child(build: Callable[[Any], Any], jobs: list[Any], send, scratch: str) -> None:
    import torch

    _name_process(WORKER_NAME)
    tempfile.tempdir = scratch
    # The builders' own terminal output (coremltools' progress bars) would interleave with the parent's
    # step lines; it is discarded. Results and errors, tracebacks included, come back through the pipe.
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # native code writing to the file descriptors
    os.dup2(quiet, 2)
    os.close(quiet)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # Python code (also where sys.stderr is not fd 2)
    torch.set_num_threads(1)  # the parent's OpenMP pool was not forked with its threads
    try:
        results = []
        for job in jobs:
            t0 = time.perf_counter()
            value = build(job)
            results.append((job, value, time.perf_counter() - t0))
        send.send(("ok", results))
    except BaseException as e:  # noqa: BLE001  (everything goes back to the parent, which decides)
        kind = "QBHeatError" if isinstance(e, QBHeatError) else type(e).__name__
        send.send(("error", kind, f"{type(e).__name__}: {e}" if kind != "QBHeatError" else str(e), traceback.format_exc()))
    finally:
        send.close()
