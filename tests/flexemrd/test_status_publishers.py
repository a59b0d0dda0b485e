"""The writers of the embedding-server rows: the supervisor (process facts) and the inference control thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from flexemr.control.block import ControlBlock, EngineState
from flexemrd.control.inference_side import InferenceControl, server_state
from flexemrd.control.supervisor_side import SupervisorControl
from flexemrd.supervisor import ChildSpec, Supervisor


def _serve_until_term(ready) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.ready()
    while not stop.wait(0.05):
        ready.beat()


@pytest.fixture
def block(instance):
    b = ControlBlock.create(instance, 1, 0, [], {"servers": ["127.0.0.1:1", "127.0.0.1:2"],
                                                 "holders": [[0, 1], [1, 0]]})
    yield b
    b.close()
    b.unlink()


def test_supervisor_records_its_embedding_children_and_counts_a_restart(block):
    ctl = SupervisorControl(plan=None, resources=None)
    ctl.block = block
    seen: dict[str, object] = {}

    def on_tick(sup: Supervisor) -> None:
        ctl._record_children(sup)          # what SupervisorControl.tick does once a second
        s1 = block.servers[1].process.read()
        if "first" not in seen:
            seen["first"] = {i: block.servers[i].process.read() for i in (0, 1)}
            os.kill(s1["pid"], signal.SIGKILL)
        elif s1["state"] != EngineState.READY and "dead" not in seen:
            seen["dead"] = s1
        elif "dead" in seen and s1["state"] == EngineState.READY and s1["pid"] != seen["first"][1]["pid"]:
            seen["back"] = s1
            os.kill(os.getpid(), signal.SIGTERM)
        elif time.monotonic() - sup.started > 60:
            os.kill(os.getpid(), signal.SIGTERM)

    sup = Supervisor([ChildSpec("embedding[0]", _serve_until_term), ChildSpec("embedding[1]", _serve_until_term)],
                     on_ready=ctl.on_ready, on_tick=on_tick, on_child_exit=ctl.on_child_exit, graceful_timeout_s=5)
    sup.run()
    first, dead, back = seen["first"], seen.get("dead"), seen.get("back")
    assert first[0]["pid"] > 0 and first[1]["pid"] > 0 and first[0]["restarts"] == first[1]["restarts"] == 0
    assert dead is not None and dead["pid"] == 0 and dead["restarts"] == 1
    assert back is not None and back["restarts"] == 1 and back["started_ns"] > first[1]["started_ns"]
    snap = block.snapshot()["servers"]
    # a graceful stop is not a restart
    assert [(s["process"], s["pid"], s["restarts"]) for s in snap] == [("stopping", 0, 0), ("stopping", 0, 1)]


def test_inference_side_publishes_the_ranker_view_of_each_server(block, instance):
    def health(state: str, conns: int, outstanding: int = 0) -> dict:
        return {"server": 0, "address": "127.0.0.1:1", "state": state, "outstanding": outstanding,
                "reason": "", "connections_up": conns}

    assert server_state(health("up", 2)) == "up"
    assert server_state(health("down", 0)) == "reconnecting"   # every connection lost: engines reconnect
    assert server_state(health("down", 1)) == "down"           # connected, but marked down after timeouts
    ctl = InferenceControl(instance)
    ctl.block = ControlBlock.attach(instance)
    try:
        ctl._publish_servers([health("up", 2, outstanding=5), {**health("down", 0), "server": 1},
                              {**health("up", 1), "server": 7}])          # unknown index: ignored
        first = block.snapshot()["servers"]
        assert [(s["state"], s["outstanding"], s["connections_up"]) for s in first] == [
            ("up", 5, 2), ("reconnecting", 0, 0)]
        changed = block.servers[0].stats.read()["changed_ns"]
        ctl._publish_servers([health("up", 2, outstanding=1), {**health("up", 1), "server": 1}])
        # changed_ns moves only when the state does
        assert block.servers[0].stats.read()["changed_ns"] == changed
        assert block.servers[1].stats.read()["changed_ns"] > changed
        assert block.snapshot()["shards"] == {"0": 2, "1": 2}
    finally:
        ctl.block.close()
