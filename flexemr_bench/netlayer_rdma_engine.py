"""The RDMA benchmark's ranker engines: closed-loop lookups over RankerChannels.

``run_group`` runs in one forked process and drives ``engines`` engines
through ONE Endpoint (verbs context, PD, CQ) and one RankerChannel (data QP +
credit QP) per server:

- mapping "owned": the benchmark forks two groups of one engine each, so
  every engine has its own Endpoint (its own NIC parallelism unit) and its
  own QPs to every server; no lock anywhere.
- mapping "shared": one group of two engines.  A QP cannot be shared across
  processes, so the two engines are threads of one process sharing its
  Endpoint and one QP per server, taking strict turns (a fair lock: post its
  own lookups, poll one batch of completions, dispatch them to whichever
  engine they belong to).  That is what sharing a unit costs with verbs:
  posting and polling serialise on the lock (and here on the GIL too).

Each engine keeps ``window`` lookups in flight per server (as credits allow).
Per lookup it records the time from posting the SEND to dispatching the
reply's completion; per credit grant, the time it was applied here (right
after the poll that brought it), which the benchmark pairs with the time the
server posted it (``CLOCK_MONOTONIC`` is common to both in one host/guest).
The first replies of every engine and server are checked against the same
pooling done locally (exact equality).
"""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from flexemr_bench.netlayer_rdma_wire import HEADER_BYTES, Workload, bag_starts, make_table, pool

VERIFY_REPLIES = 4  # per engine and server
ID_POOL = 64  # distinct id rows an engine cycles through (no RNG on the hot path)
OWNED_WAIT_S = 0.05
SHARED_WAIT_S = 0.002  # a waiting turn holds the other engine off: keep it short
DRAIN_S = 60.0


class _Channel:
    """One server connection of this process: the channel, its slots' memory views, in-flight lookups."""

    def __init__(self, ep: Any, server: int, sock_path: str, slots: int, credits: str, w: Workload,
                 name: str) -> None:
        from flexemr.transport.rdma.channel import RankerChannel

        self.server = server
        self.w = w
        self.requests = ep.register(np.zeros(slots * w.request_bytes, np.uint8))
        self.completions = ep.register(np.zeros(slots * w.reply_bytes, np.uint8), remote_write=True)
        self.ch = RankerChannel(ep, f"server-{server}", self.requests, self.completions, depth=max(slots, 16),
                                credits=credits)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        self.conn = Connection(sock.detach())
        self.conn.send({"credits": credits, "recv_slots": slots, "blob": self.ch.blob(), "name": name})
        self.ch.connect(self.conn.recv()["blob"])
        self.initial_credits = self.ch.credits
        req, rb = self.requests.array, w.request_bytes
        self.hdr = [np.frombuffer(req, np.int64, 4, s * rb) for s in range(slots)]
        self.ids = [np.frombuffer(req, np.int32, w.bags * w.ids_per_bag, s * rb + HEADER_BYTES)
                    for s in range(slots)]
        self.replies = np.frombuffer(self.completions.array, np.float32).reshape(slots, w.bags, w.dim)
        self.inflight: dict[int, tuple[_Lane, int, int]] = {}  # request id -> (lane, slot, posted ns)
        self.next_id = 0
        self.grant_applied_ns: list[int] = []

    def drained(self) -> bool:
        return not self.inflight and self.ch.credits >= self.initial_credits

    def bye(self) -> tuple[np.ndarray, float]:
        """Tell the server we are done: its grant-post times for this connection, its idle fraction."""
        self.conn.send("bye")
        answer = self.conn.recv()
        self.conn.close()
        self.ch.close()
        self.requests.close()
        self.completions.close()
        return answer["grant_posted_ns"], float(answer["idle_fraction"])


class _Lane:
    """One engine's share (``window`` slots) of one channel."""

    def __init__(self, engine: _Engine, chan: _Channel, slots: range, table: np.ndarray) -> None:
        self.engine = engine
        self.chan = chan
        self.free = list(slots)
        self.table = table
        w = chan.w
        self.starts = bag_starts(w.bags, w.ids_per_bag)
        self.id_pool = engine.rng.integers(0, w.rows, (ID_POOL, w.bags * w.ids_per_bag), dtype=np.int32)
        self.to_verify = VERIFY_REPLIES
        self.expected = np.empty((w.bags, w.dim), np.float32)

    def post(self) -> None:
        """Post lookups into every free slot while the server has credit for them."""
        c, w = self.chan, self.chan.w
        while self.free and c.ch.credits > 0:
            slot = self.free.pop()
            rid = c.next_id
            c.hdr[slot][:] = (rid, slot * w.reply_bytes, w.bags, w.ids_per_bag)
            c.ids[slot][:] = self.id_pool[rid % ID_POOL]
            if not c.ch.send_lookup(rid, slot * w.request_bytes, w.request_bytes):
                self.free.append(slot)
                return
            c.next_id += 1
            c.inflight[rid] = (self, slot, time.monotonic_ns())

    def complete(self, slot: int, posted_ns: int, now_ns: int, nbytes: int) -> None:
        # The slot is reused once the reply is in: the server has read the
        # request by then (it pooled it), even if our SEND completion is later.
        e = self.engine
        if nbytes != self.chan.w.reply_bytes:
            raise AssertionError(f"{e.name}: reply of {nbytes} bytes from server {self.chan.server}, "
                                 f"expected {self.chan.w.reply_bytes}")
        if self.to_verify:
            self.to_verify -= 1
            pool(self.table, self.chan.ids[slot], self.starts, self.expected)
            e.verified += 1
            e.mismatches += int(not np.array_equal(self.expected, self.chan.replies[slot]))
        if e.window_start_ns <= now_ns <= e.window_end_ns:
            e.completed += 1  # throughput: replies in the window, whenever they were posted
            if posted_ns >= e.window_start_ns:  # latency: lookups posted after the warm-up
                e.latencies_ns.append(now_ns - posted_ns)
        self.free.append(slot)


class _Engine:
    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.lanes: list[_Lane] = []
        self.latencies_ns: list[int] = []
        self.completed = 0
        self.idle_ns = 0  # waiting for completions that did not come
        self.verified = 0
        self.mismatches = 0
        self.window_start_ns = 0
        self.window_end_ns = 0

    def result(self) -> dict[str, Any]:
        return {"name": self.name, "lat_ns": np.array(self.latencies_ns, np.int64), "completed": self.completed,
                "idle_fraction": self.idle_ns / max(1, self.window_end_ns - self.window_start_ns),
                "verified": self.verified,
                "mismatches": self.mismatches}


class _Turns:
    """Strict turns between the engines that share a unit (a fair lock); finished engines drop out."""

    def __init__(self, n: int) -> None:
        self.cv = threading.Condition()
        self.turn = 0
        self.active = list(range(n))

    def enter(self, i: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i)

    def leave(self, i: int, finished: bool) -> None:
        with self.cv:
            if i not in self.active:  # already out (a failed engine leaving twice)
                return
            k = self.active.index(i)
            if finished:
                self.active.remove(i)
            if self.active:
                self.turn = self.active[(k if finished else k + 1) % len(self.active)]
            self.cv.notify_all()


def _dispatch(ep: Any, chans: list[_Channel]) -> None:
    from flexemr.transport.rdma.channel import CreditGrant, Response
    from flexemr.transport.rdma.errors import QueuePairError

    now = time.monotonic_ns()
    for c in chans:
        for ev in ep.take(c.ch):
            if isinstance(ev, Response):
                lane, slot, posted = c.inflight.pop(ev.imm)
                lane.complete(slot, posted, now, ev.nbytes)
            elif isinstance(ev, CreditGrant):
                c.grant_applied_ns.append(now)
            elif isinstance(ev, QueuePairError):
                raise ev


def _drive(ep: Any, chans: list[_Channel], engine: _Engine, me: int, turns: _Turns | None, wait_s: float) -> None:
    """One engine's closed loop until the window ends and its lookups are all answered."""
    deadline = engine.window_end_ns + int(DRAIN_S * 1e9)
    while True:
        if turns is not None:
            turns.enter(me)
        now = time.monotonic_ns()
        if now < engine.window_end_ns:
            for lane in engine.lanes:
                lane.post()
        done = now >= engine.window_end_ns and all(not any(v[0].engine is engine for v in c.inflight.values())
                                                    for c in chans)
        if now > deadline:
            raise TimeoutError(f"{engine.name}: lookups still unanswered {DRAIN_S} s after the run")
        if not done:
            t = time.monotonic_ns()
            if not ep.collect(wait_s) and engine.window_start_ns <= t < engine.window_end_ns:
                engine.idle_ns += time.monotonic_ns() - t
            _dispatch(ep, chans)
        if turns is not None:
            turns.leave(me, done)
        if done:
            return


def run_group(group: int, engines: int, credits: str, w: Workload, device: str, sock_paths: list[str],
              pipe: Connection) -> None:
    """``engines`` engines sharing one Endpoint and one channel per server (run in a forked process).

    Protocol with the benchmark on ``pipe``: sends "ready", receives
    ``("go", start_ns, window_start_ns, window_end_ns)``, sends the result dict.
    """
    from flexemr.transport.rdma.endpoint import Endpoint

    ep = Endpoint(device)
    slots = engines * w.window
    chans = [_Channel(ep, s, path, slots, credits, w, f"group{group}") for s, path in enumerate(sock_paths)]
    tables = [make_table(s, w.rows, w.dim) for s in range(w.servers)]
    team = []
    for e in range(engines):
        eng = _Engine(f"engine{group + e}", seed=100 * group + e)
        eng.lanes = [_Lane(eng, c, range(e * w.window, (e + 1) * w.window), tables[c.server]) for c in chans]
        team.append(eng)
    qp_states = [list(c.ch.qp_states()) for c in chans]
    pipe.send("ready")
    _, start_ns, window_start_ns, window_end_ns = pipe.recv()
    for eng in team:
        eng.window_start_ns, eng.window_end_ns = window_start_ns, window_end_ns
    time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
    if engines == 1:
        _drive(ep, chans, team[0], 0, None, OWNED_WAIT_S)
    else:
        turns = _Turns(engines)
        errors: list[BaseException] = []

        def body(i: int) -> None:
            try:
                _drive(ep, chans, team[i], i, turns, SHARED_WAIT_S)
            except BaseException as ex:  # noqa: BLE001 -- re-raised in the group's thread below
                errors.append(ex)
                turns.leave(i, True)

        threads = [threading.Thread(target=body, args=(i,), name=team[i].name) for i in range(engines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    # The last grants trail the last replies: wait until every credit is back.
    deadline = time.monotonic() + DRAIN_S
    while not all(c.drained() for c in chans):
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group}: credits {[c.ch.credits for c in chans]} not back after {DRAIN_S} s")
        ep.collect(OWNED_WAIT_S)
        _dispatch(ep, chans)
    grant_ns = []
    unmatched = 0
    server_idle = []
    for c in chans:
        applied = np.array(c.grant_applied_ns, np.int64)
        posted, idle = c.bye()
        server_idle.append(idle)
        n = min(applied.size, posted.size)
        unmatched += abs(applied.size - posted.size)  # 0 unless a grant got lost: RC delivers in order
        lat = applied[:n] - posted[:n]
        keep = (applied[:n] >= window_start_ns) & (applied[:n] <= window_end_ns)
        grant_ns.append(lat[keep])
    pipe.send({"engines": [eng.result() for eng in team], "grant_ns": np.concatenate(grant_ns),
               "qp_states": qp_states, "device": ep.device.name, "grants_unmatched": unmatched,
               "server_idle_fraction": server_idle})
    ep.close()
