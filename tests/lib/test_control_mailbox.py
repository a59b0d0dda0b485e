"""Command mailbox: round trips across processes, and the failure modes that must not wedge it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from flexemr.control import mailbox as mb
from flexemr.control.block import ControlBlock, InstanceNotRunning
from flexemr.control.mailbox import ControlTimeout, MailboxClient, MailboxServer


@pytest.fixture
def block(instance):
    b = ControlBlock.create(instance, 1, 1, [], {})
    yield b
    b.close()
    b.unlink()


def _handler(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("cmd") == "slow":
        time.sleep(request.get("sleep", 0.5))
    if request.get("cmd") == "boom":
        raise RuntimeError("handler bug")
    return {"status": "ok", "echo": request, "pid": os.getpid()}


@contextmanager
def serving(block: ControlBlock, handler: Callable[[dict[str, Any]], Any] = _handler) -> Iterator[MailboxServer]:
    """A server thread, as the supervisor's loop would run it."""
    server = MailboxServer(block)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.serve_one(handler, 0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield server
    finally:
        stop.set()
        t.join(5)
        server.close()


def _serve_in_child(instance: str, n: int) -> None:
    b = ControlBlock.attach(instance)
    server = MailboxServer(b)
    served = 0
    deadline = time.monotonic() + 10
    while served < n and time.monotonic() < deadline:
        served += server.serve_one(_handler, 0.05)
    server.close()
    b.close()
    os._exit(0 if served == n else 1)


def test_round_trip_across_processes(block, instance):
    proc = multiprocessing.get_context("fork").Process(target=_serve_in_child, args=(instance, 20))
    proc.start()
    client = MailboxClient(ControlBlock.attach(instance))
    try:
        for i in range(20):
            r = client.request({"cmd": "status", "i": i}, timeout=5)
            assert r["echo"] == {"cmd": "status", "i": i} and r["pid"] == proc.pid
    finally:
        client.close()
        proc.join(5)
    assert proc.exitcode == 0


def test_handler_exception_and_malformed_request_become_error_results(block):
    with serving(block):
        client = MailboxClient(block)
        assert client.request({"cmd": "boom"}) == {"status": "error", "error": "RuntimeError: handler bug"}
        # a request that is not a JSON object, written by hand
        a = client._a
        seq = int(a.w[mb.REQ_SEQ]) + 1
        a.mm[a.req_lo:a.req_lo + 3] = b"[1]"
        a.w[mb.REQ_LEN] = 3
        a.w[mb.REQ_SEQ] = seq
        a.ready.release()
        deadline = time.monotonic() + 2
        while int(a.w[mb.RESP_SEQ]) != seq and time.monotonic() < deadline:
            time.sleep(0.01)
        raw = bytes(a.mm[a.resp_lo:a.resp_lo + int(a.w[mb.RESP_LEN])])
        assert b"malformed request" in raw
        assert client.request({"cmd": "ok"})["echo"] == {"cmd": "ok"}
        client.close()


def test_no_server_times_out_with_a_clear_message(block):
    client = MailboxClient(block)
    t0 = time.monotonic()
    with pytest.raises(ControlTimeout, match=r"the daemon did not answer within 0.3 s \(it is not serving"):
        client.request({"cmd": "status"}, timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    # the abandoned request is answered once a server runs; the next client still gets its own answer
    with serving(block):
        assert client.request({"cmd": "next"})["echo"] == {"cmd": "next"}
    client.close()


def test_stale_response_is_discarded(block):
    with serving(block):
        client = MailboxClient(block)
        with pytest.raises(ControlTimeout, match="did not answer within 0.2 s"):
            client.request({"cmd": "slow", "sleep": 0.6}, timeout=0.2)
        # the slow answer arrives while we wait: it must not be taken for ours
        r = client.request({"cmd": "fast", "n": 2}, timeout=5)
        assert r["echo"] == {"cmd": "fast", "n": 2}
        client.close()


def _client_in_child(instance: str) -> None:
    b = ControlBlock.attach(instance)
    MailboxClient(b).request({"cmd": "slow", "sleep": 0.5}, timeout=30)
    os._exit(0)


def test_client_killed_mid_request_does_not_wedge_the_mailbox(block, instance):
    with serving(block) as server:
        proc = multiprocessing.get_context("fork").Process(target=_client_in_child, args=(instance,))
        proc.start()
        a = MailboxClient(block)._a
        deadline = time.monotonic() + 5
        while int(a.w[mb.HOLDER_PID]) != proc.pid and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # dies holding the mutex, waiting for its answer
        proc.join(5)
        client = MailboxClient(block)
        t0 = time.monotonic()
        assert client.request({"cmd": "after"}, timeout=5)["echo"] == {"cmd": "after"}
        assert time.monotonic() - t0 < 3
        assert int(a.w[mb.BROKEN_LEASES]) == 1 and server.served_total >= 2
        client.close()


def test_client_killed_right_after_taking_the_mutex(block, monkeypatch):
    monkeypatch.setattr(mb, "ANON_HOLD_S", 0.2)
    with serving(block):
        client = MailboxClient(block)
        client._a.mutex.acquire()  # as if a client died before storing its pid
        assert client.request({"cmd": "x"}, timeout=3)["echo"] == {"cmd": "x"}
        # and one that died after storing a pid that no longer exists
        client._a.mutex.acquire()
        client._a.w[mb.HOLDER_PID] = _dead_pid()
        client._a.w[mb.HOLDER_DEADLINE] = time.monotonic_ns() + 60 * 10**9
        assert client.request({"cmd": "y"}, timeout=3)["echo"] == {"cmd": "y"}
        client.close()


def test_concurrent_clients_each_get_their_own_answer(block, instance):
    with serving(block):
        errors: list[str] = []

        def one(k: int) -> None:
            c = MailboxClient(block)
            for i in range(10):
                r = c.request({"cmd": "t", "k": k, "i": i}, timeout=5)
                if r["echo"] != {"cmd": "t", "k": k, "i": i}:
                    errors.append(f"{k}/{i}: {r}")
            c.close()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []


def test_request_to_a_dead_supervisor_says_not_running(instance):
    b = ControlBlock.create(instance, 1, 1, [], {}, supervisor_pid=_dead_pid())
    try:
        with pytest.raises(InstanceNotRunning, match="supervisor pid .* is gone"):
            MailboxClient(b).request({"cmd": "status"})
    finally:
        b.close()
        b.unlink()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
