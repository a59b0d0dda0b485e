"""A second process for two-sided verbs tests: fork, open its own endpoint, talk over a pipe.

fork (not spawn) because the guest's emulated CPU needs ~30 s to import
pytest and numpy again; the child opens its own verbs context (verbs objects
never cross fork) and exchanges connection blobs with the test over a pipe,
as the daemon will inside its authenticated TCP HELLO.  Whatever the child
raises comes back to the test as a failure with the child's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from typing import Any, Callable

# Counters soft-RoCE (and most RNICs) keep per port: packets really sent by verbs.
HW_COUNTERS = "/sys/class/infiniband/{dev}/ports/{port}/hw_counters/{name}"


def counter(dev: str, name: str, port: int = 1) -> int:
    with open(HW_COUNTERS.format(dev=dev, port=port, name=name)) as f:
        return int(f.read())


class Peer:
    """``target(pipe, *args)`` running in a forked child."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_run, args=(target, child, args), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout_s: float = 120.0) -> Any:
        if not self.pipe.poll(timeout_s):
            raise TimeoutError(f"peer {self.proc.pid} said nothing for {timeout_s} s")
        tag, value = self.pipe.recv()
        if tag == "error":
            raise AssertionError(f"peer process failed:\n{value}")
        return value

    def send(self, value: Any) -> None:
        self.pipe.send(("ok", value))

    def close(self, timeout_s: float = 60.0) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        child_error = None
        if exc_type is not None:
            # The test failed (often: "peer closed the connection"): the child's own
            # traceback, when it sent one, says why (after any messages nobody read).
            try:
                while child_error is None and self.pipe.poll(5.0):
                    tag, value = self.pipe.recv()
                    child_error = value if tag == "error" else None
            except (EOFError, OSError):
                pass
        self.close()
        if child_error is not None:
            raise AssertionError(f"peer process failed:\n{child_error}")


class PeerPipe:
    """The child's end: the same tagged messages as ``Peer``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, value: Any) -> None:
        self.conn.send(("ok", value))

    def recv(self, timeout_s: float = 120.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"test process said nothing for {timeout_s} s")
        return self.conn.recv()[1]


def _run(target: Callable[..., None], conn: Any, args: tuple[Any, ...]) -> None:
    try:
        target(PeerPipe(conn), *args)
    except BaseException:  # noqa: BLE001 -- everything goes back to the test
        try:
            conn.send(("error", f"pid {os.getpid()}:\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        time.sleep(0.05)
        conn.close()
