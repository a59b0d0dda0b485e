"""Supervisor behaviour with real forks of small targets (no torch, no sockets)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from flexemrd.supervisor import EXIT_BOOT_ERROR, EXIT_OK, ChildSpec, Supervisor


def _serve_until_term(ready) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.ready()
    stop.wait(30)


def _boot_fails(ready) -> None:
    raise RuntimeError("model directory /nope is missing")


def _workers_left() -> list[psutil.Process]:
    """Children of this test process other than multiprocessing's resource tracker.

    An earlier test in the same session (shared memory) may have started the
    tracker; it is this process's child for the rest of the session, not a worker.
    """
    from multiprocessing import resource_tracker
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return [c for c in psutil.Process().children() if c.pid != tracker]


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
    assert not _workers_left(), "no worker is left running"


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


# ---------------------------------------------------------------- non-blocking restarts and heartbeats


def _beating(ready, stop: threading.Event) -> None:
    """A worker main loop: beat while serving (at least once a second, as workers must)."""
    while not stop.is_set():
        ready.beat()
        stop.wait(0.05)


def _second_run(marker) -> bool:
    """True in the restarted process (the first run leaves ``marker`` behind)."""
    if marker.exists():
        return True
    marker.write_text("first run")
    return False


def test_a_slow_restart_does_not_stop_the_loop_from_ticking(tmp_path):
    """READY comes 5 s after the restart; on_tick (emrctl's mailbox) keeps running throughout."""
    marker = tmp_path / "started"

    def target(ready):
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if _second_run(marker):
            time.sleep(5.0)
        ready.ready()
        _beating(ready, stop)

    pids: list[int] = []
    ticks: list[tuple[float, bool]] = []   # (when, the child was booting)
    states: list[str] = []

    def on_ready(sup):
        pids.append(sup.children[0].pid)
        os.kill(pids[0], signal.SIGKILL)

    def tick(sup):
        c = sup.children[0]
        ticks.append((time.monotonic(), c.booting))
        if not states or states[-1] != c.state:
            states.append(c.state)
        if c.pid and c.ready and c.pid not in pids:
            pids.append(c.pid)
            os.kill(os.getpid(), signal.SIGTERM)

    sup = Supervisor([ChildSpec("engine[0]", target)], on_ready=on_ready, on_tick=tick, graceful_timeout_s=5)
    assert sup.run() == EXIT_OK
    assert len(pids) == 2, "the killed worker was restarted and became ready"
    booting = [t for t, b in ticks if b]
    assert booting and booting[-1] - booting[0] > 4.0, "ticks ran while the restarted worker booted"
    gaps = np.diff([t for t, _ in ticks])
    assert gaps.max() < 1.0, f"the loop stalled for {gaps.max():.1f} s during the restart"
    assert len(booting) > 15
    assert states == ["ready", "restarting", "starting", "ready"], "what emrctl status can show, in order"


@pytest.mark.parametrize("how", ["stops-beating", "sigstop"])
def test_a_worker_that_stops_beating_is_killed_and_restarted(tmp_path, caplog, how):
    marker = tmp_path / "started"

    def target(ready):
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        ready.ready()
        if not _second_run(marker) and how == "stops-beating":
            t_end = time.monotonic() + 0.5
            while time.monotonic() < t_end:
                ready.beat()
                time.sleep(0.05)
            stop.wait(30)              # alive, but its loop no longer beats: hung
            return
        _beating(ready, stop)

    pids: list[int] = []
    restarted_at: list[float] = []

    def on_ready(sup):
        pids.append(sup.children[0].pid)
        if how == "sigstop":
            os.kill(pids[0], signal.SIGSTOP)   # SIGTERM would not reach it: only SIGKILL does

    def tick(sup):
        c = sup.children[0]
        if c.pid and c.ready and c.pid not in pids:
            pids.append(c.pid)
            restarted_at.append(time.monotonic())
            # Let the new worker prove it stays alive past one timeout while it beats.
            threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()

    sup = Supervisor([ChildSpec("engine[0]", target)], on_ready=on_ready, on_tick=tick,
                     heartbeat_timeout_s=1.0, graceful_timeout_s=5)
    t0 = time.monotonic()
    assert sup.run() == EXIT_OK
    assert len(pids) == 2, f"expected one restart, saw pids {pids}"
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    assert re.search(rf"engine\[0\] pid={pids[0]} missed its heartbeat for 1\.\d s; killing", caplog.text)
    assert "restarting in 0.5 s" in caplog.text, "the restart goes through the normal backoff"
    assert len(sup.children[0].restarts) == 1, "the kill counts as a restart"
    assert restarted_at[0] - t0 < 6.0
    assert caplog.text.count("; killing") == 1, "the restarted worker, which beats, is left alone"


def test_a_boot_error_stops_the_other_workers_gracefully(tmp_path):
    """Exit 3 after SIGTERM reached the healthy worker (so the inference process can remove its socket)."""
    drained = tmp_path / "drained"

    def healthy(ready):
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        ready.ready()
        _beating(ready, stop)
        drained.write_text("cleaned up on SIGTERM")

    def slow_then_fails(ready):
        time.sleep(0.5)
        raise RuntimeError("dense.pt does not match model.toml")

    sup = Supervisor([ChildSpec("inference", healthy), ChildSpec("engine[0]", slow_then_fails, stop_order=1)],
                     graceful_timeout_s=5)
    assert sup.run() == EXIT_BOOT_ERROR
    assert drained.exists(), "the healthy worker was stopped with SIGTERM, not SIGKILL"
    assert not _workers_left()


def test_a_worker_that_never_becomes_ready_is_a_boot_error(caplog):
    def hangs(ready):
        time.sleep(30)

    sup = Supervisor([ChildSpec("engine[0]", hangs)], boot_timeout_s=1.0, graceful_timeout_s=2)
    t0 = time.monotonic()
    assert sup.run() == EXIT_BOOT_ERROR
    assert time.monotonic() - t0 < 6
    assert "engine[0] did not become ready within 1 s" in caplog.text


def test_sighup_goes_to_on_signal_without_patching_the_supervisor():
    seen: list[str] = []

    def on_signal(name: str) -> bool:
        seen.append(name)
        if name == "SIGHUP":
            os.kill(os.getpid(), signal.SIGTERM)
            return True
        return False                       # SIGTERM: the supervisor's own handle_term stops it

    sup = Supervisor([ChildSpec("engine[0]", _serve_until_term)], on_signal=on_signal,
                     on_ready=lambda s: os.kill(os.getpid(), signal.SIGHUP), graceful_timeout_s=5,
                     heartbeat_timeout_s=0)
    assert sup.run() == EXIT_OK
    assert seen[:2] == ["SIGHUP", "SIGTERM"]


def test_beat_is_cheap_in_a_hot_loop_and_moves_the_heartbeat():
    from flexemrd.process import HeartbeatFile, ReadyPipe

    hb = HeartbeatFile("engine[9]")
    try:
        os.utime(hb.fd, ns=(0, 0))                       # "last beat at boot of the clock"
        assert hb.age_s() > 1.0
        pipe = ReadyPipe(-1, hb.fd)
        t0 = time.perf_counter()
        for _ in range(200_000):
            pipe.beat()
        assert time.perf_counter() - t0 < 1.0, "beat() is rate-limited, not a syscall per call"
        assert hb.age_s() < 0.5
        ReadyPipe(-1).beat()                             # no supervisor watching: a no-op
    finally:
        hb.close()
