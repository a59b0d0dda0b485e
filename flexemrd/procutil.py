"""Small process utilities for children: names, parent-death signal, sd_notify, pinning."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket

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

    def _handler(self, _sig, _frame) -> None:
        self.set = True

    def wait(self, timeout: float | None = None, poll_s: float = 0.05) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.set:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def event(self, poll_s: float = 0.05):
        import threading

        ev = threading.Event()

        def poll() -> None:
            self.wait(poll_s=poll_s)
            ev.set()

        threading.Thread(target=poll, name="term-poller", daemon=True).start()
        return ev
