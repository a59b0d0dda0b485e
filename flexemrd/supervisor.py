"""Supervisor: forks, pins, watches and stops the workers of one flexemr host.

Shape follows gunicorn's arbiter: signal handlers only queue the signal (and
wake the loop through ``signal.set_wakeup_fd``); the main loop drains the
queue and calls ``handle_<name>``; every child reports READY (or a boot
error) over a pipe, and systemd hears READY=1 only after all did.

The loop never blocks on a child.  Booting is state the loop polls::

    spawn ──▶ booting (deadline) ──READY──▶ ready ──heartbeat older than timeout──▶ SIGKILL
                 │                            │                                     │
                 ├─ERROR / EOF / deadline─▶ halt, exit 3                             │
                 │                            └──exits──▶ restart_at (backoff) ◀─────┘
                 └─(only the boot pipe is read; on_tick keeps serving emrctl)

Each iteration waits at most ``TICK_S`` in ``select`` on the wakeup fd and
the booting children's pipes, then reaps, reads boot pipes, checks heartbeats,
spawns due restarts and runs ``on_tick`` (the emrctl mailbox).  So a restart
whose READY takes minutes does not stop ``emrctl status`` from answering.

Liveness is gunicorn's: each child gets an unlinked temp file
(``process.HeartbeatFile``) whose mtime its ``ReadyPipe.beat()`` bumps; a
ready child whose beat is older than its heartbeat timeout is SIGKILLed (a
SIGSTOPped process would ignore SIGTERM until continued) and restarted through
the normal path, with backoff and restart counts.

A worker that dies after it was ready is restarted with backoff; one that
cannot boot stops the daemon with its message instead of a restart loop, and
the other workers are stopped gracefully (the inference process removes its
socket file).  The supervisor creates and alone unlinks every shared-memory
segment and semaphore (``Resources``), so nothing is left behind whichever
child dies.  It imports neither torch nor pyverbs: children import them after
the fork.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import queue
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable

from flexemrd.process import HeartbeatFile, ReadyPipe, die_with_parent, pin_to_cpu, sd_notify, set_process_name

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BOOT_ERROR = 3       # a worker could not start: fix the config/model, do not restart
EXIT_WORKER_FAILED = 4    # a worker kept dying after it had been ready
BOOT_TIMEOUT_S = 300.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5
TICK_S = 0.2              # longest the loop sleeps: on_tick runs at least this often
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)


@dataclasses.dataclass
class Boot:
    """A child between fork and READY: our end of its readiness pipe."""

    fd: int
    deadline: float                            # monotonic: a boot error after this
    started: float
    buf: bytes = b""


@dataclasses.dataclass
class ChildSpec:
    """What to run in one worker process, and the supervisor's state of it."""

    name: str                                  # "engine[0]", "inference", "embedding[1]"
    target: Callable[[ReadyPipe], None]        # runs in the child; calls ready() once serving, beat() while it does
    cpu: int | None = None
    stop_order: int = 0                        # lower stops first (inference drains before engines)
    keep_fds: tuple[int, ...] = ()             # inherited descriptors this child uses
    heartbeat_timeout_s: float | None = None   # None: the supervisor's; 0: never killed for a missed beat
    # ---- state (the supervisor's, never set by callers)
    pid: int = 0
    ready: bool = False
    stopping: bool = False
    restarts: list[float] = dataclasses.field(default_factory=list)
    restart_at: float = 0.0
    boot: Boot | None = None                   # set while the child boots
    heartbeat: HeartbeatFile | None = None     # this process's heartbeat file
    killed_for: str = ""                       # why the supervisor killed it ("" when it died by itself)

    @property
    def booting(self) -> bool:
        return self.boot is not None

    @property
    def state(self) -> str:
        """For status (the control block's EngineState names): starting, ready, stopping, restarting, dead."""
        if self.stopping:
            return "stopping"
        if self.pid == 0:
            return "restarting" if self.restart_at else "dead"
        return "starting" if self.boot is not None else "ready"


class Supervisor:
    """The main loop of one host: children, signals, restarts, liveness.

    ``on_signal(name)`` (``"SIGHUP"``, ...) is offered every signal but SIGCHLD
    first; when it returns True the signal is handled, else ``handle_<name>``
    runs.  This is how SIGHUP reaches the control dispatcher without patching.
    """

    def __init__(
        self,
        children: list[ChildSpec],
        create_resources: Callable[[], None] = lambda: None,
        unlink_resources: Callable[[], None] = lambda: None,
        graceful_timeout_s: float = 10.0,
        on_ready: Callable[[Supervisor], None] | None = None,
        on_tick: Callable[[Supervisor], None] | None = None,
        on_child_exit: Callable[[ChildSpec, int], None] | None = None,
        shared_fds: tuple[int, ...] = (),
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        boot_timeout_s: float = BOOT_TIMEOUT_S,
        on_signal: Callable[[str], bool] | None = None,
    ) -> None:
        self.children = children
        self.create_resources = create_resources
        self.unlink_resources = unlink_resources
        self.graceful_timeout_s = graceful_timeout_s
        self.on_ready = on_ready
        self.on_tick = on_tick                    # every iteration once all children were first ready
        self.on_child_exit = on_child_exit
        self.on_signal = on_signal
        self.shared_fds = shared_fds              # inherited sockets each child closes unless it keeps them
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.boot_timeout_s = boot_timeout_s
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopping = False
        self.booted = False                       # every child reported READY once: on_ready has run
        self.exit_code = EXIT_OK
        self.started = time.monotonic()
        self._wake_r = self._wake_w = -1
        self._old_wakeup = -1
        self._old_handlers: dict[int, Any] = {}     # what run() replaced: put back when it returns

    # ------------------------------------------------------------ children

    def spawn(self, child: ChildSpec) -> None:
        """Fork ``child``; it boots while the loop goes on (see ``poll_boots``)."""
        # Our ends of the other children's pipes and heartbeats: the new child must not hold them.
        ours = [fd for c in self.children if c is not child
                for fd in ((c.boot.fd if c.boot else -1), (c.heartbeat.fd if c.heartbeat else -1)) if fd >= 0]
        if self._wake_r >= 0:
            ours += [self._wake_r, self._wake_w]
        if child.heartbeat is not None:
            child.heartbeat.close()
        child.heartbeat = HeartbeatFile(child.name)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into the supervisor's loop, whatever happens
            code = 1
            try:
                os.close(r)
                code = _run_child(child, ReadyPipe(w, child.heartbeat.fd), self.shared_fds, tuple(ours))
            finally:
                os._exit(code)
        os.close(w)
        os.set_blocking(r, False)
        now = time.monotonic()
        child.pid = pid
        child.ready = False
        child.stopping = False
        child.killed_for = ""
        child.boot = Boot(r, now + self.boot_timeout_s, now)
        logger.info("started %s pid=%d%s", child.name, pid, f" cpu={child.cpu}" if child.cpu is not None else "")

    def poll_boots(self) -> None:
        """Read what the booting children said; a boot error halts the daemon."""
        now = time.monotonic()
        for c in self.children:
            if c.boot is None:
                continue
            err = self._read_boot(c)
            if err is None and c.boot is not None and now > c.boot.deadline:
                err = f"{c.name} did not become ready within {self.boot_timeout_s:g} s"
                self._end_boot(c)
            if err:
                self._boot_failed(err)

    def _read_boot(self, c: ChildSpec, exited: bool = False) -> str | None:
        """Non-blocking read of ``c``'s pipe; returns a boot error message, or None."""
        boot = c.boot
        if boot is None:
            return None
        while True:
            try:
                chunk = os.read(boot.fd, 8192)
            except BlockingIOError:
                if not exited:
                    return None
                chunk = b""  # it exited but something else holds the pipe: treat as EOF
            except InterruptedError:
                continue
            boot.buf += chunk
            if boot.buf.startswith(b"READY"):
                self._end_boot(c)
                c.ready = True
                if c.heartbeat is not None:
                    c.heartbeat.touch()  # the timeout counts from READY, not from the fork
                logger.info("%s pid=%d ready after %.1f s", c.name, c.pid, time.monotonic() - boot.started)
                return None
            if boot.buf.startswith(b"ERROR") and (boot.buf.endswith(b"\n") or not chunk):
                self._end_boot(c)
                return f"{c.name} failed to start: {boot.buf[6:].decode(errors='replace').strip()}"
            if not chunk:
                self._end_boot(c)
                return f"{c.name} exited before it was ready"

    def _end_boot(self, c: ChildSpec) -> None:
        if c.boot is not None:
            os.close(c.boot.fd)
            c.boot = None

    def _boot_failed(self, message: str) -> None:
        if not self.stopping:
            logger.error("%s; stopping", message)
        self.exit_code = EXIT_BOOT_ERROR
        self.stopping = True

    def check_heartbeats(self) -> None:
        """Kill ready children whose heartbeat is older than their timeout (restarted on reap)."""
        for c in self.children:
            if not (c.pid and c.ready and c.heartbeat) or c.stopping or c.killed_for:
                continue
            timeout = self.heartbeat_timeout_s if c.heartbeat_timeout_s is None else c.heartbeat_timeout_s
            if timeout <= 0:
                continue
            age = c.heartbeat.age_s()
            if age > timeout:
                logger.error("%s pid=%d missed its heartbeat for %.1f s; killing", c.name, c.pid, age)
                c.killed_for = f"missed its heartbeat for {age:.1f} s"
                _kill(c.pid, signal.SIGKILL)

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        self._install_signals()
        try:
            try:
                self.create_resources()
            except Exception as e:
                logger.error("cannot create shared resources: %s", e)
                self.unlink_resources()
                return EXIT_BOOT_ERROR
            for c in self.children:
                self.spawn(c)
            while not self.stopping:
                self._wait(TICK_S)
                self._dispatch_signals()
                self.reap()
                self.poll_boots()
                if not self.booted and not self.stopping and all(c.ready for c in self.children):
                    self._on_all_ready()
                self.check_heartbeats()
                self.restart_due()
                if self.booted and self.on_tick and not self.stopping:
                    try:
                        self.on_tick(self)
                    except Exception:
                        logger.exception("supervisor tick failed")
            sd_notify("STOPPING=1")
            self._stop_all()
            self.unlink_resources()
            logger.info("stopped (exit %d)", self.exit_code)
            return self.exit_code
        finally:
            self._restore_signals()

    def _on_all_ready(self) -> None:
        self.booted = True
        sd_notify("READY=1")
        logger.info("all %d workers ready", len(self.children))
        if self.on_ready:
            self.on_ready(self)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal, a boot pipe has something to say, or ``timeout``."""
        fds = [c.boot.fd for c in self.children if c.boot is not None]
        if self._wake_r >= 0:
            fds.append(self._wake_r)
        if not self.signals.empty():
            return
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def _dispatch_signals(self) -> None:
        while True:
            try:
                sig = self.signals.get_nowait()
            except queue.Empty:
                return
            name = signal.Signals(sig).name
            if sig != signal.SIGCHLD and self.on_signal is not None:
                try:
                    if self.on_signal(name):
                        continue
                except Exception:
                    logger.exception("%s handler failed", name)
                    continue
            getattr(self, "handle_" + name[3:].lower(), lambda: None)()

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._old_handlers = {sig: signal.signal(sig, self._queue_signal) for sig in _SIGNALS}

    def _restore_signals(self) -> None:
        """Put back what ``run()`` replaced (an in-process test, or a caller that runs twice)."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers = {}
        if self._wake_w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        for c in self.children:
            if c.heartbeat is not None:
                c.heartbeat.close()
                c.heartbeat = None

    def _queue_signal(self, sig: int, _frame: object) -> None:
        # NO LOGGING here: only queue the signal for the main loop (the wakeup fd wakes it).
        self.signals.put_nowait(sig)

    def handle_term(self) -> None:
        logger.info("SIGTERM: draining and stopping")
        self.stopping = True

    def handle_int(self) -> None:
        logger.info("SIGINT: stopping")
        self.stopping = True

    def handle_quit(self) -> None:
        self.stopping = True

    def handle_hup(self) -> None:
        logger.info("SIGHUP: nothing to reload in this version (log level and cache settings reload through emrctl)")

    def handle_chld(self) -> None:
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            boot_error = self._read_boot(child, exited=True) if child.boot is not None else None
            child.pid = 0
            if self.on_child_exit:
                self.on_child_exit(child, code)
            if child.stopping or self.stopping:
                continue
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
            if boot_error or code == EXIT_BOOT_ERROR or not child.ready:
                self._boot_failed(boot_error or f"{child.name} exited with {code} before it was ready")
                return
            if len(child.restarts) > MAX_RESTARTS_IN_WINDOW:
                logger.error("%s died %d times within %g s; stopping", child.name, len(child.restarts), RESTART_WINDOW_S)
                self.exit_code = EXIT_WORKER_FAILED
                self.stopping = True
                return
            delay = min(30.0, 0.5 * 2 ** (len(child.restarts) - 1))
            child.restart_at = now + delay
            why = f" after it {child.killed_for}" if child.killed_for else ""
            logger.warning("%s (pid %d) exited with %d%s; restarting in %.1f s", child.name, pid, code, why, delay)

    def restart_due(self) -> None:
        """Fork the children whose backoff is over; their boot is polled like the first one."""
        now = time.monotonic()
        for c in self.children:
            if c.pid == 0 and c.restart_at and now >= c.restart_at and not self.stopping:
                c.restart_at = 0.0
                self.spawn(c)

    def _stop_all(self) -> None:
        """Stop children in ``stop_order`` groups: SIGTERM, then SIGKILL after ``graceful_timeout_s``.

        Each group drains before the next stops.  This runs after a boot error
        too, so the inference process can remove its socket file.
        """
        for c in self.children:
            self._end_boot(c)
        for order in sorted({c.stop_order for c in self.children}):
            group = [c for c in self.children if c.stop_order == order and c.pid]
            for c in group:
                c.stopping = True
                _kill(c.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.graceful_timeout_s
            while any(c.pid for c in group) and time.monotonic() < deadline:
                time.sleep(0.02)
                self.reap()
            for c in group:
                if c.pid:
                    logger.warning("%s did not stop within %g s; killing", c.name, self.graceful_timeout_s)
                    _kill(c.pid, signal.SIGKILL)
            while any(c.pid for c in group):
                time.sleep(0.01)
                self.reap()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _run_child(child: ChildSpec, ready: ReadyPipe, shared_fds: tuple[int, ...], supervisor_fds: tuple[int, ...]) -> int:
    """Child side of the fork: signals, descriptors, pinning, then the target."""
    signal.set_wakeup_fd(-1)
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor; it stops us in order
    die_with_parent()
    for fd in supervisor_fds:
        os.close(fd)
    for fd in shared_fds:
        if fd not in child.keep_fds:
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
    set_process_name(f"flexemr-{child.name.replace('embedding', 'emb').replace('engine', 'eng').replace('inference', 'inf')}")
    pin_to_cpu(child.cpu)
    try:
        child.target(ready)
    except SystemExit as e:
        return int(e.code or 0)
    except BaseException as e:
        if ready.fd >= 0:
            ready.fail(f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return EXIT_BOOT_ERROR
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0
