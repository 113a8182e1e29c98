"""The protocol's statistics and stopping rules on synthetic timings from a fake clock."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from qbheat_contract.errors import QBHeatError
from deploy_targets.protocol import (ProtocolConfig, expand_options, measure, measure_phase, round_ratios, summarize, sweep,
                                     target_verdict, timed_interleaved, timed_runs, warmup)


class FakeClock:
    """Time advances only when the measured function runs, by the next duration (seconds)."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = itertools.cycle(durations) if isinstance(durations, list) else durations
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


def test_summarize_exact_values():
    s = summarize([10.0, 20.0, 30.0, 40.0, 50.0])
    assert s["n"] == 5 and s["mean"] == 30.0 and s["p50"] == 30.0
    assert s["p90"] == pytest.approx(46.0)          # linear: 40 + 0.6 × 10
    assert s["p99"] == pytest.approx(49.6)
    assert s["std"] == pytest.approx(np.sqrt(250.0))  # sample std, ddof = 1
    assert s["cv"] == pytest.approx(np.sqrt(250.0) / 30.0)
    assert s["mad"] == 10.0 and s["min"] == 10.0 and s["max"] == 50.0
    assert s["cv_warning"] is True


def test_cv_warning_threshold_is_two_and_a_half_percent():
    quiet = summarize([1.0, 1.02] * 10)    # CV ≈ 1.0 %
    noisy = summarize([1.0, 1.06] * 10)    # CV ≈ 2.9 %
    assert not quiet["cv_warning"] and noisy["cv_warning"]
    assert quiet["cv"] == pytest.approx(0.01 / 1.01 * np.sqrt(20 / 19), rel=1e-9)


def test_trimmed_mean_drops_outliers():
    s = summarize([1.0] * 18 + [100.0, 100.0], trim=0.10)
    assert s["trimmed_mean"] == 1.0 and s["mean"] == pytest.approx(10.9)


def test_warmup_needs_both_count_and_time():
    clock = FakeClock([0.25])
    assert warmup(clock.work, ProtocolConfig(warmup_runs=2, warmup_seconds=1.0), clock) == 4   # time rules
    clock = FakeClock([0.25])
    assert warmup(clock.work, ProtocolConfig(warmup_runs=7, warmup_seconds=1.0), clock) == 7   # count rules


def test_timed_phase_needs_both_runs_and_seconds_and_keeps_raw_samples():
    clock = FakeClock([0.25])
    samples = timed_runs(clock.work, ProtocolConfig(min_runs=3, min_seconds=2.0), clock)
    assert samples == [250.0] * 8
    clock = FakeClock([0.25])
    assert len(timed_runs(clock.work, ProtocolConfig(min_runs=12, min_seconds=2.0), clock)) == 12
    clock = FakeClock([0.25])
    assert len(timed_runs(clock.work, ProtocolConfig(min_runs=1, min_seconds=1e9, max_runs=6), clock)) == 6


def test_measure_reports_load_first_steady_and_end_to_end_separately():
    # load 2 s, first inference 0.5 s, then steady runs of 10/20/30/40/50 ms; e2e runs 0.125 s each
    steady = itertools.cycle([0.010, 0.020, 0.030, 0.040, 0.050])
    clock = FakeClock(iter([]))
    def load(): clock.now += 2.0
    first = {"done": False}
    def run():
        if not first["done"]:
            first["done"] = True
            clock.now += 0.5
        else:
            clock.now += next(steady)
    def e2e(): clock.now += 0.125
    cfg = ProtocolConfig(warmup_runs=5, warmup_seconds=0.0, min_runs=5, min_seconds=0.0)
    r = measure(load, run, cfg, e2e, clock)
    assert r["load_ms"] == pytest.approx(2000.0) and r["first_inference_ms"] == pytest.approx(500.0)
    assert r["steady"]["warmup_runs"] == 5 and r["steady"]["n"] == 5
    assert sorted(r["steady"]["samples_ms"]) == pytest.approx([10, 20, 30, 40, 50])
    assert r["steady"]["p50"] == pytest.approx(30.0) and r["steady"]["p90"] == pytest.approx(46.0)
    assert r["end_to_end"]["p50"] == pytest.approx(125.0) and r["end_to_end"]["cv"] == 0.0
    assert len(r["warnings"]) == 1 and r["warnings"][0].startswith("steady state: CV 52.7 %")


def test_measure_phase_without_noise_has_no_warning():
    clock = FakeClock([2.0 ** -8])
    r = measure_phase(clock.work, ProtocolConfig(warmup_runs=1, warmup_seconds=0, min_runs=20, min_seconds=0), clock)
    assert r["cv"] == 0.0 and not r["cv_warning"] and r["p99"] == 1000 * 2.0 ** -8


def test_sweeps_and_option_expansion():
    configs = sweep([1, 2], [1, 8])
    assert [(c["threads"], c["batch"]) for c in configs] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    variants = expand_options({"compute_units": ["cpu_only", "cpu_and_ne"], "x": 1})
    assert variants == [{"compute_units": "cpu_only", "x": 1}, {"compute_units": "cpu_and_ne", "x": 1}]
    assert len(sweep([1], [1, 2], variants)) == 4


def test_protocol_config_validation():
    with pytest.raises(QBHeatError, match="unknown protocol settings"):
        ProtocolConfig.from_dict({"min_run": 3})
    with pytest.raises(QBHeatError, match="min_runs"):
        ProtocolConfig.from_dict({"min_runs": 0})


def test_interleaved_takes_turns_with_untimed_runs_and_a_pause_after_each():
    clock, order, pauses = FakeClock([0.01]), [], []

    def fn(name):
        return lambda: (order.append(name), clock.work())

    out = timed_interleaved({"a": fn("a"), "b": fn("b")}, ProtocolConfig(min_runs=4, min_seconds=0.0), block=2,
                            turn_warmup=1, settle_seconds=0.05, clock=clock, sleep=pauses.append)
    assert list(out) == ["a", "b"] and all(s == pytest.approx([10.0] * 4) for s in out.values())
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # 1 untimed + 2 timed per turn
    assert pauses == [0.05] * 4


def test_interleaved_stops_each_configuration_on_its_own_time_minimum():
    clock = FakeClock([0.1])

    def slow():  # 0.3 s per run
        clock.now += 0.3

    out = timed_interleaved({"fast": clock.work, "slow": slow}, ProtocolConfig(min_runs=1, min_seconds=0.9),
                            block=1, turn_warmup=0, clock=clock)
    assert len(out["fast"]) == 9 and len(out["slow"]) == 3
    with pytest.raises(QBHeatError):
        timed_interleaved({"a": clock.work}, ProtocolConfig(), block=0, clock=clock)


def test_round_ratios_and_target_verdicts():
    assert round_ratios([[2.0, 4.0, 3.0], [5.0]], [[1.0], [2.0, 2.0]]) == [3.0, 2.5]
    assert target_verdict([2.1, 2.15, 2.0], 2.2, at_most=True)["verdict"] == "met"
    mixed = target_verdict([2.1, 2.3, 2.0, 2.4], 2.2, at_most=True)
    assert (mixed["verdict"], mixed["rounds_met"], mixed["rounds"], mixed["max"]) == ("mixed", 2, 4, 2.4)
    assert target_verdict([3.9, 4.2, 3.8], 4.0, at_most=False)["verdict"] == "not met"
    assert target_verdict([4.0, 4.2], 4.0, at_most=False)["verdict"] == "met"
    with pytest.raises(ValueError):
        round_ratios([[1.0]], [])
