"""Load monitor and adaptive cache sizing: shrink at once under load, grow back gradually, never starve the NN."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flexemr.cache import (
    AdaptivePolicy,
    CachePolicy,
    LoadMonitor,
    RowCache,
    bucket_batch,
    estimate_nn_peak_bytes,
    max_batch_that_fits,
    memory_budget_bytes,
)
from flexemr.model.presets import get_preset
from flexemr.model.spec import TableSpec

MiB = 1 << 20
# bench8's network with small tables: NN peak ~1.8 MiB at batch 256, ~58 MiB at 8192.
SPEC = dataclasses.replace(get_preset("bench8").spec,
                           tables=tuple(TableSpec(f"t{i}", 50_000, 64) for i in range(8)))
BUDGET = 100 * MiB
MARGIN = 8 * MiB


class FakeCache:
    """Just the capacity; the math of the policy does not need rows."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity_bytes = capacity
        self.resizes: list[int] = []
        self.cleared = 0

    def resize(self, capacity_bytes: int) -> int:
        self.capacity_bytes = capacity_bytes
        self.resizes.append(capacity_bytes)
        return 0

    def clear(self) -> None:
        self.cleared += 1


def _policy(**kw) -> AdaptivePolicy:
    return AdaptivePolicy(BUDGET, SPEC, **{"margin_bytes": MARGIN, "grow_step_bytes": 8 * MiB, **kw})


def test_monitor_window_slides():
    m = LoadMonitor(window_s=1.0, windows=3)
    assert m.largest_batch(now=0.0) == 0 and m.mean_queue_depth(now=0.0) == 0.0
    m.observe(256, 2, now=0.1)
    m.observe(8192, 10, now=1.5)
    m.observe(512, 0, now=2.2)
    assert m.largest_batch(now=2.9) == 8192
    assert m.mean_queue_depth(now=2.9) == pytest.approx(4.0)
    assert m.largest_batch(now=3.05) == 8192     # window 0 left; window 1 (the 8192) still in
    assert m.largest_batch(now=4.0) == 512        # the 8192 aged out after windows * window_s
    assert m.largest_batch(now=5.5) == 0 and m.batches(now=5.5) == 0


def test_bucket_batch():
    assert [bucket_batch(b) for b in (0, 1, 256, 257, 3000, 8192)] == [256, 256, 256, 512, 4096, 8192]
    assert bucket_batch(3, min_bucket=1) == 4


def test_target_is_budget_minus_nn_peak_minus_margin():
    p = _policy()
    m = LoadMonitor(1.0, 4)
    m.observe(300, now=0.0)  # -> bucket 512
    assert p.target_capacity(m, now=0.5) == BUDGET - estimate_nn_peak_bytes(SPEC, 512) - MARGIN
    m.observe(100_000, now=0.6)  # more than the budget can ever serve: clamped at 0
    assert p.target_capacity(m, now=0.7) == 0
    capped = AdaptivePolicy(BUDGET, SPEC, margin_bytes=MARGIN, max_bytes=5 * MiB)
    assert capped.target_capacity(LoadMonitor()) == 5 * MiB
    assert AdaptivePolicy(BUDGET, SPEC, margin_bytes=0, margin_fraction=0.5).margin == BUDGET // 2


def test_load_step_shrinks_at_once_then_grows_back_gradually():
    p = _policy()
    m = LoadMonitor(window_s=1.0, windows=3)
    cache = FakeCache(0)
    policy = CachePolicy(cache, mode="adaptive", adaptive=p)
    now, dt = 0.0, 0.25
    caps = []

    def run(batch: int, seconds: float) -> list[int]:
        nonlocal now
        out = []
        for _ in range(int(seconds / dt)):
            now += dt
            m.observe(batch, 0, now=now)
            out.append(policy.update(m, now=now))
        return out

    low_target = BUDGET - estimate_nn_peak_bytes(SPEC, 256) - MARGIN
    caps = run(256, 10.0)
    assert caps[-1] == low_target                        # warmed up to the idle target ...
    assert max(np.diff(caps)) <= 8 * MiB                  # ... one step at a time
    peak_8192 = estimate_nn_peak_bytes(SPEC, 8192)
    caps = run(8192, 6.0)
    assert caps[0] + peak_8192 <= BUDGET - MARGIN         # shrunk on the first update under load
    assert all(c + peak_8192 <= BUDGET for c in caps)     # and stays where the NN fits
    assert caps[0] > 0 and len(set(caps)) == 1            # no flapping while the load holds
    caps = run(256, 12.0)
    held = int(3 * 1.0 / dt) - 1
    assert all(c == caps[0] for c in caps[:held])         # the 8192 batch is still in the window
    grown = caps[held:]
    assert all(0 <= b - a <= 8 * MiB for a, b in zip(grown, grown[1:]))  # gradual, monotone
    assert grown[-1] == low_target                        # back to where it was


def test_no_flapping_when_load_jitters_inside_a_bucket():
    p = _policy()
    m = LoadMonitor(window_s=1.0, windows=2)
    cache = FakeCache(0)
    policy = CachePolicy(cache, mode="adaptive", adaptive=p)
    rng = np.random.default_rng(0)
    for i in range(200):
        m.observe(int(rng.integers(1500, 4097)), now=i * 0.1)  # crosses the 2048 bucket edge
        policy.update(m, now=i * 0.1)
    shrinks = [b for a, b in zip(cache.resizes, cache.resizes[1:]) if b < a]
    assert not shrinks


def test_queue_backlog_plans_for_the_full_batch():
    p = _policy(max_batch=8192, overload_queue_depth=16)
    m = LoadMonitor(1.0, 3)
    m.observe(256, queue_depth=2, now=0.0)
    assert p.planned_batch(m, now=0.1) == 256
    m.observe(300, queue_depth=60, now=0.2)
    assert p.planned_batch(m, now=0.3) == 8192


def test_adaptive_shrink_evicts_coldest_rows_of_a_real_cache():
    spec_rows = SPEC.tables[0].rows
    cache = RowCache(SPEC.tables, capacity_bytes=0, admission="lru")
    m = LoadMonitor(1.0, 2)
    policy = CachePolicy(cache, mode="adaptive", adaptive=_policy(grow_step_bytes=BUDGET))
    m.observe(256, now=0.0)
    cap = policy.update(m, now=0.0)
    assert cap == cache.capacity_bytes > 60 * MiB
    rows_fit = cap // (64 * 4) // 8
    data = np.ones((rows_fit, 64), dtype=np.float32)
    for t in range(8):
        cache.fill(t, np.arange(rows_fit), data)
    hot = np.arange(0, spec_rows, 997)[:40]
    for t in range(8):
        cache.split(t, hot, np.ones(len(hot), dtype=np.int32))  # the most recent rows
    m.observe(8192, now=0.5)
    cap = policy.update(m, now=0.5)
    st = cache.stats()
    assert cap + estimate_nn_peak_bytes(SPEC, 8192) <= BUDGET
    assert st["used_bytes"] <= cap and st["allocated_bytes"] <= cap and st["evictions"] > 0
    for t in range(8):
        assert cache.split(t, hot, np.ones(len(hot), dtype=np.int32)).hit_mask.all()


def test_fixed_and_off_modes():
    cache = FakeCache(0)
    pol = CachePolicy(cache, mode="fixed", fixed_bytes=32 * MiB)
    assert cache.capacity_bytes == 32 * MiB
    m = LoadMonitor()
    m.observe(8192, now=0.0)
    assert pol.update(m, now=0.0) == 32 * MiB          # fixed ignores load
    pol.resize(16 * MiB)
    assert cache.capacity_bytes == 16 * MiB
    pol.set_mode("off")
    assert cache.capacity_bytes == 0 and cache.cleared == 1
    pol.resize(64 * MiB)                                # remembered, not applied while off
    assert pol.update(m, now=0.0) == 0
    pol.set_mode("fixed")
    assert cache.capacity_bytes == 64 * MiB
    with pytest.raises(ValueError, match="AdaptivePolicy"):
        pol.set_mode("adaptive")
    with pytest.raises(ValueError):
        pol.set_mode("lfu")


def test_adaptive_starts_from_resize():
    cache = FakeCache(0)
    pol = CachePolicy(cache, mode="adaptive", adaptive=_policy(), fixed_bytes=0)
    pol.resize(90 * MiB)                                # above what a 4096 batch leaves
    m = LoadMonitor()
    m.observe(4096, now=0.0)
    assert pol.update(m, now=0.0) == BUDGET - estimate_nn_peak_bytes(SPEC, 4096) - MARGIN


def test_max_batch_that_fits_trades_cache_for_batch():
    prev = None
    for cache_mib in (0, 20, 40, 60, 80):
        b = max_batch_that_fits(BUDGET, SPEC, cache_mib * MiB, margin_bytes=MARGIN)
        room = BUDGET - cache_mib * MiB - MARGIN
        assert estimate_nn_peak_bytes(SPEC, b) <= room < estimate_nn_peak_bytes(SPEC, b + 1)
        assert prev is None or b < prev
        prev = b
    assert max_batch_that_fits(64 << 10, SPEC, 0) == 0  # not even the weights fit


def test_budget_on_cpu_is_the_configured_number():
    assert memory_budget_bytes("cpu", 2 << 30) == 2 << 30
