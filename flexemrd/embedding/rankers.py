"""Which rankers an embedding server serves, their credit pools, and a fair share of the pooling workers.

A ranker says who it is in each connection's HELLO: ``"<token>/<conn id>/<data|credit>"``
(the token names one ranker run; its engines' connections share it).  Three jobs:

- ``RankerBook``: per ranker, its channels and connections, since when, lookups,
  bytes in/out, credits outstanding, last seen; the credit pool of each of its
  connections.  A connection's pool goes when its last channel closes (a
  restarted engine's connection starts from the credits its new HELLO grants),
  the ranker's entry when its last channel closes.  Counters of pruned pools are
  kept as totals, so the STATS counters never go backwards.
- ``FairScheduler``: pooling work waits in one FIFO per ranker and is handed to
  at most ``limit`` workers round-robin across rankers, so a ranker's share of
  the workers does not grow with its number of connections.
- ``StatusPublisher``: about once a second, the server's rankers as one JSON
  document in its slot of the host's status segment (``emrctl status``).

Everything here runs on the server's event-loop thread (the publisher too: it
is called from the loop's heartbeat), so nothing needs a lock.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from flexemrd.embedding.credits import CreditPool

__all__ = ["Channel", "Executor", "FairScheduler", "Ranker", "RankerBook", "StatusPublisher"]

logger = logging.getLogger(__name__)


class Ranker:
    """What the server knows about one ranker (one token)."""

    __slots__ = ("token", "address", "since", "conns", "channels", "lookups", "errors", "bytes_in",
                 "bytes_out", "last_seen")

    def __init__(self, token: str, address: str) -> None:
        self.token = token
        self.address = address                  # host of its first channel (ports differ per connection)
        self.since = time.time()
        self.conns: dict[str, int] = {}         # conn id -> open channels
        self.channels = 0
        self.lookups = 0
        self.errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen = time.monotonic()


class Channel:
    """One open connection's membership: which ranker, which of its connections."""

    __slots__ = ("ranker", "conn_id")

    def __init__(self, ranker: Ranker, conn_id: str) -> None:
        self.ranker, self.conn_id = ranker, conn_id


def _host(peer: str) -> str:
    host, sep, _port = str(peer).rpartition(":")
    return host.strip("[]") if sep else str(peer)


class RankerBook:
    """The rankers connected now, and the credit pool of each of their connections."""

    def __init__(self) -> None:
        self.rankers: dict[str, Ranker] = {}
        self.pools: dict[str, CreditPool] = {}      # "<token>/<conn id>" -> credits of that connection
        self._retired = [0, 0, 0]                   # received, waits, wait_ns of pruned pools

    def join(self, token: str, conn_id: str, peer: str) -> tuple[Channel, CreditPool]:
        """A ranker channel said HELLO: its membership and the pool its connection shares."""
        r = self.rankers.get(token)
        if r is None:
            r = self.rankers[token] = Ranker(token, _host(peer))
            logger.info("ranker %s connected from %s", token, r.address)
        r.conns[conn_id] = r.conns.get(conn_id, 0) + 1
        r.channels += 1
        r.last_seen = time.monotonic()
        key = f"{token}/{conn_id}"
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = CreditPool()
        return Channel(r, conn_id), pool

    def leave(self, ch: Channel) -> None:
        """A channel closed: prune its connection's pool, and the ranker, when nothing of them is left open."""
        r = ch.ranker
        left = r.conns.get(ch.conn_id, 0) - 1
        r.channels = max(0, r.channels - 1)
        if left > 0:
            r.conns[ch.conn_id] = left
            return
        r.conns.pop(ch.conn_id, None)
        pool = self.pools.pop(f"{r.token}/{ch.conn_id}", None)
        if pool is not None:
            self._retired[0] += pool.received
            self._retired[1] += pool.waits
            self._retired[2] += pool.wait_ns
        if not r.conns and self.rankers.get(r.token) is r:
            del self.rankers[r.token]
            logger.info("ranker %s disconnected (%d lookups served)", r.token, r.lookups)

    def credit_totals(self) -> tuple[int, int, int]:
        """(credits received, waits for a credit, ns waited) over every pool ever held."""
        pools = self.pools.values()
        return (self._retired[0] + sum(p.received for p in pools), self._retired[1] + sum(p.waits for p in pools),
                self._retired[2] + sum(p.wait_ns for p in pools))

    @staticmethod
    def count_in(ch: Channel | None, n: int) -> None:
        if ch is not None:
            ch.ranker.bytes_in += n
            ch.ranker.last_seen = time.monotonic()

    @staticmethod
    def count_out(ch: Channel | None, n: int) -> None:
        if ch is not None:
            ch.ranker.bytes_out += n

    @staticmethod
    def count_answer(ch: Channel | None, stat: str) -> None:
        if ch is not None:
            if stat == "lookups":
                ch.ranker.lookups += 1
            elif stat == "errors":
                ch.ranker.errors += 1

    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per connected ranker, oldest first (the status JSON's ``rankers``)."""
        now = time.monotonic()
        out = []
        for r in sorted(self.rankers.values(), key=lambda r: r.since):
            credits = sum(p.credits for c in r.conns if (p := self.pools.get(f"{r.token}/{c}")) is not None)
            out.append({"token": r.token, "address": r.address, "channels": r.channels, "connections": len(r.conns),
                        "since_unix": round(r.since, 3), "lookups": r.lookups, "errors": r.errors,
                        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "credits": credits,
                        "last_seen_s": round(max(0.0, now - r.last_seen), 3)})
        return out


class Executor(Protocol):
    """What FairScheduler hands tasks to: a thread pool, or the server's inline executor (server.py)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Any: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class FairScheduler:
    """Round-robin across keys (rankers) over a thread pool, at most ``limit`` tasks running.

    The thread pool's own queue is FIFO, so nothing waits there: work waits
    here, one FIFO per key, and ``dispatch()`` starts the next task of the
    next key in turn whenever a worker is free.  ``skip(args)`` drops work
    whose connection went away before it started.
    """

    def __init__(self, executor: Executor, limit: int,
                 skip: Callable[..., bool] = lambda *_: False) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.executor, self.limit, self.skip = executor, limit, skip
        self.running = 0
        self._queues: collections.OrderedDict[Hashable, collections.deque[tuple[Callable[..., None], tuple]]] = \
            collections.OrderedDict()
        self.waiting = 0

    def push(self, key: Hashable, fn: Callable[..., None], *args: Any) -> None:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = collections.deque()   # a new key joins the end of the round
        q.append((fn, args))
        self.waiting += 1

    def pop(self) -> tuple[Callable[..., None], tuple] | None:
        """The next task in round-robin order (the head of the first key's FIFO; that key goes last)."""
        while self._queues:
            key, q = next(iter(self._queues.items()))
            fn, args = q.popleft()
            self.waiting -= 1
            if q:
                self._queues.move_to_end(key)
            else:
                del self._queues[key]
            if not self.skip(*args):
                return fn, args
        return None

    def dispatch(self) -> None:
        """Start tasks while workers are free (event-loop thread)."""
        while self.running < self.limit:
            task = self.pop()
            if task is None:
                return
            try:
                self.executor.submit(task[0], *task[1])
            except RuntimeError:   # the pool is shut down: the server is stopping
                return
            self.running += 1

    def finished(self) -> None:
        """A task handed back its result (event-loop thread)."""
        self.running = max(0, self.running - 1)


class StatusPublisher:
    """Writes a server's rankers to its slot of the host's status segment, at most once per ``interval_s``."""

    def __init__(self, instance: str, slot: int, describe: Callable[[], dict[str, Any]],
                 interval_s: float = 1.0) -> None:
        from flexemr.control.embedding_status import EmbeddingStatusArea

        self.area = EmbeddingStatusArea.attach(instance, writable=True)
        self.slot, self.describe, self.interval_s = slot, describe, interval_s
        self._last = 0.0
        self._truncated = False
        self._failed = False

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        doc = self.describe()
        doc.update(pid=os.getpid(), updated_unix=round(time.time(), 3))
        everyone = list(doc.get("rankers", []))
        shown = everyone
        try:
            while True:
                try:
                    self.area.write(self.slot, doc)
                    return
                except ValueError:
                    if not shown:
                        raise
                    # More rankers than the slot holds: list the oldest that fit, count the rest.
                    shown = shown[:len(shown) // 2]
                    doc = dict(doc, rankers=shown, rankers_omitted=len(everyone) - len(shown))
                    if not self._truncated:
                        logger.warning("status segment slot too small for %d rankers: listing fewer", len(everyone))
                        self._truncated = True
        except Exception as e:   # status is for operators: it must never stop the serving loop
            if not self._failed:
                logger.warning("cannot publish status: %s", e)
                self._failed = True

    def close(self) -> None:
        self.area.close()
