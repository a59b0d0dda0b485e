"""What a worker process needs from its supervisor, and the small process utilities.

- ``ReadyPipe``: the child's end of its readiness pipe (READY / ERROR <message>)
  and of its liveness heartbeat (``beat()``).
- ``HeartbeatFile``: the supervisor's end of that heartbeat (gunicorn's
  WorkerTmp): an unlinked temporary file created before the fork; the child
  bumps its mtime, the supervisor reads its age with ``fstat``.
- ``TermFlag``, ``pin_to_cpu``, ``sd_notify``, ``set_process_name``,
  ``die_with_parent``: process plumbing for the supervisor and its children.

The heartbeat stores ``time.monotonic_ns()`` as the file's mtime (gunicorn does
the same): CLOCK_MONOTONIC is one clock for every process on the host, and a
wall-clock step (NTP, a VM resume) can neither kill nor hide a worker.
Workers that inherit this file through ``fork`` share the file description,
so the supervisor sees every ``utime`` at once.  Nothing is written to the
file: only its inode changes, and ``/dev/shm`` keeps that off any disk.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import tempfile
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def set_process_name(name: str) -> None:
    """Name shown by ps/top (15 bytes), e.g. ``flexemr-eng0``."""
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal us when the supervisor dies (no orphans)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def pin_to_cpu(cpu: int | None) -> int | None:
    """Pin this process to one core; returns the core, or None when not pinned."""
    if cpu is None:
        return None
    try:
        import psutil

        psutil.Process().cpu_affinity([cpu])
        return cpu
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("could not pin to cpu %s: %s", cpu, e)
        return None


def sd_notify(state: str) -> bool:
    """Tell systemd our state (Type=notify); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(state.encode())
            return True
        except OSError as e:
            logger.warning("sd_notify failed: %s", e)
            return False


class TermFlag:
    """SIGTERM as a plain flag.

    The handler only assigns an attribute: it takes no lock, so it cannot
    deadlock against the interrupted thread (``Event.set()`` in a handler can,
    when the signal lands while the main thread holds that Event's lock in
    ``Event.wait()``).  ``event()`` turns it into an Event for other threads
    through a small poller thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.set = False
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, _sig: int, _frame: object) -> None:
        self.set = True

    def wait(self, timeout: float | None = None, poll_s: float = 0.05) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.set:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def event(self, poll_s: float = 0.05) -> threading.Event:
        ev = threading.Event()

        def poll() -> None:
            self.wait(poll_s=poll_s)
            ev.set()

        threading.Thread(target=poll, name="term-poller", daemon=True).start()
        return ev


# ---------------------------------------------------------------- readiness and liveness

BEAT_INTERVAL_S = 0.2   # beat() makes at most 5 syscalls a second, however often it is called
_HEARTBEAT_DIRS = ("/dev/shm",)  # tmpfs: utime never waits for a disk; else the default temp dir


class HeartbeatFile:
    """Supervisor side of one child's heartbeat: an unlinked temporary file.

    Created before the fork so the child inherits the descriptor; the file has
    no name left, so nothing needs cleaning up whichever process dies.
    """

    def __init__(self, name: str = "worker") -> None:
        tmpdir = next((d for d in _HEARTBEAT_DIRS if os.access(d, os.W_OK)), None)
        fd, path = tempfile.mkstemp(prefix=f"flexemr-hb-{name.replace('[', '').replace(']', '')}-", dir=tmpdir)
        os.unlink(path)
        self.fd = fd
        self.touch()

    def touch(self) -> None:
        """Count as a beat now (at fork and at READY, so the timeout starts from there)."""
        now = time.monotonic_ns()
        os.utime(self.fd, ns=(now, now))

    def age_s(self) -> float:
        """Seconds since the child's last beat."""
        return max(0.0, (time.monotonic_ns() - os.fstat(self.fd).st_mtime_ns) / 1e9)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReadyPipe:
    """The child's end of its readiness pipe and of its heartbeat.

    ``ready()`` once serving; ``fail(message)`` when it cannot start (the
    supervisor halts with that message instead of restarting); ``beat()``
    from the main loop, at least once a second, for as long as it serves.
    A worker that stops beating for the supervisor's heartbeat timeout is
    killed and restarted.
    """

    def __init__(self, fd: int, heartbeat_fd: int = -1) -> None:
        self.fd = fd
        self.heartbeat_fd = heartbeat_fd          # -1: no supervisor watches (tests, bench helpers)
        self._next_beat = 0.0

    def ready(self) -> None:
        self.beat(force=True)
        os.write(self.fd, b"READY\n")
        os.close(self.fd)
        self.fd = -1

    def fail(self, message: str) -> None:
        if self.fd >= 0:
            os.write(self.fd, b"ERROR " + message.encode()[:4000] + b"\n")
            os.close(self.fd)
            self.fd = -1

    def beat(self, force: bool = False) -> None:
        """Tell the supervisor this process is alive; free to call in a hot loop.

        Safe from any thread without a lock: the descriptor stays open for the
        life of the process, and two threads racing past the rate limit only
        cost one extra ``utime``.
        """
        if self.heartbeat_fd < 0:
            return
        now = time.monotonic()
        if now < self._next_beat and not force:
            return
        self._next_beat = now + BEAT_INTERVAL_S
        t = time.monotonic_ns()
        os.utime(self.heartbeat_fd, ns=(t, t))
