"""Both ends of a toy lookup protocol over RdmaChannel, for the two-process tests.

A request is four int64 (request id, reply offset in the ranker's completion
memory, float count, seed); the reply is ``seed + arange(count)`` as float32,
written by the server straight to that offset with WRITE WITH IMM
(imm = request id).  Real frames belong to flexemr.wire; this is only enough
protocol to check every byte.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flexemr.transport.rdma.channel import (CreditGrant, RankerChannel, Request, Response, SendDone,
                                            ServerChannel, WriteDone)
from flexemr.transport.rdma.endpoint import Endpoint
from flexemr.transport.rdma.errors import QueuePairError

REQUEST_BYTES = 32
REPLY_SLOT_BYTES = 16384  # largest reply the toy server writes


def expected(seed: int, count: int) -> np.ndarray:
    return (seed + np.arange(count)).astype(np.float32)


def reply_count(request_id: int) -> int:
    """Float count of the reply to ``request_id``: varied, odd sizes, up to REPLY_SLOT_BYTES."""
    return 1 + (request_id * 389) % (REPLY_SLOT_BYTES // 4)


def serve(pipe: Any, device: str, recv_slots: int, credits: str = "priority") -> None:
    """Embedding-server side, run in the peer process; obeys commands from the test between batches.

    Commands: "force_error" (move its QPs to ERR), "reconnect" (new channel,
    new blob exchange), "stats" (reply with counters), "stop".
    """
    ep = Endpoint(device)
    receive = ep.register(np.zeros(recv_slots * REQUEST_BYTES, np.uint8))
    replies = ep.register(np.zeros(recv_slots * REPLY_SLOT_BYTES, np.uint8))
    stats = {"requests": 0, "replies": 0, "errors": [], "sessions": 0, "qpns": []}
    while True:
        ch = ServerChannel(ep, "ranker", receive, replies, recv_slots=recv_slots, depth=max(recv_slots, 16),
                           credits=credits)
        pipe.send(ch.blob())
        ch.connect(pipe.recv())
        stats["sessions"] += 1
        stats["qpns"].append((ch.data.qpn, ch.credit.qpn))
        stats["credit_route"] = ch.credit.query_route()
        stats["data_route"] = ch.data.query_route()
        command = _serve_session(pipe, ch, replies, stats)
        ch.close()
        if command == "stop":
            break
    ep.close()


def _serve_session(pipe: Any, ch: ServerChannel, replies: Any, stats: dict) -> str:
    broken = False
    while True:
        if pipe.conn.poll(0):
            command = pipe.recv()
            if command == "force_error":
                ch.force_error()
                pipe.send(ch.qp_states())
            elif command == "stats":
                pipe.send(dict(stats, credit_state=ch.credit.state(), data_state=ch.data.state()))
            else:
                pipe.send("bye")
                return command
        if broken:
            time.sleep(0.05)
            continue
        try:
            events = ch.wait(0.05)
        except QueuePairError as err:
            stats["errors"].append(str(err))
            broken = True
            continue
        done = []
        for ev in events:
            if isinstance(ev, Request):
                rid, dst, count, seed = np.frombuffer(ev.view, np.int64, 4).tolist()
                out = np.frombuffer(replies.array, np.float32, count, ev.slot * REPLY_SLOT_BYTES)
                out[:] = expected(seed, count)  # the "pooling" writes registered memory in place
                stats["requests"] += 1
                assert ev.imm == rid, (ev.imm, rid)
                if not ch.reply(rid, ev.slot * REPLY_SLOT_BYTES, count * 4, dst, wr_id=ev.slot):
                    raise AssertionError("server send queue full with depth >= receive slots")
            elif isinstance(ev, WriteDone):
                done.append(ev.wr_id)  # the reply left: its receive slot may take a new request
                stats["replies"] += 1
        if done:
            ch.release(done)
            ch.grant()


def drain_credits(ch: RankerChannel, want: int, timeout_s: float = 60.0) -> None:
    """Wait until the server's last grants are in (they trail the last replies)."""
    deadline = time.monotonic() + timeout_s
    while ch.credits < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"credits {ch.credits} of {want} after {timeout_s} s")
        ch.wait(0.5)


def run_lookups(ch: RankerChannel, ids: list[int], request_slots: int, timeout_s: float = 120.0) -> dict[int, int]:
    """Send every lookup (as credits and request memory allow) and wait for all replies.

    Returns request id -> reply bytes; checks each reply's bytes in the
    completion memory.  Replies go to offset id * REPLY_SLOT_BYTES.
    """
    free = list(range(request_slots))
    slot_of: dict[int, int] = {}
    todo = list(reversed(ids))
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    req = np.frombuffer(ch.requests.array, np.int64)
    while len(got) < len(ids):
        while todo and free:
            rid = todo[-1]
            s = free[-1]
            req[s * 4:s * 4 + 4] = (rid, rid * REPLY_SLOT_BYTES, reply_count(rid), rid * 10)
            if not ch.send_lookup(rid, s * REQUEST_BYTES, REQUEST_BYTES):
                break  # out of credits: wait for a grant
            todo.pop()
            free.pop()
            slot_of[rid] = s
        for ev in ch.wait(1.0):
            if isinstance(ev, SendDone):
                free.append(slot_of.pop(ev.wr_id))
            elif isinstance(ev, Response):
                assert ev.imm not in got, f"reply {ev.imm} arrived twice"
                got[ev.imm] = ev.nbytes
            elif isinstance(ev, CreditGrant):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(got)} of {len(ids)} replies after {timeout_s} s (credits {ch.credits})")
    out = np.frombuffer(ch.completions.array, np.float32)
    for rid, nbytes in got.items():
        n = reply_count(rid)
        assert nbytes == 4 * n, (rid, nbytes)
        base = rid * REPLY_SLOT_BYTES // 4
        np.testing.assert_array_equal(out[base:base + n], expected(rid * 10, n), err_msg=f"reply {rid}")
    return got
