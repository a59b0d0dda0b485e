"""Control segment: layout checks, attach errors, seqlock consistency under a concurrent writer process."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import posix_ipc
import pytest

from flexemr import naming
from flexemr.control.block import (
    ENGINE_STATS,
    MAGIC,
    CacheMode,
    ControlBlock,
    EngineState,
    VERSION,
    InstanceNotRunning,
)
from flexemr.errors import ControlError

TOPO = {"instance": "x", "mode": "local",
        "servers": [{"name": "s0", "address": "127.0.0.1:7001"}, {"name": "s1", "address": "127.0.0.1:7002"}]}


@pytest.fixture
def block(instance):
    b = ControlBlock.create(instance, 2, 4, ["t0", "t1"], TOPO, cache_policy="adaptive",
                            cache_capacity_bytes=64 << 20, rebalance=True)
    yield b
    b.close()
    b.unlink()
    assert naming.list_instance_segments(instance) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_attach_missing_instance_says_not_running(instance):
    with pytest.raises(InstanceNotRunning) as e:
        ControlBlock.attach(instance)
    assert str(e.value) == (f"flexemr instance {instance!r} is not running "
                            f"(no control segment /flexemr.{instance}.ctl)")
    assert isinstance(e.value, ControlError)


def test_create_names_segment_and_semaphores(block, instance):
    assert block.name == naming.control_name(instance)
    assert naming.list_instance_segments(instance) == [
        f"flexemr.{instance}.ctl", f"sem.flexemr.{instance}.ctl.done",
        f"sem.flexemr.{instance}.ctl.mutex", f"sem.flexemr.{instance}.ctl.ready"]
    assert block.total_bytes % 4096 == 0


def test_attach_refuses_bad_magic_and_version(block, instance):
    other = ControlBlock.attach(instance)
    try:
        other.mm[8:12] = struct.pack("<I", 99)
        with pytest.raises(ControlError, match=f"layout version 99; this flexemr understands version {VERSION}"):
            ControlBlock.attach(instance)
        other.mm[8:12] = struct.pack("<I", VERSION)
        other.mm[0:8] = b"GARBAGE!"
        with pytest.raises(ControlError, match="is not a flexemr control segment"):
            ControlBlock.attach(instance)
    finally:
        other.mm[0:8] = MAGIC
        other.close()
    ControlBlock.attach(instance).close()


def test_writes_are_visible_to_an_attached_reader(block, instance):
    reader = ControlBlock.attach(instance)
    try:
        block.engines[1].set_process(pid=4242, cpu=1, state="ready", restarts=2)
        reader.engines[1].update(queue_depth=7, inflight=3, requests_total=100, heartbeat_ns=time.monotonic_ns())
        reader.engines[1].add(requests_total=5)
        e = reader.snapshot()["engines"][1]
        assert (e["pid"], e["cpu"], e["state"], e["restarts"]) == (4242, 1, "ready", 2)
        assert (e["queue_depth"], e["inflight"], e["requests_total"]) == (7, 3, 105)
        assert e["connections"] == 2 and 0 <= e["heartbeat_age_s"] < 5
        assert reader.snapshot()["engines"][0]["cpu"] == -1  # not pinned yet
    finally:
        reader.close()


def test_update_rejects_unknown_fields(block):
    with pytest.raises(ValueError, match="unknown field.*queue_dept"):
        block.engines[0].update(queue_dept=1)
    with pytest.raises(ValueError, match="unknown engine state"):
        block.engines[0].set_process(state="sleepy")
    assert block.engines[0].stats.read()["seq"] % 2 == 0


def test_snapshot_has_the_status_contract(block):
    block.cache.update(policy=int(CacheMode.ADAPTIVE), capacity_bytes=1 << 20, used_bytes=1000, hits=3, lookups=4)
    block.add_tables(lookups=[10, 20], hits=[5, 0], ids_total=[7, 8], bytes_wire=[100, 200])
    snap = json.loads(json.dumps(block.snapshot()))  # JSON-serialisable as is
    for e in snap["engines"]:
        assert {"id", "pid", "cpu", "connections", "queue_depth", "inflight", "requests_per_s"} <= e.keys()
    for c in snap["connections"]:
        assert {"id", "server", "engine", "queued", "credits", "rtt_p50_us", "rtt_p99_us"} <= c.keys()
    assert {"policy", "capacity_bytes", "used_bytes", "hit_rate"} <= snap["cache"].keys()
    assert snap["cache"]["policy"] == "adaptive" and snap["cache"]["hit_rate"] == 0.75
    assert snap["cache"]["target_capacity_bytes"] == 64 << 20
    assert snap["tables"]["t0"]["hit_rate"] == 0.5 and snap["tables"]["t1"]["bytes_wire"] == 200
    assert snap["cache"]["tables"]["t0"]["hit_rate"] == 0.5
    assert [c["server"] for c in snap["connections"]] == [0, 0, 1, 1]
    assert snap["connections"][2]["address"] == "127.0.0.1:7002"
    assert snap["instance"] == block.instance and snap["supervisor_pid"] == os.getpid()
    assert snap["rebalance"] is True and snap["mode"] == "local"


def test_runtime_epoch_and_owner_map(block, instance):
    reader = ControlBlock.attach(instance)
    try:
        rt = reader.runtime.read()
        assert rt.owners == (0, 1, 0, 1) and rt.epoch % 2 == 0
        assert rt.cache_policy is CacheMode.ADAPTIVE and rt.rebalance
        before = reader.runtime.epoch
        epoch = block.set_owner(1, 0)
        assert reader.runtime.epoch == epoch == before + 2
        rt = reader.runtime.read()
        assert rt.owners == (0, 0, 0, 1) and rt.connections_of(0) == [0, 1, 2]
        snap = reader.snapshot()
        assert snap["connections"][1]["engine"] == 0 and snap["connections"][1]["migrations"] == 1
        assert [e["connections"] for e in snap["engines"]] == [3, 1]
        block.runtime.publish(cache_policy="off", cache_capacity_bytes=5, rebalance=False)
        rt = reader.runtime.read()
        assert (rt.cache_policy, rt.cache_capacity_bytes, rt.rebalance, rt.owners[1]) == (CacheMode.OFF, 5, False, 0)
        with pytest.raises(ValueError, match="no engine 9"):
            block.set_owner(0, 9)
        with pytest.raises(ValueError, match="no connection 4"):
            block.set_owner(4, 0)
    finally:
        reader.close()


def test_connection_stats_follow_the_owner_across_a_migration(block):
    # engine 1 owns conn 1, then it moves to engine 0: counters add up, gauges come from the fresh row
    block.engines[1].conn(1).update(queued=9, credits=2, subrequests_total=100, bytes_sent=1000,
                                    updated_ns=time.monotonic_ns())
    block.set_owner(1, 0)
    block.engines[0].conn(1).update(queued=1, credits=4, subrequests_total=5, bytes_sent=50,
                                    updated_ns=time.monotonic_ns())
    c = block.snapshot()["connections"][1]
    assert (c["engine"], c["queued"], c["credits"]) == (0, 1, 4)
    assert (c["subrequests_total"], c["bytes_sent"]) == (105, 1050)


def test_topology_can_be_replaced(block, instance):
    reader = ControlBlock.attach(instance)
    try:
        gen, topo = reader.read_topology()
        assert topo["servers"][1]["address"] == "127.0.0.1:7002"
        new = dict(TOPO, servers=[{"name": "s0", "address": "10.0.0.1:7001"}])
        assert block.set_topology(new) == gen + 1
        assert reader.read_topology() == (gen + 1, json.loads(json.dumps(new)))
        with pytest.raises(ControlError, match="holds at most"):
            block.set_topology({"blob": "x" * (1 << 20)})
    finally:
        reader.close()


def test_update_rates_from_engine_counters(block):
    t0 = time.monotonic_ns()
    block.update_rates(now_ns=t0)
    block.engines[0].update(requests_total=500, subrequests_total=1500, busy_ns=250_000_000)
    block.update_rates(now_ns=t0 + 1_000_000_000)
    e = block.snapshot()["engines"][0]
    assert (e["requests_per_s"], e["subrequests_per_s"], e["busy_ratio"]) == (500.0, 1500.0, 0.25)


def test_stale_segment_is_replaced_and_live_one_refused(instance):
    stale = ControlBlock.create(instance, 1, 1, [], {}, supervisor_pid=_dead_pid())
    stale.close()
    fresh = ControlBlock.create(instance, 1, 2, ["t"], {})  # replaces it: its supervisor is gone
    try:
        assert fresh.n_connections == 2
        live = ControlBlock.attach(instance)
        live.close()
    finally:
        fresh.close()
        fresh.unlink()
    other = ControlBlock.create(instance, 1, 1, [], {}, supervisor_pid=os.getppid())
    try:
        with pytest.raises(ControlError, match="already running"):
            ControlBlock.create(instance, 1, 1, [], {})
    finally:
        other.close()
        other.unlink()


# ---------------------------------------------------------------------- seqlock under a real concurrent writer

_FIELDS = [n for n in ENGINE_STATS.names if n != "seq"]


def _writer(instance: str, stop_at: float) -> None:
    """Child process: keep every field of engine 1's stats row equal to a counter."""
    b = ControlBlock.attach(instance)
    row = b.engines[1].stats
    v = 0
    while time.monotonic() < stop_at:
        v += 1
        row.update(**{f: v for f in _FIELDS})
    b.close()
    os._exit(0)


def test_seqlock_reader_never_sees_a_mixed_row(block, instance):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_writer, args=(instance, time.monotonic() + 1.0))
    proc.start()
    try:
        row = block.engines[1].stats
        seen: set[int] = set()
        reads = 0
        while proc.is_alive() or reads == 0:
            d = row.read()
            values = {d[f] for f in _FIELDS}
            assert len(values) == 1, f"torn row: {d}"
            if reads % 8 == 0:  # the whole snapshot path too (slower, so not every time)
                snap_engine = block.snapshot()["engines"][1]
                assert len({snap_engine[f] for f in _FIELDS if f != "heartbeat_ns"}) == 1
            seen |= values
            reads += 1
    finally:
        proc.join(5)
    assert proc.exitcode == 0
    # a loaded host may schedule them apart for long stretches; a few distinct values prove overlap
    assert len(seen) >= 5, f"the writer and reader barely overlapped ({len(seen)} values in {reads} reads)"


def test_writer_that_died_mid_update_does_not_hang_readers(block):
    row = block.engines[0].stats
    row.update(queue_depth=1)
    seq = row._sec.seq
    seq[0] = int(seq[0]) + 1  # what a writer killed between its two seq stores leaves behind
    t0 = time.monotonic()
    assert row.read()["queue_depth"] == 1
    assert time.monotonic() - t0 < 1.0
    row.update(queue_depth=2)  # the restarted writer recovers: seq even again
    d = row.read()
    assert d["queue_depth"] == 2 and d["seq"] % 2 == 0


def test_vectorised_table_counters(block):
    block.add_tables(lookups=np.array([1, 2]), hits=[1, 1])
    block.add_tables(lookups=[1, 2])
    assert block.tables["t1"].read()["lookups"] == 4 and block.tables["t0"].read()["hits"] == 1


def test_engine_state_labels():
    assert EngineState.parse("restarting") is EngineState.RESTARTING
    assert CacheMode.parse("fixed").label == "fixed"
    with pytest.raises(ValueError, match="expected adaptive, fixed or off"):
        CacheMode.parse("lru")


def test_semaphores_exist_with_expected_values(block, instance):
    mutex = posix_ipc.Semaphore(f"/flexemr.{instance}.ctl.mutex")
    try:
        assert mutex.value == 1
    finally:
        mutex.close()


def test_reader_waits_for_a_writer_descheduled_mid_update(block):
    """A writer that stalls between its seq stores (a loaded host) is waited for, not read half-written."""
    row = block.engines[0].stats
    row.update(queue_depth=1, inflight=1)
    seq = row._sec.seq
    s = int(seq[0])
    seq[0] = s + 1                      # the writer's first store...
    row._sec.cols["queue_depth"][0] = 2  # ...half its fields...

    def finish() -> None:
        time.sleep(0.25)                # ...then it is descheduled for longer than a plain retry loop waits
        row._sec.cols["inflight"][0] = 2
        seq[0] = s + 2

    t = threading.Thread(target=finish)
    t.start()
    try:
        d = row.read()
    finally:
        t.join()
    assert (d["queue_depth"], d["inflight"]) == (2, 2), f"torn row: {d}"


def test_reader_of_a_dead_writer_gets_the_last_whole_row(block):
    row = block.engines[0].stats
    row.update(queue_depth=5, inflight=5)
    assert row.read()["queue_depth"] == 5
    seq = row._sec.seq
    seq[0] = int(seq[0]) + 1            # killed mid-update, after storing one field
    row._sec.cols["queue_depth"][0] = 6
    d = row.read()
    assert (d["queue_depth"], d["inflight"]) == (5, 5)
