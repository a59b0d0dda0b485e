"""ServerHealth: which replica gets a subrequest, and when a server counts as down or up again."""

from __future__ import annotations

import time

from flexemr.model.presets import get_preset
from flexemr.routing.table import RoutingTable

from flexemrd.inference import health as h


def _health(replicas: int = 2) -> h.ServerHealth:
    spec = get_preset("tiny").spec
    routing = RoutingTable.build(spec, 3, "rows", replicas=replicas)
    return h.ServerHealth(routing, {c: (c, f"127.0.0.1:{7000 + c}") for c in range(3)})


def test_least_outstanding_live_holder_and_never_a_down_one():
    hl = _health()
    assert hl.routing.holders_of(0) == (0, 1)
    assert hl.choose(0) == (0, 0)            # both idle: the primary
    assert hl.choose(0) == (1, 1)            # server 0 has one outstanding now
    hl.conn_lost(1, "reset")
    assert [hl.choose(0)[0] for _ in range(3)] == [0, 0, 0]
    hl.conn_lost(0, "reset")
    assert hl.choose(0) is None
    assert "127.0.0.1:7000" in hl.describe_down(0) and "reset" in hl.describe_down(0)
    hl.conn_connected(1)
    assert hl.choose(0)[0] == 1


def test_short_client_deadlines_do_not_mark_a_server_down():
    hl = _health(replicas=1)
    for _ in range(10):
        hl.timed_out(0, 0.05)
    assert hl.choose(0) is not None


def test_slow_timeouts_mark_a_server_down_then_one_probe_at_a_time_until_it_answers(monkeypatch):
    monkeypatch.setattr(h, "PROBE_AFTER_S", 0.05)
    hl = _health(replicas=1)
    for _ in range(h.DOWN_AFTER_TIMEOUTS):
        hl.timed_out(0, h.SLOW_S)
    assert hl.choose(0) is None, "down: nothing is sent to it"
    time.sleep(0.06)
    assert hl.choose(0) == (0, 0), "half-open: one probe"
    assert hl.choose(0) is None, "and only one"
    hl.answered(0, 0.001)
    assert hl.choose(0) == (0, 0) and hl.all_shards_live()


def test_hedge_thresholds_follow_the_servers_latency_within_the_refresh_interval(monkeypatch):
    """Quantiles wait for 20 answers, are capped at 3x the median, and track a server that slows down."""
    clock = [100.0]
    monkeypatch.setattr(h.time, "monotonic", lambda: clock[0])
    hl = _health(replicas=1)
    for _ in range(19):
        hl.answered(0, 0.001)
    assert hl.median_s(0) is None and hl.hedge_after_s(0, 0.95) is None
    hl.answered(0, 0.001)
    assert hl.median_s(0) == 0.001
    for _ in range(3):
        hl.answered(0, 1.0)                  # a stall or three: the tail is capped at 3x the median
    assert hl.hedge_after_s(0, 0.99) <= 0.003 + 1e-12
    for _ in range(200):
        hl.answered(0, 0.010)                # the server got slower for good
    assert hl.median_s(0) == 0.001           # cached: the same pass asks for it per part in flight
    clock[0] += 2 * h.QUANTILES_REFRESH_S
    assert hl.median_s(0) == 0.010
