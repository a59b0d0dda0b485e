"""PayoffGate: the adaptive cache bypasses itself where hits save nothing, and keeps serving where they pay."""

from __future__ import annotations

import pytest

from flexemr.cache.gate import GateState, PayoffGate


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _probe(gate: PayoffGate, cache_s: float, bypass_s: float) -> list[bool]:
    """Run one probe to its decision; every batch takes the given time per sample on its arm."""
    arms = []
    while gate.state is GateState.PROBING:
        use = gate.use_cache()
        arms.append(use)
        gate.record(use, cache_s if use else bypass_s)
    return arms


def test_hits_that_save_nothing_close_the_gate_and_batches_bypass_the_cache():
    clock = Clock()
    gate = PayoffGate(probe_batches=4, rounds=2, hold_s=10, clock=clock)
    arms = _probe(gate, cache_s=1.0e-6, bypass_s=1.0e-6)     # loopback: the same either way
    assert arms.count(True) == arms.count(False) == 8, "both arms are measured alike"
    assert gate.state is GateState.CLOSED
    assert not any(gate.use_cache() for _ in range(1000)), "a closed gate serves nothing from the cache"


def test_a_cache_that_makes_lookups_faster_stays_open():
    gate = PayoffGate(probe_batches=4, rounds=2, clock=Clock())
    _probe(gate, cache_s=0.5e-6, bypass_s=1.0e-6)            # slow network: hits save half the time
    assert gate.state is GateState.OPEN
    assert all(gate.use_cache() for _ in range(100))
    assert gate.snapshot()["cache_over_bypass"] == pytest.approx(0.5)


def test_the_gate_probes_again_after_its_hold_and_backs_off_while_the_cache_keeps_losing():
    clock = Clock()
    gate = PayoffGate(probe_batches=2, rounds=1, hold_s=10, max_hold_s=25, clock=clock)
    _probe(gate, 2e-6, 1e-6)
    assert gate.state is GateState.CLOSED
    clock.t = 9.9
    assert not gate.use_cache()
    clock.t = 10.0
    gate.use_cache()
    assert gate.state is GateState.PROBING, "the hold is over: measure again"
    _probe(gate, 2e-6, 1e-6)
    clock.t = 10.0 + 19.9
    assert not gate.use_cache(), "the second loss holds twice as long"
    clock.t = 10.0 + 20.0
    gate.use_cache()
    assert gate.state is GateState.PROBING
    # The network got slow: the next probe finds the cache paying and opens.
    _probe(gate, 0.2e-6, 1e-6)
    assert gate.state is GateState.OPEN and gate.losses == 0


def test_a_bad_probe_size_is_refused_by_name():
    with pytest.raises(ValueError, match="probe_batches"):
        PayoffGate(probe_batches=0)
