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
    _probe(gate, clock, 1_000, 1_000, cache_s=2e-6, bypass_s=5e-6)   # same offered load, faster answers
    assert gate.state is GateState.OPEN
    gate = PayoffGate(clock=clock)
    _probe(gate, clock, 1_000, 1_000, cache_s=5e-6, bypass_s=5e-6)
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
