"""The benchmark protocol, written once and used by every runner, on the host and in bundles.

For one loaded model the protocol measures, and reports separately:

* **load** — creating the session / compiling the model (one sample, wall time);
* **first inference** — the first ``run`` after load (one sample: lazy allocation, kernel selection);
* **steady state** — after a warmup of at least ``warmup_runs`` runs *and* ``warmup_seconds``, a
  timed phase of at least ``min_runs`` runs *and* ``min_seconds`` (capped at ``max_runs``); every
  sample is kept;
* **memory** — the process's peak resident memory while loading and over the steady-state phase
  (``deploy_targets.memory``: the kernel's high-water mark, reset at the start of each);
* **end to end** — the same warmup and timed phase around preprocessing + inference +
  postprocessing (e.g. JPEG decode, resize, normalise; softmax and top-k), when the caller gives one.

Statistics per timed phase: n, mean, std (sample, ddof=1), CV = std/mean, p50/p90/p99 (linear
interpolation between order statistics, numpy's default), min, max, MAD (median absolute deviation)
and a 10 % trimmed mean; a warning when CV exceeds ``cv_warn`` (2.5 %, trtexec's threshold).

Comparing configurations in one run (the benchmarks' ratios): ``timed_interleaved`` times them in
turns, each turn with untimed runs first and a pause after, and ``round_ratios`` /
``target_verdict`` judge a ratio target round by round, not only on the pooled samples.

The clock is injectable (``clock=`` returns seconds), so the statistics are tested on synthetic
timings with exact answers. Defaults below are ours, chosen for 2-core CI machines; trtexec's are a
200 ms warmup and a 3 s / 10-run minimum, timm's 10 warmup and 40 timed runs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np

from qbheat_contract.errors import QBHeatError
from .memory import PeakRss


@dataclass(frozen=True)
class ProtocolConfig:
    warmup_runs: int = 10          # count-based warmup (timm, Ultralytics: 10)
    warmup_seconds: float = 0.5    # time-based warmup (trtexec: 0.2 s); both must be met
    min_runs: int = 50             # timed phase: at least this many runs ...
    min_seconds: float = 2.0       # ... and at least this long (trtexec: 3 s)
    max_runs: int = 100_000        # hard cap so a very fast model cannot loop for long
    cv_warn: float = 0.025         # warn above 2.5 % coefficient of variation (trtexec)
    trim: float = 0.10             # fraction cut from each end for the trimmed mean

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProtocolConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QBHeatError(f"unknown protocol settings {unknown}; known ones are {sorted(names)}.")
        cfg = cls(**data)
        if cfg.min_runs < 1 or cfg.warmup_runs < 0 or cfg.min_seconds < 0 or cfg.warmup_seconds < 0 or cfg.max_runs < cfg.min_runs:
            raise QBHeatError("protocol settings need min_runs ≥ 1, max_runs ≥ min_runs and non-negative warmup and durations.")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Clock = Callable[[], float]


def summarize(samples_ms: list[float] | np.ndarray, cv_warn: float = 0.025, trim: float = 0.10) -> dict[str, Any]:
    """Statistics of one timed phase (milliseconds in, milliseconds out)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    median = float(np.median(x))
    k = int(np.floor(trim * x.size))
    trimmed = np.sort(x)[k:x.size - k] if x.size - 2 * k > 0 else x
    cv = std / mean if mean > 0 else 0.0
    return {
        "n": int(x.size), "mean": mean, "std": std, "cv": cv,
        "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
        "min": float(x.min()), "max": float(x.max()),
        "mad": float(np.median(np.abs(x - median))), "trimmed_mean": float(trimmed.mean()),
        "cv_warning": cv > cv_warn,
    }


def warmup(fn: Callable[[], Any], cfg: ProtocolConfig, clock: Clock = time.perf_counter) -> int:
    """Call ``fn`` until both the count and the time minimum are met; return the number of calls."""
    start, n = clock(), 0
    while n < cfg.warmup_runs or clock() - start < cfg.warmup_seconds:
        fn()
        n += 1
        if n >= cfg.max_runs:
            break
    return n


def timed_runs(fn: Callable[[], Any], cfg: ProtocolConfig, clock: Clock = time.perf_counter,
               progress: Callable[[int], None] | None = None) -> list[float]:
    """At least ``min_runs`` calls and ``min_seconds``; one sample (ms) per call, all kept."""
    samples: list[float] = []
    start = clock()
    while len(samples) < cfg.min_runs or clock() - start < cfg.min_seconds:
        t0 = clock()
        fn()
        samples.append((clock() - t0) * 1e3)
        if progress is not None:
            progress(len(samples))
        if len(samples) >= cfg.max_runs:
            break
    return samples


def timed_interleaved(fns: dict[Hashable, Callable[[], Any]], cfg: ProtocolConfig, block: int = 10, turn_warmup: int = 2,
                      settle_seconds: float = 0.0, clock: Clock = time.perf_counter,
                      sleep: Callable[[float], None] = time.sleep) -> dict[Hashable, list[float]]:
    """Several configurations timed in turns until each has at least ``min_runs`` samples and
    ``min_seconds`` of timed runs (``max_runs`` caps each); samples in ms, in the caller's key order.

    A turn is ``turn_warmup`` untimed runs, then ``block`` timed runs, then a pause of
    ``settle_seconds``. One long block per configuration (``timed_runs`` one after another) lets a
    load burst on a shared machine land on one configuration only; turns spread bursts and drift over
    all of them alike, so ratios between configurations hold up better. The untimed runs and the
    pause keep what a switch costs out of the steady state: measured here, an ONNX Runtime session
    run right after another one took 3× its steady time while the other's spinning threads still
    held the cores (they spin for more than 20 ms after a run), and 1.7× after a 100 ms pause
    (cold caches).
    """
    if block < 1 or turn_warmup < 0:
        raise QBHeatError("a turn needs at least 1 timed run and no negative warmup.")
    samples: dict[Hashable, list[float]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0.0)

    def done(k: Hashable) -> bool:
        return len(samples[k]) >= cfg.max_runs or (len(samples[k]) >= cfg.min_runs and spent[k] >= cfg.min_seconds)

    while not all(done(k) for k in fns):
        for k, fn in fns.items():
            if done(k):
                continue
            for _ in range(turn_warmup):
                fn()
            for _ in range(min(block, cfg.max_runs - len(samples[k]))):
                t0 = clock()
                fn()
                dt = clock() - t0
                samples[k].append(dt * 1e3)
                spent[k] += dt
            if settle_seconds > 0:
                sleep(settle_seconds)
    return samples


def round_ratios(numerator: list[list[float]], denominator: list[list[float]]) -> list[float]:
    """Per round, p50 of ``numerator``'s samples ÷ p50 of ``denominator``'s (one list of samples per round)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("need the same, non-zero number of rounds on both sides")
    return [float(np.median(a) / np.median(b)) for a, b in zip(numerator, denominator)]


def target_verdict(per_round: list[float], target: float, at_most: bool) -> dict[str, Any]:
    """Whether a ratio target holds round by round: 'met' when every round meets it, 'not met' when
    fewer than half do, 'mixed' otherwise (the noise straddles the target). A pooled value that
    meets a target in a noisy run is not enough to call it met."""
    ok = [(v <= target) if at_most else (v >= target) for v in per_round]
    k, n = sum(ok), len(ok)
    verdict = "met" if k == n else ("not met" if 2 * k < n else "mixed")
    return {"rounds_met": k, "rounds": n, "min": min(per_round), "median": float(np.median(per_round)),
            "max": max(per_round), "verdict": verdict}


def measure_phase(fn: Callable[[], Any], cfg: ProtocolConfig, clock: Clock = time.perf_counter,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Warmup then timed runs of ``fn``: the statistics plus the raw samples and the warmup count."""
    n_warm = warmup(fn, cfg, clock)
    samples = timed_runs(fn, cfg, clock, progress)
    stats = summarize(samples, cfg.cv_warn, cfg.trim)
    stats["warmup_runs"] = n_warm
    stats["samples_ms"] = [round(s, 6) for s in samples]
    return stats


def measure(load: Callable[[], Any], run: Callable[[], Any], cfg: ProtocolConfig,
            end_to_end: Callable[[], Any] | None = None, clock: Clock = time.perf_counter,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole protocol for one configuration: load, first inference, steady state, end to end.

    ``load`` is called once (and timed); ``run`` and ``end_to_end`` close over the loaded model.
    """
    with PeakRss() as load_mem:
        t0 = clock()
        load()
        load_ms = (clock() - t0) * 1e3
    t0 = clock()
    run()
    first_ms = (clock() - t0) * 1e3
    with PeakRss() as steady_mem:
        steady = measure_phase(run, cfg, clock, progress)
    e2e = measure_phase(end_to_end, cfg, clock, progress) if end_to_end is not None else None
    warnings = []
    for name, phase in (("steady state", steady), ("end to end", e2e)):
        if phase is not None and phase["cv_warning"]:
            warnings.append(f"{name}: CV {phase['cv'] * 100:.1f} % > {cfg.cv_warn * 100:.1f} %; the machine was not quiet "
                            "(other load, frequency scaling, thermal throttling): treat differences below ~2 CV as noise.")
    memory = {"load": load_mem.result(), "steady": steady_mem.result()}
    return {"load_ms": load_ms, "first_inference_ms": first_ms, "steady": steady, "end_to_end": e2e, "warnings": warnings,
            "memory": memory}


def sweep(threads: list[int] | tuple[int, ...], batches: list[int] | tuple[int, ...],
          variants: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The configurations of a thread × batch (× runtime-option variant) sweep, in run order."""
    variants = variants or [{}]
    return [{"threads": t, "batch": b, "options": v} for v in variants for t in threads for b in batches]


def expand_options(options: dict[str, Any], sweepable: tuple[str, ...] = ("compute_units",)) -> list[dict[str, Any]]:
    """Turn list-valued sweepable options (e.g. Core ML compute units) into one dict per value."""
    out = [dict(options)]
    for key in sweepable:
        if isinstance(options.get(key), list):
            out = [{**o, key: v} for o in out for v in options[key]]
    return out
