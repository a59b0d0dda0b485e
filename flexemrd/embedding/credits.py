"""Response credits a ranker connection has granted an embedding server (FlexEMR 3.2).

A flow-controlled connection's responses are sent only against credits, one
per response.  Credits arrive on the priority channel (a second connection)
or in band on lookups; either way the server's event loop applies them the
moment it reads them, and the same loop takes them when it sends, so a pool
needs no lock: it is owned by that one thread.
"""

from __future__ import annotations

import time

__all__ = ["CreditPool"]


class CreditPool:
    """Credits of one (ranker token, data connection) pair, and how long responses waited for them."""

    __slots__ = ("credits", "received", "waits", "wait_ns", "_waiting_since")

    def __init__(self) -> None:
        self.credits = 0
        self.received = 0
        self.waits = 0            # times a ready response found no credit
        self.wait_ns = 0          # total time such responses waited
        self._waiting_since = 0

    def give(self, n: int) -> None:
        self.credits += n
        self.received += n
        if self._waiting_since and self.credits > 0:
            self.wait_ns += time.perf_counter_ns() - self._waiting_since
            self._waiting_since = 0

    def take(self) -> bool:
        """Use one credit for a response that is ready; False (and the wait starts) if there is none."""
        if self.credits > 0:
            self.credits -= 1
            return True
        if not self._waiting_since:
            self.waits += 1
            self._waiting_since = time.perf_counter_ns()
        return False
