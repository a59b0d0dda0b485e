"""Reconnecting lost connections: backoff with jitter, HELLO and credits again, then serve.

A connection whose server went away (reset, EOF, a bad frame, a refused
connect at start) is marked down in the connection table, so frames for it
fail at once instead of waiting; this thread retries it with exponential
backoff and jitter (so a restarted server is not hit by every engine at the
same instant), re-runs the HELLO exchange (credits granted afresh, shards
checked again) and hands the new connection to the engine, which reports
COMP_CONNECTED so the inference marks the server up.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from typing import Callable

from flexemr.errors import ProtocolError

from flexemrd.engine.connections import ConnState, Connector

logger = logging.getLogger(__name__)

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0
JITTER = 0.25


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Delay before ``attempt`` (1-based): 50 ms doubling to 2 s, ±25% jitter."""
    base = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** max(0, attempt - 1))
    return base * (1.0 + rng.uniform(-JITTER, JITTER))


class Reconnector:
    def __init__(self, connector: Connector, directory: dict[int, tuple[int, str]],
                 on_connected: Callable[[ConnState, int], None], stop: threading.Event,
                 seed: int | None = None) -> None:
        self.connector = connector
        self.directory = directory
        self.on_connected = on_connected
        self.stop = stop
        self._rng = random.Random(seed)
        self._due: list[tuple[float, int]] = []          # (when, cid), a heap
        self._attempts: dict[int, int] = {}
        self._cond = threading.Condition()

    def schedule(self, cid: int) -> None:
        """Start (or keep) reconnecting ``cid``; the first try comes after a short delay."""
        with self._cond:
            if cid in self._attempts:
                return
            self._attempts[cid] = 0
            heapq.heappush(self._due, (time.monotonic() + backoff_s(1, self._rng), cid))
            self._cond.notify()

    def cancel(self, cid: int) -> bool:
        """Stop reconnecting ``cid`` (it migrates away); True if it was being reconnected."""
        with self._cond:
            return self._attempts.pop(cid, None) is not None

    def reconnecting(self) -> list[int]:
        with self._cond:
            return sorted(self._attempts)

    def run(self) -> None:
        while not self.stop.is_set():
            with self._cond:
                now = time.monotonic()
                while self._due and self._due[0][1] not in self._attempts:
                    heapq.heappop(self._due)             # cancelled
                if not self._due or self._due[0][0] > now:
                    wait = 0.2 if not self._due else min(0.2, self._due[0][0] - now)
                    self._cond.wait(wait)
                    continue
                _when, cid = heapq.heappop(self._due)
                attempt = self._attempts[cid] + 1
                self._attempts[cid] = attempt
            self._try(cid, attempt)

    def _try(self, cid: int, attempt: int) -> None:
        server, address = self.directory[cid]
        try:
            st = self.connector.open(cid, server, address)
        except (OSError, ProtocolError) as e:
            if attempt == 1 or attempt % 10 == 0:
                logger.warning("connection %d to server %d (%s): reconnect attempt %d failed: %s",
                               cid, server, address, attempt, e)
            with self._cond:
                if cid in self._attempts:
                    heapq.heappush(self._due, (time.monotonic() + backoff_s(attempt + 1, self._rng), cid))
            return
        with self._cond:
            wanted = self._attempts.pop(cid, None) is not None
        if not wanted:      # cancelled while connecting: it moved to another engine
            st.conn.close()
            if st.credit_conn is not None:
                st.credit_conn.close()
            return
        logger.info("connection %d to server %d (%s) re-established after %d attempt%s",
                    cid, server, address, attempt, "" if attempt == 1 else "s")
        self.on_connected(st, attempt)
