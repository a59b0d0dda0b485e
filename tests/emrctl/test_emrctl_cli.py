"""emrctl against a control block created in the test, with a fake supervisor serving the mailbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from emrctl.cli import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_NO_ANSWER, LAZY_COMMANDS, cli
from emrctl.render import WIDTH, _count, human_bytes, human_duration, render_status
from flexemr.control import Dispatcher, MailboxServer
from flexemr.control.block import CacheMode, ControlBlock
from flexemr.control.commands import CachePolicy, CacheResize, Migrate, Rebalance

REPO = Path(__file__).resolve().parents[2]
TOPO = {"instance": "t", "mode": "local",
        "servers": [{"name": "s0", "address": "127.0.0.1:7001"},
                    {"name": "s1", "address": "embedding-host-with-a-very-long-name.example.com:7002"}]}


class FakeSupervisor:
    """Just enough of the supervisor's cmd_* handlers to exercise emrctl."""

    def __init__(self, block: ControlBlock) -> None:
        self.block = block

    def cmd_migrate(self, cmd: Migrate) -> dict[str, Any]:
        src = self.block.runtime.read().owners[cmd.conn]
        epoch = self.block.set_owner(cmd.conn, cmd.to_engine)
        return {"conn": cmd.conn, "from": src, "engine": cmd.to_engine, "epoch": epoch}

    def cmd_cache_resize(self, cmd: CacheResize) -> dict[str, Any]:
        self.block.runtime.publish(cache_capacity_bytes=cmd.size_bytes)
        return {"capacity_bytes": cmd.size_bytes}

    def cmd_cache_policy(self, cmd: CachePolicy) -> dict[str, Any]:
        if cmd.policy == "fixed":
            raise ValueError("fixed needs a capacity first")
        self.block.runtime.publish(cache_policy=cmd.policy)
        return {"policy": cmd.policy, "message": f"cache policy is now {cmd.policy}"}

    def cmd_rebalance(self, cmd: Rebalance) -> dict[str, Any]:
        self.block.runtime.publish(rebalance=cmd.enabled)
        return {"rebalance": cmd.enabled}


@pytest.fixture
def block(instance) -> Iterator[ControlBlock]:
    b = ControlBlock.create(instance, 2, 4, ["t0", "t1"], TOPO, cache_policy="adaptive",
                            cache_capacity_bytes=64 << 20, rebalance=True)
    now = time.monotonic_ns()
    for e in range(2):
        b.engines[e].set_process(pid=10_000 + e, cpu=e, state="ready")
        b.engines[e].update(queue_depth=3 + e, inflight=1, requests_total=123_456_789, heartbeat_ns=now)
    b.engines[0].update(bytes_lent=3 << 20, bytes_copied=1 << 20, fills_read=7, rows_read=700)
    for c in range(4):
        b.engines[c % 2].conn(c).update(queued=c, credits=4, rtt_p50_us=120.0, rtt_p99_us=99_999.0,
                                        updated_ns=now)
    b.ranker.update(requests_total=1000, requests_per_s=1234.5, latency_p50_ms=1.25, latency_p99_ms=4.5,
                    mean_batch=128.0)
    b.cache.update(policy=int(CacheMode.ADAPTIVE), capacity_bytes=64 << 20, used_bytes=3 << 20, hits=45,
                   lookups=100)
    b.add_tables(lookups=[60, 40], hits=[30, 15])
    yield b
    b.close()
    b.unlink()


@pytest.fixture
def served(block) -> Iterator[ControlBlock]:
    server = MailboxServer(block)
    dispatcher = Dispatcher(FakeSupervisor(block))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.serve_one(dispatcher, 0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield block
    stop.set()
    t.join(5)
    server.close()


def run(block_or_instance: ControlBlock | str, *args: str) -> Any:
    inst = block_or_instance if isinstance(block_or_instance, str) else block_or_instance.instance
    return CliRunner().invoke(cli, ["--instance", inst, *args], catch_exceptions=False)


# ---------------------------------------------------------------------- status


def test_status_human_output_fits_100_columns(block):
    r = run(block, "status")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    assert lines[0].startswith(f"flexemr {block.instance!r}  up ")
    assert "1234 req/s" in lines[0] and "p50 1.25 ms" in lines[0] and "p99 4.50 ms" in lines[0]
    assert "batch 128.0" in lines[0]
    text = r.stdout
    assert "ENGINE" in text and "CONN" in text and "CREDITS" in text
    assert "answers: 75% read in place (3.0 MiB lent, 1.0 MiB copied); RDMA READ fills 7 (700 rows)" in text
    assert not any(line.endswith("…") for line in lines if line.startswith("ENGINE")), "every engine column shows"
    assert "cache adaptive  3.0 MiB / 64.0 MiB  hit rate 45% of 100 lookups" in text
    assert "cache target" not in text
    block.runtime.publish(cache_capacity_bytes=128 << 20)
    assert "cache target: adaptive 128.0 MiB" in run(block, "status").stdout
    assert "1 embedding-host" in text  # long addresses are cut, not dropped
    assert "rebalance on" in text


def test_status_json_has_the_contract_fields(block):
    r = run(block, "status", "--json")
    assert r.exit_code == 0, r.output
    snap = json.loads(r.stdout)
    assert [e["id"] for e in snap["engines"]] == [0, 1]
    for e in snap["engines"]:
        assert {"id", "pid", "cpu", "connections", "queue_depth"} <= e.keys()
    assert snap["engines"][1]["queue_depth"] == 4
    e0 = snap["engines"][0]
    assert (e0["bytes_lent"], e0["bytes_copied"], e0["fills_read"], e0["rows_read"]) == (3 << 20, 1 << 20, 7, 700)
    for c in snap["connections"]:
        assert {"id", "server", "engine", "queued", "credits"} <= c.keys()
    assert snap["connections"][3]["queued"] == 3 and snap["connections"][3]["engine"] == 1
    assert {"policy", "capacity_bytes", "used_bytes", "hit_rate"} <= snap["cache"].keys()
    assert snap["cache"]["hit_rate"] == 0.45


def test_status_watch_computes_rates_between_snapshots(block):
    def bump() -> None:
        time.sleep(0.05)
        block.engines[0].add(requests_total=100)

    threading.Thread(target=bump).start()
    r = run(block, "status", "--json", "--watch", "0.2", "--count", "2")
    assert r.exit_code == 0, r.output
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert second["engines"][0]["requests_total"] - first["engines"][0]["requests_total"] == 100
    assert 100 < second["engines"][0]["requests_per_s"] < 600
    r = run(block, "status", "--watch", "0.1", "--count", "2")
    assert r.exit_code == 0 and r.stdout.count(f"flexemr {block.instance!r}  up") == 2


def test_not_running_is_one_line_and_exit_2(instance):
    r = run(instance, "status")
    assert r.exit_code == EXIT_NOT_RUNNING
    assert r.stderr == (f"emrctl: flexemr instance {instance!r} is not running "
                        f"(no control segment /flexemr.{instance}.ctl)\n")
    assert "Traceback" not in r.output
    r = run(instance, "migrate", "0", "--to", "1")
    assert r.exit_code == EXIT_NOT_RUNNING and "is not running" in r.stderr


def test_stale_segment_is_not_running(instance):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    b = ControlBlock.create(instance, 1, 1, [], {}, supervisor_pid=pid)
    try:
        r = run(instance, "status")
        assert r.exit_code == EXIT_NOT_RUNNING
        assert f"supervisor pid {pid} is gone; stale control segment" in r.stderr
    finally:
        b.close()
        b.unlink()


def test_bad_instance_name_is_a_usage_error():
    r = CliRunner().invoke(cli, ["--instance", "no/slash", "status"])
    assert r.exit_code == 2 and "instance name" in r.output


def test_instance_from_environment(block):
    r = CliRunner().invoke(cli, ["status", "--json"], env={"FLEXEMR_INSTANCE": block.instance})
    assert r.exit_code == 0 and json.loads(r.stdout)["instance"] == block.instance


# ---------------------------------------------------------------------- commands


def test_migrate_goes_through_the_mailbox(served):
    r = run(served, "migrate", "1", "--to", "0")
    assert r.exit_code == 0, r.output
    assert r.stdout == "connection 1: engine 1 -> 0\n"
    assert served.runtime.read().owners[1] == 0
    r = run(served, "migrate", "1", "--to", "0")
    assert r.exit_code == 0 and r.stdout == "connection 1 is already on engine 0\n"
    r = run(served, "migrate", "2", "--to", "1", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "ok"


def test_migrate_unknown_ids_fail_before_sending(block):
    # no mailbox server runs here: the check must not need one
    r = run(block, "migrate", "0", "--to", "7")
    assert r.exit_code == EXIT_FAILED
    assert r.stderr == f"emrctl: instance {block.instance!r} has no engine 7 (engines: 0-1)\n"
    r = run(block, "migrate", "9", "--to", "0")
    assert r.exit_code == EXIT_FAILED
    assert r.stderr == f"emrctl: instance {block.instance!r} has no connection 9 (connections: 0-3)\n"


def test_command_without_a_server_times_out_with_exit_3(block):
    r = run(block, "--timeout", "0.3", "cache", "policy", "off")
    assert r.exit_code == EXIT_NO_ANSWER
    assert "the daemon did not answer within 0.3 s" in r.stderr


def test_cache_commands(served):
    r = run(served, "cache", "resize", "2GiB")
    assert r.exit_code == 0, r.output
    assert served.runtime.read().cache_capacity_bytes == 2 << 30
    r = run(served, "cache", "resize", "lots")
    assert r.exit_code == 2 and "not a size: 'lots'" in r.output
    r = run(served, "cache", "policy", "off")
    assert r.exit_code == 0 and r.stdout == "cache policy is now off\n"
    assert served.runtime.read().cache_policy is CacheMode.OFF
    r = run(served, "cache", "policy", "fixed")
    assert r.exit_code == EXIT_FAILED and r.stderr == "emrctl: fixed needs a capacity first\n"
    r = run(served, "cache", "policy", "lru")
    assert r.exit_code == 2 and "'lru' is not one of" in r.output


def test_rebalance_and_unsupported_commands(served):
    r = run(served, "rebalance", "off")
    assert r.exit_code == 0 and not served.runtime.read().rebalance
    r = run(served, "reload")  # FakeSupervisor has no cmd_reload
    assert r.exit_code == EXIT_FAILED and "does not support 'reload'" in r.stderr


# ---------------------------------------------------------------------- render helpers


def test_render_helpers():
    assert human_bytes(64 << 20) == "64.0 MiB" and human_bytes(512) == "512 B"
    assert [_count(n) for n in (987, 12_345, 4_500_000, 67_000_000_000)] == ["987", "12.3k", "4.5M", "67.0G"]
    assert [human_duration(s) for s in (5.25, 125, 3725, 2 * 86400 + 7200)] == ["5.2s", "2m05s", "1h02m", "2d02h"]


def test_render_status_clips_every_line(block):
    snap = block.snapshot()
    snap["instance"] = "x" * 32
    snap["ranker"]["errors_total"] = 10**15
    assert all(len(line) <= WIDTH for line in render_status(snap).splitlines())


# ---------------------------------------------------------------------- lazy groups, imports, speed


def test_model_group_is_registered_lazily():
    assert "model" in LAZY_COMMANDS
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, "model")
    if cmd is None:
        pytest.skip("emrctl.model_cmd is not in this tree yet")
    assert isinstance(cmd, click.Group) and "model" in cli.list_commands(ctx)


def test_emrctl_never_imports_torch():
    code = "import emrctl.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    code = ("import sys; from click.testing import CliRunner; from emrctl.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_status_subprocess_answers_well_under_a_second(block):
    best = float("inf")
    for _ in range(5):  # best of five: the first run may pay for cold page caches, a busy host for a slice
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "emrctl", "--instance", block.instance, "status"],
                           capture_output=True, text=True, cwd=REPO, timeout=30)
        best = min(best, time.perf_counter() - t0)
        assert p.returncode == 0, p.stderr
        assert "ENGINE" in p.stdout
    # Well under a second on an idle host (~0.3 s); CI shares its 2 cores with daemons still stopping.
    assert best < 2.0, f"emrctl status took {best:.2f} s"
