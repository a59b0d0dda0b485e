"""Checked client load: client threads that keep a ranker busy while a test breaks something.

Each suite's load says what one client does (``_run``: predict, lookup,
which timeout) and how an answer is checked; this base class owns the rest,
the same everywhere: the threads, the stop event, the ok / wrong / failures
tallies under one lock, and ``wait_ok``, which waits for more good answers
and names the last failures when they do not come.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

__all__ = ["ClientLoad"]


class ClientLoad:
    """``clients`` threads running ``self._run(k)`` from ``__enter__`` until ``__exit__``."""

    join_timeout_s = 60.0
    wait_timeout_s = 60.0

    def __init__(self, clients: int, context: Callable[[], str] | None = None) -> None:
        self.stop = threading.Event()
        self.ok = 0
        self.wrong = 0
        self.failures: list[Any] = []   # what each failed request raised (a suite picks the form)
        self._context = context         # more to say when wait_ok gives up (a cluster's log tail)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> ClientLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_timeout_s)

    def _run(self, k: int) -> None:
        raise NotImplementedError("a load says what client k does")

    def answered(self, good: bool) -> None:
        """Count one answer: ``good`` when it matched the reference."""
        with self._lock:
            if good:
                self.ok += 1
            else:
                self.wrong += 1

    def failed(self, failure: Any) -> None:
        """Record one request that failed (an error instead of an answer)."""
        with self._lock:
            self.failures.append(failure)

    def count(self) -> int:
        with self._lock:
            return self.ok

    def wait_ok(self, more: int, timeout: float | None = None) -> None:
        """Until ``more`` good answers more than now; AssertionError naming the last failures otherwise."""
        timeout = self.wait_timeout_s if timeout is None else timeout
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.count() < target:
            extra = f"\n{self._context()}" if self._context is not None else ""
            raise AssertionError(f"only {self.count()} answers of {target} within {timeout:.0f} s; "
                                 f"failures: {self.failures[-5:]}{extra}")
