"""``emrctl status`` with embedding servers: the servers block, the shard line, ``--json``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from emrctl.cli import cli
from emrctl.render import WIDTH, shards_line
from flexemr.control.block import ControlBlock

TOPO = {"instance": "t", "mode": "local",
        "servers": [{"name": "embedding[0]", "address": "127.0.0.1:41001"},
                    {"name": "embedding[1]", "address": "127.0.0.1:41002"},
                    {"name": "embedding[2]", "address": "embedding-host-with-a-very-long-name.example.com:7002"}],
        "holders": [[0, 1], [1, 2], [2, 0]], "replicas": 2}


@pytest.fixture
def block(instance) -> Iterator[ControlBlock]:
    """3 servers, server 1 killed: its process restarting, the ranker reconnecting to it."""
    b = ControlBlock.create(instance, 2, 3, ["t0"], TOPO)
    now = time.monotonic_ns()
    for s, pid in ((0, 31001), (2, 31003)):
        b.servers[s].set_process(pid=pid, state="ready", started_ns=now)
        b.servers[s].update(state="up", outstanding=12_345, connections_up=1, changed_ns=now)
    b.servers[1].set_process(pid=0, state="restarting", restarts=1)
    b.servers[1].update(state="reconnecting", outstanding=0, connections_up=0, changed_ns=now)
    b.ranker.update(failovers_total=213, reissued_total=2, hedges_sent=7, hedges_won=3)
    yield b
    b.close()
    b.unlink()


def status(block: ControlBlock, *args: str) -> str:
    r = CliRunner().invoke(cli, ["--instance", block.instance, "status", *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_servers_block_fits_100_columns_with_one_server_down(block):
    text = status(block)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, text
    i = lines.index("embedding servers")
    assert lines[i + 1].split() == ["SERVER", "ADDRESS", "STATE", "PROC", "PID", "RESTARTS", "OUTSTANDING",
                                    "CONNS"]
    assert lines[i + 2].split() == ["0", "127.0.0.1:41001", "up", "ready", "31001", "0", "12345", "1"]
    assert lines[i + 3].split() == ["1", "127.0.0.1:41002", "reconnecting", "restarting", "-", "1", "0", "0"]
    assert lines[i + 4].split()[:3] == ["2", "embedding-host-with-a-…", "up"]   # cut, not dropped
    assert lines[i + 5] == "shards: 3 groups, 2 short of 2 live replicas: group 0 1/2 live, group 1 1/2 live"
    assert lines[i + 6] == "failover: 213 subrequests to replicas, 2 re-issued, hedges 7 sent / 3 won"


def test_servers_all_up_say_so(block):
    block.servers[1].update(state="up", connections_up=1)
    assert "shards: 3 groups, all with ≥2 live replicas" in status(block)


def test_a_group_with_no_live_holder_is_called_unavailable():
    snap = {"shards": {"0": 2, "1": 0, "2": 1}, "replicas": 2}
    assert shards_line(snap) == ("shards: 3 groups, 2 short of 2 live replicas: group 1 0/2 live (unavailable), "
                                 "group 2 1/2 live")
    assert shards_line({"shards": {"0": 1}, "replicas": 1}) == "shards: 1 groups, all with ≥1 live replica"


def test_json_lists_servers_shards_and_failover(block):
    snap = json.loads(status(block, "--json"))
    assert [(s["id"], s["state"], s["pid"], s["restarts"]) for s in snap["servers"]] == [
        (0, "up", 31001, 0), (1, "reconnecting", 0, 1), (2, "up", 31003, 0)]
    for s in snap["servers"]:
        assert {"id", "address", "state", "pid", "restarts", "outstanding", "connections_up"} <= s.keys()
    assert snap["servers"][1]["address"] == "127.0.0.1:41002"
    assert snap["shards"] == {"0": 1, "1": 1, "2": 2}
    assert snap["ranker"]["failover"] == {"reissued": 2, "hedges_sent": 7, "hedges_won": 3, "failovers": 213}
    # the DESIGN.md contract keys keep their meaning
    assert [e["id"] for e in snap["engines"]] == [0, 1]
    assert {"id", "server", "engine", "queued", "credits"} <= snap["connections"][0].keys()
    assert {"policy", "capacity_bytes", "used_bytes", "hit_rate"} <= snap["cache"].keys()


def test_a_ranker_without_servers_shows_no_servers_block(instance):
    b = ControlBlock.create(instance, 1, 0, ["t0"], {"servers": []})
    try:
        text = status(b)
        assert "embedding servers" not in text and "shards:" not in text
        assert json.loads(status(b, "--json"))["servers"] == []
    finally:
        b.close()
        b.unlink()
