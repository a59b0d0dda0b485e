"""Supervisor: forks, pins, watches and stops the workers of one flexemr host.

Shape follows gunicorn's arbiter: signal handlers only queue the signal; the
main loop drains the queue and calls ``handle_<name>``; every child reports
READY (or a boot error) over a pipe, and systemd hears READY=1 only after all
did.  A worker that dies after it was ready is restarted with backoff; one
that cannot boot stops the daemon with its message instead of a restart loop.

The supervisor creates and alone unlinks every shared-memory segment and
semaphore (``Resources``), so nothing is left behind whichever child dies.
It imports neither torch nor pyverbs: children import them after the fork.
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
from typing import Callable

from flexemrd.procutil import die_with_parent, pin_to_cpu, sd_notify, set_process_name

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BOOT_ERROR = 3       # a worker could not start: fix the config/model, do not restart
EXIT_WORKER_FAILED = 4    # a worker kept dying after it had been ready
BOOT_TIMEOUT_S = 300.0
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5


class ReadyPipe:
    """The child's end of its readiness pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ready(self) -> None:
        os.write(self.fd, b"READY\n")
        os.close(self.fd)
        self.fd = -1

    def fail(self, message: str) -> None:
        if self.fd >= 0:
            os.write(self.fd, b"ERROR " + message.encode()[:4000] + b"\n")
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass
class ChildSpec:
    """What to run in one worker process."""

    name: str                                  # "engine[0]", "inference", "embedding[1]"
    target: Callable[[ReadyPipe], None]        # runs in the child; calls ready() once serving
    cpu: int | None = None
    stop_order: int = 0                        # lower stops first (inference drains before engines)
    keep_fds: tuple[int, ...] = ()             # inherited descriptors this child uses
    pid: int = 0
    ready: bool = False
    stopping: bool = False
    restarts: list[float] = dataclasses.field(default_factory=list)
    restart_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        children: list[ChildSpec],
        create_resources: Callable[[], None] = lambda: None,
        unlink_resources: Callable[[], None] = lambda: None,
        graceful_timeout_s: float = 10.0,
        on_ready: Callable[["Supervisor"], None] | None = None,
        on_tick: Callable[["Supervisor"], None] | None = None,
        on_child_exit: Callable[[ChildSpec, int], None] | None = None,
        shared_fds: tuple[int, ...] = (),
    ) -> None:
        self.children = children
        self.create_resources = create_resources
        self.unlink_resources = unlink_resources
        self.graceful_timeout_s = graceful_timeout_s
        self.on_ready = on_ready
        self.on_tick = on_tick
        self.on_child_exit = on_child_exit
        self.shared_fds = shared_fds              # inherited sockets each child closes unless it keeps them
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopping = False
        self.exit_code = EXIT_OK
        self.started = time.monotonic()

    # ------------------------------------------------------------ children

    def spawn(self, child: ChildSpec) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(r)
            code = _run_child(child, w, self.shared_fds)
            os._exit(code)
        os.close(w)
        child.pid = pid
        child.ready = False
        child.stopping = False
        child._ready_fd = r  # type: ignore[attr-defined]
        logger.info("started %s pid=%d%s", child.name, pid, f" cpu={child.cpu}" if child.cpu is not None else "")
        return r

    def _wait_ready(self, children: list[ChildSpec], timeout: float) -> str | None:
        """Wait for READY from each; returns the first boot error message, if any."""
        fds = {c._ready_fd: c for c in children}  # type: ignore[attr-defined]
        bufs = {fd: b"" for fd in fds}
        deadline = time.monotonic() + timeout
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"{', '.join(c.name for c in fds.values())} did not become ready within {timeout:g} s"
            try:
                readable, _, _ = select.select(list(fds), [], [], min(left, 0.5))
            except InterruptedError:
                continue
            for fd in readable:
                chunk = os.read(fd, 8192)
                bufs[fd] += chunk
                c = fds[fd]
                if bufs[fd].startswith(b"READY"):
                    c.ready = True
                    os.close(fd)
                    del fds[fd]
                elif bufs[fd].startswith(b"ERROR") and (bufs[fd].endswith(b"\n") or not chunk):
                    os.close(fd)
                    del fds[fd]
                    return f"{c.name} failed to start: {bufs[fd][6:].decode(errors='replace').strip()}"
                elif not chunk:
                    os.close(fd)
                    del fds[fd]
                    return f"{c.name} exited before it was ready"
        return None

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        self._install_signals()
        try:
            self.create_resources()
        except Exception as e:
            logger.error("cannot create shared resources: %s", e)
            self.unlink_resources()
            return EXIT_BOOT_ERROR
        for c in self.children:
            self.spawn(c)
        err = self._wait_ready(self.children, BOOT_TIMEOUT_S)
        if err:
            logger.error("%s; stopping", err)
            self.exit_code = EXIT_BOOT_ERROR
            self._stop_all(graceful=False)
            self.unlink_resources()
            return self.exit_code
        sd_notify("READY=1")
        logger.info("all %d workers ready", len(self.children))
        if self.on_ready:
            self.on_ready(self)
        while not self.stopping:
            try:
                sig = self.signals.get(timeout=0.2)
            except queue.Empty:
                sig = None
            if sig is not None:
                name = signal.Signals(sig).name.lower()
                getattr(self, "handle_" + name[3:], lambda: None)()
            self.reap()
            self.restart_due()
            if self.on_tick and not self.stopping:
                try:
                    self.on_tick(self)
                except Exception:
                    logger.exception("supervisor tick failed")
        sd_notify("STOPPING=1")
        self._stop_all(graceful=self.exit_code == EXIT_OK or self.exit_code == EXIT_WORKER_FAILED)
        self.unlink_resources()
        logger.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, sig: int, _frame) -> None:
        # NO LOGGING here: only queue the signal for the main loop.
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
            child.pid = 0
            if self.on_child_exit:
                self.on_child_exit(child, code)
            if child.stopping or self.stopping:
                continue
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
            if code == EXIT_BOOT_ERROR or not child.ready:
                logger.error("%s exited with %d before it was ready; stopping", child.name, code)
                self.exit_code = EXIT_BOOT_ERROR
                self.stopping = True
                return
            if len(child.restarts) > MAX_RESTARTS_IN_WINDOW:
                logger.error("%s died %d times within %g s; stopping", child.name, len(child.restarts), RESTART_WINDOW_S)
                self.exit_code = EXIT_WORKER_FAILED
                self.stopping = True
                return
            delay = min(30.0, 0.5 * 2 ** (len(child.restarts) - 1))
            child.restart_at = now + delay
            logger.warning("%s (pid %d) exited with %d; restarting in %.1f s", child.name, pid, code, delay)

    def restart_due(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.pid == 0 and c.restart_at and now >= c.restart_at and not self.stopping:
                c.restart_at = 0.0
                self.spawn(c)
                err = self._wait_ready([c], BOOT_TIMEOUT_S)
                if err:
                    logger.error("%s; stopping", err)
                    self.exit_code = EXIT_BOOT_ERROR
                    self.stopping = True

    def _stop_all(self, graceful: bool) -> None:
        """Stop children in ``stop_order`` groups: each group drains before the next stops."""
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        for order in sorted({c.stop_order for c in self.children}):
            group = [c for c in self.children if c.stop_order == order and c.pid]
            for c in group:
                c.stopping = True
                _kill(c.pid, sig)
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


def _run_child(child: ChildSpec, ready_fd: int, shared_fds: tuple[int, ...]) -> int:
    """Child side of the fork: signals, pinning, then the target."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor; it stops us in order
    die_with_parent()
    for fd in shared_fds:
        if fd not in child.keep_fds:
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
    set_process_name(f"flexemr-{child.name.replace('embedding', 'emb').replace('engine', 'eng').replace('inference', 'inf')}")
    pin_to_cpu(child.cpu)
    ready = ReadyPipe(ready_fd)
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
