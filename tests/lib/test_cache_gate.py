"""PayoffGate: the adaptive cache bypasses itself where hits save nothing, and keeps serving where they pay."""

from __future__ import annotations

import pytest

from flexemr.cache.gate import GateState, PayoffGate


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _probe(gate: PayoffGate, clock: Clock, cache_rate: float, bypass_rate: float,
           cache_s: float = 1e-6, bypass_s: float = 1e-6, batch: int = 100) -> list[bool]:
    """Drive a probe to its decision: each arm dispatches batches at its own rate (samples/s)."""
    arms = []
    while True:
        use = gate.use_cache(batch)
        if gate.state is not GateState.PROBING:
            return arms
        arms.append(use)
        gate.record(use, cache_s if use else bypass_s)
        clock.t += batch / (cache_rate if use else bypass_rate)


def test_hits_that_save_nothing_close_the_gate_and_batches_bypass_the_cache():
    clock = Clock()
    gate = PayoffGate(window_s=1.0, settle_s=0.25, rounds=2, hold_s=10, clock=clock)
    arms = _probe(gate, clock, cache_rate=30_000, bypass_rate=40_000)   # loopback: the cache only costs
    assert True in arms and False in arms, "both arms are measured"
    assert gate.state is GateState.CLOSED
    assert not any(gate.use_cache(100) for _ in range(1000)), "a closed gate serves nothing from the cache"
    snap = gate.snapshot()
    assert snap["cache_samples_per_s"] < snap["bypass_samples_per_s"]


def test_a_cache_that_raises_throughput_stays_open():
    clock = Clock()
    gate = PayoffGate(clock=clock)
    _probe(gate, clock, cache_rate=4_000, bypass_rate=2_000)          # slow network: hits save wire time
    assert gate.state is GateState.OPEN
    assert all(gate.use_cache(100) for _ in range(100))


def test_at_light_load_equal_throughput_is_decided_by_lookup_time():
    clock = Clock()
    gate = PayoffGate(clock=clock)
    # Same offered load, faster answers; batches of 10 so a window's count is not off by a whole batch.
    _probe(gate, clock, 1_000, 1_000, cache_s=2e-6, bypass_s=5e-6, batch=10)
    assert gate.state is GateState.OPEN
    gate = PayoffGate(clock=clock)
    _probe(gate, clock, 1_000, 1_000, cache_s=5e-6, bypass_s=5e-6, batch=10)
    assert gate.state is GateState.CLOSED, "a tie is no reason to pay for the cache"


def test_the_gate_probes_again_after_its_hold_and_backs_off_while_the_cache_keeps_losing():
    clock = Clock()
    gate = PayoffGate(window_s=1.0, settle_s=0.1, rounds=1, hold_s=10, max_hold_s=25, clock=clock)
    _probe(gate, clock, 1_000, 2_000)
    assert gate.state is GateState.CLOSED
    closed_at = clock.t
    clock.t = closed_at + 9.9
    assert not gate.use_cache(100)
    clock.t = closed_at + 10.0
    gate.use_cache(100)
    assert gate.state is GateState.PROBING, "the hold is over: measure again"
    _probe(gate, clock, 1_000, 2_000)
    closed_at = clock.t
    clock.t = closed_at + 19.9
    assert not gate.use_cache(100), "the second loss holds twice as long"
    clock.t = closed_at + 20.0
    gate.use_cache(100)
    assert gate.state is GateState.PROBING
    _probe(gate, clock, 5_000, 2_000)     # the network got slow: the next probe finds the cache paying
    assert gate.state is GateState.OPEN and gate.losses == 0


def test_bad_windows_are_refused_by_name():
    with pytest.raises(ValueError, match="window_s > settle_s"):
        PayoffGate(window_s=0.1, settle_s=0.2)
    with pytest.raises(ValueError, match="min_warm_s=5"):
        PayoffGate(min_warm_s=5, max_warm_s=1)


def _cold_cache_probe(**gate_args) -> tuple[PayoffGate, list[tuple[float, bool]]]:
    """Behind a slow link: a cache fills only while it serves, its hit rate rising 0.3 per second of use
    to 0.9; the more it hits, the faster it serves (700 samples/s cold, 2,600 warm, bypass 2,000)."""
    clock = Clock()
    gate = PayoffGate(clock=clock, **gate_args)
    served_s, arms = 0.0, []
    while True:
        use = gate.use_cache(100)
        if gate.state is not GateState.PROBING:
            return gate, arms
        arms.append((clock.t, use))
        hit = min(0.9, 0.3 * served_s)
        rate = 700 + 1_900 * hit / 0.9 if use else 2_000
        if use:
            gate.note_hits(int(hit * 2_000), 2_000)
        gate.record(use, 1e-6)
        clock.t += 100 / rate
        served_s += 100 / rate if use else 0.0


def test_a_cold_cache_is_warmed_until_its_hit_rate_stops_rising_before_it_is_judged():
    cold, _ = _cold_cache_probe(min_warm_s=0, max_warm_s=0)
    assert cold.state is GateState.CLOSED, "the model is right: judged cold, the cache loses"
    warm, arms = _cold_cache_probe()
    assert warm.state is GateState.OPEN, warm.last
    first_bypass = min(t for t, use in arms if not use)
    assert 3.0 <= first_bypass <= 7.0, "warmed (~3 s to 0.9 hits, one more window to see the plateau) then probed"
    assert warm.last["cache_samples_per_s"] == pytest.approx(2_600, rel=0.1), "the warm-up is not in the medians"


def test_the_warm_up_ends_at_max_warm_s_whatever_the_hit_rate_does():
    clock = Clock()
    gate = PayoffGate(max_warm_s=5.0, clock=clock)
    k = 0
    while clock.t < 5.0:
        assert gate.use_cache(100) is True, "every batch of the warm-up goes through the cache"
        k += 1
        gate.note_hits(k, 1_000)              # the hit rate keeps rising (0.1 a window)
        clock.t += 0.01
    clock.t = 5.3
    assert gate.use_cache(100) is True and gate._t0 == 5.3, "measuring starts, cache arm first"
    clock.t = 6.3
    assert gate.use_cache(100) is False, "then the bypass window"


def test_idle_windows_do_not_decide_and_a_probe_without_traffic_in_one_arm_starts_over():
    """A ranker that goes quiet mid-probe: the windows it was idle in are no evidence for either arm."""
    clock = Clock()
    gate = PayoffGate(window_s=1.0, settle_s=0.25, rounds=2, hold_s=10, min_warm_s=0, max_warm_s=0, clock=clock)
    # Traffic only in the first two windows (one per arm); the cache arm is the faster one.
    while clock.t < 2.0:
        use = gate.use_cache(100)
        clock.t += 100 / (4_000 if use else 2_000)
    clock.t = 7.5                      # idle through windows 2 and 3, then traffic again
    gate.use_cache(100)
    assert gate.state is GateState.OPEN, "decided on the busy windows alone, not on medians dragged to zero"
    snap = gate.snapshot()
    assert snap["cache_samples_per_s"] == pytest.approx(4_000, rel=0.1), "the idle windows are not in the median"
    assert snap["bypass_samples_per_s"] == pytest.approx(2_000, rel=0.1)

    clock = Clock()
    gate = PayoffGate(window_s=1.0, settle_s=0.25, rounds=2, hold_s=10, min_warm_s=0, max_warm_s=0, clock=clock)
    while clock.t < 1.0:               # traffic in the cache arm's first window only
        gate.use_cache(100)
        clock.t += 0.025
    clock.t = 9.0
    assert gate.use_cache(100) is True, "a new probe starts with the cache arm"
    assert gate.state is GateState.PROBING and gate.last == {}, "nothing was decided on one arm alone"


def test_a_slow_link_payoff_opens_the_gate_and_a_loopback_payoff_closes_it_on_a_synthetic_load():
    """Synthetic payoff: throughput of each arm = min(link limit / bytes per sample, CPU limit / CPU per sample)."""
    def rate(use: bool, link_mbit: float) -> float:
        wire = (1_300 if use else 2_050) * 8 / (link_mbit * 1e6)       # seconds of link per sample
        cpu = (14e-6 if use else 10e-6) / 2                              # two cores
        return 1.0 / max(wire, cpu)

    for link, state in ((200, GateState.OPEN), (400, GateState.OPEN), (100_000, GateState.CLOSED)):
        clock = Clock()
        gate = PayoffGate(clock=clock)
        _probe(gate, clock, rate(True, link), rate(False, link))
        assert gate.state is state, f"{link} Mbit/s"
