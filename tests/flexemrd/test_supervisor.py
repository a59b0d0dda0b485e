"""Supervisor behaviour with real forks of small targets (no torch, no sockets)."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from flexemrd.supervisor import EXIT_BOOT_ERROR, EXIT_OK, ChildSpec, Supervisor


def _serve_until_term(ready) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.ready()
    stop.wait(30)


def _boot_fails(ready) -> None:
    raise RuntimeError("model directory /nope is missing")


def _stop_after(sup: Supervisor, seconds: float) -> None:
    threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()


def test_boot_error_halts_with_the_workers_message_instead_of_restarting(caplog):
    created, unlinked = [], []
    sup = Supervisor([ChildSpec("ok", _serve_until_term), ChildSpec("bad", _boot_fails)],
                     create_resources=lambda: created.append(1), unlink_resources=lambda: unlinked.append(1),
                     graceful_timeout_s=5)
    t0 = time.monotonic()
    code = sup.run()
    assert code == EXIT_BOOT_ERROR
    assert time.monotonic() - t0 < 10
    assert "bad failed to start: RuntimeError: model directory /nope is missing" in caplog.text
    assert created == [1] and unlinked == [1], "resources are unlinked even after a boot error"
    assert not psutil.Process().children(), "no worker is left running"


def test_ready_only_after_every_worker_and_term_stops_in_order():
    order: list[str] = []
    ready_at = []

    def slow_ready(name, delay):
        def target(ready):
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            time.sleep(delay)
            ready.ready()
            stop.wait(30)
        return target

    children = [ChildSpec("inference", slow_ready("inference", 0.5), stop_order=0),
                ChildSpec("engine[0]", slow_ready("engine", 0.1), stop_order=1)]

    def on_exit(child, code):
        order.append(child.name)

    sup = Supervisor(children, on_ready=lambda s: (ready_at.append(time.monotonic()), _stop_after(s, 0.3)),
                     on_child_exit=on_exit, graceful_timeout_s=5)
    t0 = time.monotonic()
    assert sup.run() == EXIT_OK
    assert ready_at and ready_at[0] - t0 >= 0.5, "READY waits for the slowest worker"
    assert order == ["inference", "engine[0]"], "the inference process drains before engines stop"


def test_a_worker_that_dies_after_ready_is_restarted():
    pids: list[int] = []
    sup_holder = {}

    def on_ready(sup):
        sup_holder["sup"] = sup
        pids.append(sup.children[0].pid)
        os.kill(sup.children[0].pid, signal.SIGKILL)

    def tick(sup):
        c = sup.children[0]
        if c.pid and c.ready and c.pid not in pids:
            pids.append(c.pid)
            os.kill(os.getpid(), signal.SIGTERM)

    sup = Supervisor([ChildSpec("engine[0]", _serve_until_term)], on_ready=on_ready, on_tick=tick, graceful_timeout_s=5)
    t0 = time.monotonic()
    assert sup.run() == EXIT_OK
    assert len(pids) == 2 and pids[0] != pids[1], "a new process replaced the killed one"
    assert time.monotonic() - t0 < 10
