"""Embedding servers in the control segment: their two rows, shard replicas, failover counters, VERSION."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import time

import pytest

from flexemr import naming
from flexemr.control.block import VERSION, ControlBlock, ServerState
from flexemr.errors import ControlError
from flexemr.metrics import render_metrics

TOPO = {"instance": "x", "mode": "local",
        "servers": [{"name": f"embedding[{i}]", "address": f"127.0.0.1:{7001 + i}"} for i in range(3)],
        "holders": [[0, 1], [1, 2], [2, 0]], "replicas": 2}


@pytest.fixture
def block(instance):
    b = ControlBlock.create(instance, 2, 3, ["t0"], TOPO)
    yield b
    b.close()
    b.unlink()
    assert naming.list_instance_segments(instance) == []


def test_server_count_comes_from_the_topology_unless_given(block, instance):
    assert block.n_servers == 3 and [s.id for s in block.servers] == [0, 1, 2]
    other = ControlBlock.attach(instance)
    try:
        assert other.n_servers == 3 and len(other.servers) == 3
    finally:
        other.close()
    second = "u" + instance[1:]
    b = ControlBlock.create(second, 1, 0, [], {"servers": []}, n_servers=5)
    try:
        assert b.n_servers == 5 and len(b.snapshot()["servers"]) == 5
    finally:
        b.close()
        b.unlink()
    with pytest.raises(ValueError, match="n_servers must be >= 0"):
        ControlBlock.create(second, 1, 0, [], {}, n_servers=-1)


def test_server_rows_round_trip_between_processes(block, instance):
    """The supervisor's row and the inference process's row, written by two processes, read by a third."""
    now = time.monotonic_ns()
    block.servers[1].set_process(pid=4242, state="ready", restarts=2, started_ns=now)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_inference_writer, args=(instance,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    reader = ControlBlock.attach(instance)
    try:
        snap = json.loads(json.dumps(reader.snapshot()))   # JSON-serialisable as is
    finally:
        reader.close()
    s0, s1, s2 = snap["servers"]
    assert s1 == {"id": 1, "name": "embedding[1]", "address": "127.0.0.1:7002", "state": "reconnecting",
                  "process": "ready", "pid": 4242, "restarts": 2, "started_ns": now, "outstanding": 0,
                  "connections_up": 0, "changed_age_s": s1["changed_age_s"]}
    assert 0 <= s1["changed_age_s"] < 30
    assert (s0["state"], s0["outstanding"], s0["connections_up"]) == ("up", 7, 2)
    assert s2["state"] == "down" and s2["process"] is None and s2["pid"] == 0   # not a child of this daemon
    # group 0 = servers {0, 1}: 1 up; group 1 = {1, 2}: none; group 2 = {2, 0}: 1 up
    assert snap["shards"] == {"0": 1, "1": 0, "2": 1} and snap["replicas"] == 2
    assert snap["ranker"]["failover"] == {"reissued": 3, "hedges_sent": 5, "hedges_won": 4, "failovers": 11}
    assert "reissued_total" not in snap["ranker"]


def _inference_writer(instance: str) -> None:
    b = ControlBlock.attach(instance)
    now = time.monotonic_ns()
    b.servers[0].update(state="up", outstanding=7, connections_up=2, changed_ns=now)
    b.servers[1].update(state=ServerState.RECONNECTING, outstanding=0, connections_up=0, changed_ns=now)
    b.servers[2].update(state="down", connections_up=1, changed_ns=now)
    b.ranker.update(reissued_total=3, hedges_sent=5, hedges_won=4, failovers_total=11)
    b.close()
    os._exit(0)


def test_shards_without_holders_are_each_their_own_group(instance):
    b = ControlBlock.create(instance, 1, 2, [], {"servers": ["a:1", "b:2"]})
    try:
        b.servers[0].update(state="up")
        snap = b.snapshot()
        assert snap["shards"] == {"0": 1, "1": 0} and snap["replicas"] == 1
        assert snap["servers"][1]["address"] == "b:2" and snap["servers"][1]["state"] == "unknown"
    finally:
        b.close()
        b.unlink()


def test_bad_server_state_is_refused_by_name(block):
    with pytest.raises(ValueError, match="unknown server state 'sleepy' .*up, down, reconnecting"):
        block.servers[0].update(state="sleepy")
    with pytest.raises(ValueError, match="unknown engine state"):
        block.servers[0].set_process(state="sleepy")
    block.servers[0].stats._sec.cols["state"][0] = 99   # a value from a newer build
    assert block.snapshot()["servers"][0]["state"] == "unknown(99)"


_FIELDS = ("outstanding", "connections_up", "changed_ns")


def _stats_writer(instance: str, until: float) -> None:
    b = ControlBlock.attach(instance)
    i = 0
    while time.monotonic() < until:
        i += 1
        b.servers[1].update(state=i % 4, outstanding=i, connections_up=i, changed_ns=i)
    b.close()
    os._exit(0)


def test_seqlock_reader_never_sees_a_mixed_server_row(block, instance):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_stats_writer, args=(instance, time.monotonic() + 1.0))
    proc.start()
    try:
        row = block.servers[1].stats
        seen: set[int] = set()
        reads = 0
        while proc.is_alive() or reads == 0:
            d = row.read()
            values = {d[f] for f in _FIELDS}
            assert len(values) == 1 and d["state"] == d["outstanding"] % 4, f"torn row: {d}"
            seen |= values
            reads += 1
    finally:
        proc.join(5)
    assert proc.exitcode == 0
    assert len(seen) >= 5, f"the writer and reader barely overlapped ({len(seen)} values in {reads} reads)"


def test_a_segment_of_the_old_layout_is_refused_then_replaced(block, instance):
    old = ControlBlock.attach(instance)
    try:
        old.mm[8:12] = struct.pack("<I", VERSION - 1)   # what a supervisor of the previous build created
        with pytest.raises(ControlError, match=f"layout version {VERSION - 1}; this flexemr understands "
                                               f"version {VERSION} \\(use emrctl from the daemon's install\\)"):
            ControlBlock.attach(instance)
    finally:
        old.close()
    # a new supervisor replaces the unreadable segment instead of failing to start
    block.close()
    fresh = ControlBlock.create(instance, 1, 0, [], TOPO)
    try:
        with ControlBlock.attach(instance) as again:
            assert again.version == VERSION and again.n_servers == 3
    finally:
        fresh.close()


def test_prometheus_has_servers_replicas_and_failover_counters(block):
    block.servers[0].update(state="up", outstanding=4, connections_up=2)
    block.servers[1].update(state="reconnecting")
    block.servers[2].update(state="up")
    block.servers[1].set_process(pid=0, state="restarting", restarts=1)
    block.ranker.update(reissued_total=3, hedges_sent=5, hedges_won=4, failovers_total=11)
    text = render_metrics(block)
    for line in [
        'flexemr_server_up{address="127.0.0.1:7001",server="0"} 1.0',
        'flexemr_server_up{address="127.0.0.1:7002",server="1"} 0.0',
        'flexemr_server_reconnecting{address="127.0.0.1:7002",server="1"} 1.0',
        'flexemr_server_outstanding{address="127.0.0.1:7001",server="0"} 4.0',
        'flexemr_server_connections_up{address="127.0.0.1:7001",server="0"} 2.0',
        'flexemr_server_restarts_total{address="127.0.0.1:7002",server="1"} 1.0',
        'flexemr_shard_group_live_replicas{primary="0"} 1.0',
        'flexemr_shard_group_live_replicas{primary="2"} 2.0',
        "flexemr_failovers_total 11.0",
        "flexemr_reissued_subrequests_total 3.0",
        "flexemr_hedged_subrequests_total 5.0",
        "flexemr_hedges_won_total 4.0",
    ]:
        assert line in text, f"{line!r} missing from:\n{text}"
    assert "# TYPE flexemr_failovers_total counter" in text
