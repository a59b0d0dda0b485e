"""Embedding server: one event loop serves every ranker connection; a bounded pool pools.

Threads::

    event loop (1)            accepts, reads frames without blocking, applies credits,
        |   ^                 answers HELLO/PING/STATS/CREDIT and every frame-level error,
        |   | done + wake     sends replies in request order as the socket and credits allow
        v   |
    pooling workers (N)       decode + range-check + embedding_bag (releases the GIL) + encode

With one worker (``workers=1``, what ``flexemrd local`` gives each of two
servers on two cores) there is no worker thread: the loop pools one request
itself between two non-blocking polls of its sockets (``inline``).  Only one
request pooled at a time either way, and the hand-off cost more than the
overlap it bought: an executor submit, a futex wake-up of the worker, a
wake-up byte back and a selector round per request (measured ~15% of the
server's GIL time).  A credit or PING waits at most one pooling (a few ms).

A connection costs a few small objects, not a thread.  Reading grows a
payload buffer only as its bytes arrive (``FrameAssembler``), so a header
announcing 1 GiB and then stalling costs 64 KiB.  At most
``max_connections`` connections are served; one more is answered
``ERROR OVERLOADED`` and closed.

Per connection, frames are answered strictly in order (docs/PROTOCOL.md): a
queue of pending requests, of which at most ``RUNNING_PER_CONN`` are being
pooled at once; a finished head leaves only when the socket takes it and,
on a flow-controlled connection, against one credit.  Reading pauses while a
connection's unsent replies exceed ``PAUSE_OUTBOX_BYTES`` or ``READ_AHEAD``
requests wait for a worker (unread bytes cost nothing; read ones hold
buffers), unless its answers wait for credits, which may ride in band on the
very frames still unread.

Pooling work waits in one queue per ranker and is handed to the workers
round-robin across rankers (``rankers.FairScheduler``), so a ranker's share
does not grow with its connections; ``rankers.RankerBook`` knows who is
connected and prunes a connection's credit pool when its last channel closes.

With a secret, a connection must authenticate first (``handshake.py``):
until it has, HELLO is answered with AUTH_CHALLENGE only, any other frame
with ERROR UNAUTHENTICATED and the connection is closed, and frames over
64 KiB are refused unread.

A bad request (unknown table, id outside this server's shards, sizes that
disagree, an oversized frame, a malformed HELLO) is answered with an ERROR
frame and the connection keeps serving.  Only a frame whose *header* is
unreadable (wrong magic, version or type) closes that one connection,
because the byte stream can no longer be resynchronised.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import selectors
import socket
import time
from typing import Any, Callable

import numpy as np

from flexemr.errors import ProtocolError
from flexemr.transport.base import Connection, Listener
from flexemr.wire import codec
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, ErrorCode, FrameFlag, FrameType, Header, pack_header
from flexemr.wire.stream import FrameAssembler, Oversized

from flexemrd.embedding.credits import CreditPool
from flexemrd.embedding.handshake import UNAUTHENTICATED_MAX_PAYLOAD, AuthRefused, ServerHandshake
from flexemrd.peerlog import PeerWarnings
from flexemrd.embedding.rankers import Channel, Executor, FairScheduler, RankerBook
from flexemrd.embedding.store import EmbeddingStore, RequestRejected
from flexemrd.embedding.versions import ServerVersions

__all__ = ["EmbeddingServer"]

logger = logging.getLogger(__name__)

_LISTENER = object()
_WAKE = object()
_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Request:
    """One frame awaiting its answer, in its connection's order."""

    __slots__ = ("header", "payload", "reply", "stat", "state", "needs_credit", "received", "bags")

    def __init__(self, header: Header | None, payload: memoryview | None, needs_credit: bool,
                 reply: list | None = None) -> None:
        self.header = header
        self.payload = payload          # kept until the reply is sent: a LOOKUP_RESP refers to its table ids
        self.reply = reply
        self.stat = ""                  # counter to bump once answered ("lookups", "fetches", "errors")
        self.state = _DONE if reply is not None else _QUEUED
        self.needs_credit = needs_credit
        self.received = time.perf_counter()   # a LOOKUP's deadline budget counts from here
        self.bags = 0                   # (bag, table) pairs a LOOKUP pooled (counted with the answer)


class _Peer:
    """Everything the loop knows about one connection."""

    __slots__ = ("conn", "fd", "reader", "pending", "queued", "running", "done", "outbox", "outbox_bytes",
                 "queued_bytes", "sent_bytes", "recycle", "pool", "flow", "closing", "close_by", "dead", "events",
                 "member", "auth")

    def __init__(self, conn: Connection, max_payload: int, secret: bytes | None = None) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.auth = ServerHandshake(secret)
        # Until the peer has authenticated it may send only small frames (HELLO, AUTH_PROOF).
        self.reader = FrameAssembler(max_payload if self.auth.authenticated else UNAUTHENTICATED_MAX_PAYLOAD)
        self.pending: collections.deque[_Request] = collections.deque()   # every unanswered frame, in order
        self.queued: collections.deque[_Request] = collections.deque()    # those not handed to a worker yet
        self.running = 0
        self.done = 0                   # answered but not yet sent (waiting for the head or a credit)
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.outbox_bytes = 0
        self.queued_bytes = 0           # bytes ever put in the outbox / ever sent: when a reply is gone
        self.sent_bytes = 0
        self.recycle: collections.deque[tuple[int, memoryview]] = collections.deque()
        self.pool: CreditPool | None = None
        self.flow = False               # responses only against credits
        self.closing = False            # a bad header: send what is queued, then close
        self.close_by = 0.0
        self.dead = False
        self.events = 0
        self.member: Channel | None = None   # which ranker (and connection) this channel belongs to


class EmbeddingServer:
    """Serves an ``EmbeddingStore`` on a ``Listener`` (any transport) until ``stop()``."""

    RUNNING_PER_CONN = 2        # one pipelining connection may keep two workers busy
    REPLIES_AHEAD = 2           # pooled replies a connection may hold while waiting for credits
    READ_AHEAD = 2              # requests read but not yet pooling before a connection's reading pauses
    MAX_PENDING = 64            # unanswered frames of any kind before reading pauses
    MAX_PENDING_FOR_CREDIT = 1024  # ... and while its answers wait for credits
    PAUSE_OUTBOX_BYTES = 16 << 20
    READS_PER_WAKE = 64         # frames read from one connection before the loop serves the others
    TICK_S = 0.25               # loop wake-up when idle: heartbeat and closing deadlines
    CLOSE_GRACE_S = 5.0         # how long a closing connection gets to take its last ERROR frame
    ACCEPT_BACKOFF_S = 0.5      # pause in accepting after the process ran out of descriptors

    def __init__(
        self,
        store: EmbeddingStore,
        listener: Listener,
        name: str = "embedding",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_connections: int = 256,
        workers: int = 2,
        beat: Callable[[], None] | None = None,
        secret: bytes | None = None,
        inline: bool | None = None,
    ) -> None:
        """``inline``: pool on the loop's own thread (None: when ``workers`` is 1; see the module docstring)."""
        if max_connections < 1 or workers < 1:
            raise ValueError(f"max_connections ({max_connections}) and workers ({workers}) must be >= 1")
        self.store = store
        self.listener = listener
        self.address = listener.address
        self.name = name
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.workers = workers
        self._beat = beat
        self._secret = secret           # None: peers need not authenticate (loopback or [embedding].insecure)
        self._warn = PeerWarnings(logger)
        self._stop = False
        self._peers: dict[int, _Peer] = {}                 # fd -> peer
        self.rankers = RankerBook()                        # who is connected; pools pruned as they leave
        self._pools: dict[str, CreditPool] = self.rankers.pools  # "<token>/<conn id>" -> credits
        self._data_peer: dict[int, _Peer] = {}             # id(pool) -> the data connection it releases
        self._credit_lat: collections.deque[int] = collections.deque(maxlen=8192)
        self._done: collections.deque[tuple[_Peer, _Request]] = collections.deque()  # workers -> loop
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self.inline = workers == 1 if inline is None else inline
        if self.inline and workers != 1:
            raise ValueError(f"inline pooling runs one request at a time on the loop: workers must be 1, got {workers}")
        self._pool: Executor = (_InlineExecutor() if self.inline else
                                 concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                                       thread_name_prefix=f"{name}-pool"))
        # pooling work is taken round-robin across rankers, not in arrival order
        self._sched = FairScheduler(self._pool, workers, skip=lambda peer, _req: peer.dead or peer.closing)
        self._refused = 0
        self._accept_again = 0.0        # when to watch the listener again after a failed accept
        self._refused_logged = 0.0
        self.stats = {k: 0 for k in codec.SERVER_STATS}
        self.model_versions = ServerVersions(store, name, on_retire=self._retired)   # MODEL frames (versions.py)
        self._reads = None   # ReadRegistry (embedding/reads.py), made when the first RDMA ranker connects

    # ------------------------------------------------------------------ lifecycle

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the event loop in this thread until ``stop()``."""
        self._sel.register(self.listener.fileno(), selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r.fileno(), selectors.EVENT_READ, _WAKE)
        if on_ready:
            on_ready()
        logger.info("serving %d shards on %s (at most %d connections, %d pooling workers, %s)",
                    len(self.store.shards), self.address, self.max_connections, self.workers,
                    "peers must authenticate" if self._secret is not None else "no authentication")
        last_beat = 0.0
        try:
            while not self._stop:
                # Inline pooling with work waiting: only poll, the next request is pooled below.
                wait = 0.0 if self.inline and self._sched.waiting else self.TICK_S
                for key, mask in self._sel.select(wait):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    else:
                        self._ready(key.data, mask)
                self._finish_done()
                self._sched.dispatch()
                if self.inline:
                    self._finish_done()   # pooled just now on this thread: send it before polling again
                now = time.monotonic()
                if self._beat is not None and now - last_beat >= self.TICK_S:
                    self._beat()
                    last_beat = now
                for peer in [p for p in self._peers.values() if p.closing and now >= p.close_by]:
                    self._drop(peer)
                if self._accept_again and now >= self._accept_again:
                    self._accept_again = 0.0
                    self._sel.register(self.listener.fileno(), selectors.EVENT_READ, _LISTENER)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to return (any thread; also from a signal-watching thread)."""
        self._stop = True
        self._wake()

    def _shutdown(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sel.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._reads is not None:
            self._reads.close()

    def _retired(self, version: int) -> None:
        """A version was retired: deregister its READ shards no open connection was told about."""
        if self._reads is not None:
            self._reads.sweep()

    def counters(self) -> list[int]:
        """STATS_RESP values, in codec.SERVER_STATS order."""
        s = dict(self.stats)
        s["credits_received"], s["credit_waits"], s["credit_wait_ns"] = self.rankers.credit_totals()
        if self._credit_lat:
            lat = np.fromiter(self._credit_lat, dtype=np.int64)
            s["credit_latency_p50_ns"], s["credit_latency_p99_ns"] = (int(x) for x in np.percentile(lat, [50, 99]))
            s["credit_samples"] = len(lat)
        return [max(0, int(s.get(k, 0))) for k in codec.SERVER_STATS]

    # ------------------------------------------------------------------ accepting

    def _accept(self) -> None:
        for _ in range(64):  # a burst of connects must not starve the connections already served
            try:
                conn = self.listener.accept()
            except OSError as e:
                # Out of descriptors or memory: the listener stays readable, so stop
                # watching it for a moment instead of spinning on it.
                logger.warning("cannot accept connections for now (%s); retrying in %.1f s", e, self.ACCEPT_BACKOFF_S)
                self._sel.unregister(self.listener.fileno())
                self._accept_again = time.monotonic() + self.ACCEPT_BACKOFF_S
                return
            if conn is None:
                return
            if len(self._peers) >= self.max_connections:
                self._refuse(conn)
                continue
            peer = _Peer(conn, self.max_payload, self._secret)
            self._peers[peer.fd] = peer
            self.stats["connections"] += 1
            self._update(peer)

    def _refuse(self, conn: Connection) -> None:
        msg = (f"{self.name} serves at most {self.max_connections} connections ([embedding].max_connections); "
               f"refusing {conn.peer}")
        frame = [memoryview(b).cast("B") for b in codec.encode_error(0, ErrorCode.OVERLOADED, msg)]
        try:
            conn.send_nowait(frame)  # a fresh socket's buffer takes a small frame whole
            # Closing with unread bytes would reset the connection and could destroy the
            # ERROR frame before the peer reads it: take what it already sent.
            scratch = memoryview(bytearray(4096))
            while conn.recv_nowait(scratch):
                pass
        except OSError:
            pass
        conn.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:
            logger.warning("%s (%d refused since the last report)", msg, self._refused)
            self._refused, self._refused_logged = 0, now

    # ------------------------------------------------------------------ reading

    def _ready(self, peer: _Peer, mask: int) -> None:
        if peer.dead:
            return
        if mask & selectors.EVENT_READ and not peer.closing:
            self._read(peer)
        if not peer.dead:
            self._advance(peer)
            self._flush(peer)
        if not peer.dead:
            self._update(peer)

    def _read(self, peer: _Peer) -> None:
        recv = peer.conn.recv_nowait
        for _ in range(self.READS_PER_WAKE):
            if self._paused(peer):
                return
            try:
                got = peer.reader.next(recv)
            except ProtocolError as e:
                # The stream is lost: say why, then close only this connection.
                self.stats["errors"] += 1
                self._warn.warn(peer.conn.peer, "bad-header", "closing its connection: %s", e)
                self._close_after(peer, codec.encode_error(0, ErrorCode.BAD_FRAME, str(e)))
                return
            except OSError:  # ConnectionError included: the peer went away, mid-frame or not
                self._drop(peer)
                return
            if got is None:
                return
            if isinstance(got, Oversized) and not peer.auth.authenticated:
                self._refuse_unauthenticated(peer, AuthRefused(
                    f"not authenticated: a frame of {got.payload_len} bytes before authentication (at most "
                    f"{UNAUTHENTICATED_MAX_PAYLOAD} until then); closing the connection",
                    f"sent a {got.payload_len}-byte frame before authenticating"), got.request_id)
                return
            if isinstance(got, Oversized):
                # Refused for its size alone: answered in order, its bytes discarded as they come.
                self.stats["errors"] += 1
                self._answer_now(peer, codec.encode_error(got.request_id, ErrorCode.TOO_LARGE, got.message))
                continue
            h, payload = got
            self.stats["bytes_in"] += 32 + h.payload_len
            self.rankers.count_in(peer.member, 32 + h.payload_len)
            if peer.auth.authenticated:
                self._frame(peer, h, payload)
            else:
                self._before_auth(peer, h, payload)
            if peer.dead or peer.closing:  # in-band credits flushed this connection and the send failed; refused
                return
            if peer.conn.recv_nowait != recv:  # the HELLO moved it to another transport (RDMA)
                return

    def _paused(self, peer: _Peer) -> bool:
        """Stop reading this connection for now?  Unread requests wait in the kernel for free;
        read ones hold a buffer, so read only a little ahead of the workers."""
        if peer.outbox_bytes > self.PAUSE_OUTBOX_BYTES:
            return True
        if len(peer.queued) < self.READ_AHEAD and len(peer.pending) < self.MAX_PENDING:
            return False
        # ... except while answers wait for credits: those may ride in band on the
        # very frames not read yet, so keep reading (up to a hard cap).
        head = peer.pending[0] if peer.pending else None
        waiting_for_credit = peer.flow and head is not None and head.state == _DONE and head.needs_credit
        return not waiting_for_credit or len(peer.pending) >= self.MAX_PENDING_FOR_CREDIT

    def _frame(self, peer: _Peer, h: Header, payload: memoryview) -> None:
        t = h.type
        if t in (FrameType.LOOKUP, FrameType.FETCH):
            if peer.flow and t == FrameType.LOOKUP and h.flags & FrameFlag.INBAND_CREDIT:
                try:
                    granted_ns = codec.inband_grant_ns(payload)
                except ProtocolError as e:  # too short for its trailer: answer, keep serving
                    self.stats["errors"] += 1
                    self._answer_now(peer, codec.encode_error(h.request_id, e.code, str(e)))
                    peer.reader.recycle(payload)
                    return
                if h.aux:  # the trailer is always there; credits only when aux > 0
                    self._credit(peer.pool, h.aux, granted_ns)
            req = _Request(h, payload, needs_credit=peer.flow)
            peer.pending.append(req)
            peer.queued.append(req)
            return
        try:
            if t == FrameType.CREDIT:
                self._credit(peer.pool, h.aux, codec.decode_credit(payload))
                return
            reply = self._hello(peer, h, payload) if t == FrameType.HELLO else self._control_answer(h, payload)
        except (ProtocolError, RequestRejected) as e:
            self.stats["errors"] += 1
            self._warn.warn(peer.conn.peer, "bad-frame", "%s frame refused: %s", _type_name(t), e)
            reply = codec.encode_error(h.request_id, e.code, str(e))
        finally:
            peer.reader.recycle(payload)
        if reply is not None:  # None: answered already (a HELLO that moved the connection to RDMA)
            self._answer_now(peer, reply)

    # ------------------------------------------------------------------ authentication

    def _before_auth(self, peer: _Peer, h: Header, payload: memoryview) -> None:
        """A frame from a peer that has not authenticated: only HELLO and AUTH_PROOF are served."""
        try:
            if h.type == FrameType.HELLO:
                reply = peer.auth.on_hello(h, codec.decode_hello(payload))
                assert reply is not None
            elif h.type == FrameType.AUTH_PROOF:
                reply = peer.auth.on_proof(h, payload)
                peer.reader.max_payload = self.max_payload
            else:
                raise peer.auth.refuse(h)
        except AuthRefused as e:
            self._refuse_unauthenticated(peer, e, h.request_id)
            return
        except ProtocolError as e:   # a malformed HELLO: say what is wrong, keep the connection
            self.stats["errors"] += 1
            self._warn.warn(peer.conn.peer, "bad-frame", "%s frame refused: %s", _type_name(h.type), e)
            reply = codec.encode_error(h.request_id, e.code, str(e))
        finally:
            peer.reader.recycle(payload)
        self._answer_now(peer, reply)

    def _refuse_unauthenticated(self, peer: _Peer, e: AuthRefused, request_id: int) -> None:
        self.stats["errors"] += 1
        self._warn.warn(peer.conn.peer, e.kind, "refused: %s", e.log_reason)
        self._close_after(peer, codec.encode_error(request_id, e.code, str(e)))

    def _control_answer(self, h: Header, payload: memoryview) -> list:
        if h.type == FrameType.PING:
            return [pack_header(FrameType.PONG, h.request_id, 0)]
        if h.type == FrameType.STATS:
            return codec.encode_stats(h.request_id, self.counters())
        if h.type == FrameType.MODEL:
            return self.model_versions.answer(h.request_id, payload)
        raise RequestRejected(ErrorCode.UNSUPPORTED,
                              f"an embedding server does not serve {FrameType(h.type).name} frames")

    def _hello(self, peer: _Peer, h: Header, payload: memoryview) -> list | None:
        hello = codec.decode_hello(payload)  # ProtocolError: answered with ERROR, the connection stays
        parts = hello.name.split("/")
        if hello.blob:
            # The ranker asks for RDMA: answer over TCP with our blob, then serve verbs.
            self._upgrade(peer, h, hello, channel=parts[-1])
            self._register_ranker(peer, h, hello.role, parts)
            return None
        self._register_ranker(peer, h, hello.role, parts)
        return codec.encode_hello(h.request_id, codec.ROLE_EMBEDDING, self.name, self.store.hello_shards())

    def _upgrade(self, peer: _Peer, h: Header, hello: codec.Hello, channel: str) -> None:
        from flexemr.errors import FlexemrError
        from flexemr.transport.verbs import upgrade_server_connection

        if peer.pending:
            raise RequestRejected(ErrorCode.BAD_REQUEST, "an RDMA HELLO must be the first frame of a connection")
        try:
            if self._reads is None:
                from flexemr.transport.verbs import process_endpoint

                from flexemrd.embedding.reads import ReadRegistry

                self._reads = ReadRegistry(self.store, process_endpoint)
            # Cache fills: the shards this ranker may RDMA READ go into our blob (embedding/reads.py).
            conn, blob = upgrade_server_connection(peer.conn, hello.blob, priority=channel == "credit",
                                                   read_tables=self._reads.advertise)
            self._reads.bind(conn)
        except ProtocolError:
            raise
        except FlexemrError as e:  # RdmaUnavailable: this host has no usable device
            raise RequestRejected(ErrorCode.UNSUPPORTED, f"{self.name} cannot serve RDMA: {e}") from e
        # A fresh socket takes a small frame whole: blocking send, then switch.
        peer.conn.send_frame(codec.encode_hello(h.request_id, codec.ROLE_EMBEDDING, self.name,
                                                self.store.hello_shards(), blob=blob))
        if peer.events:
            self._sel.unregister(peer.fd)
            peer.events = 0
        self._peers.pop(peer.fd, None)
        peer.conn, peer.fd = conn, conn.fileno()
        self._peers[peer.fd] = peer

    def _register_ranker(self, peer: _Peer, h: Header, role: int, parts: list[str]) -> None:
        if role == codec.ROLE_RANKER and len(parts) == 3:
            # "<token>/<conn id>/data|credit": both channels of one ranker connection share a pool.
            channel = parts[2]
            if peer.member is not None:
                self.rankers.leave(peer.member)
            peer.member, pool = self.rankers.join(parts[0], parts[1], peer.conn.peer)
            peer.pool = pool
            if channel == "data" and h.aux > 0:
                peer.flow = True
                self._data_peer[id(pool)] = peer
                pool.give(h.aux)

    def _credit(self, pool: CreditPool | None, n: int, granted_ns: int) -> None:
        if pool is None:
            return
        if granted_ns:
            self._credit_lat.append(time.monotonic_ns() - granted_ns)
        pool.give(n)
        data = self._data_peer.get(id(pool))
        if data is not None and not data.dead:
            # Credits from the priority channel release the data connection at once.
            self._advance(data)
            self._flush(data)
            if not data.dead:
                self._update(data)

    # ------------------------------------------------------------------ pooling

    def _work(self, peer: _Peer, req: _Request) -> None:
        """Runs on a pooling worker: fills in the reply, then hands the request back to the loop."""
        h, payload = req.header, req.payload
        assert h is not None and payload is not None
        try:
            if h.type == FrameType.LOOKUP:
                lookup = codec.decode_lookup(payload, h.flags)
                waited_us = (time.perf_counter() - req.received) * 1e6
                if lookup.budget_us and waited_us > lookup.budget_us:
                    # Nobody waits for this answer any more: drop the work instead of computing it.
                    req.reply = codec.encode_error(
                        h.request_id, ErrorCode.DEADLINE_EXCEEDED,
                        f"{self.name}: deadline passed before pooling (waited {waited_us / 1e3:.1f} ms in the "
                        f"server's queue, budget {lookup.budget_us / 1e3:.1f} ms); the work was dropped")
                    req.stat = "expired"
                else:
                    pooled = self.store.pool(lookup)
                    # aux: the version that served it, so the ranker can check it never mixes versions
                    req.reply = codec.encode_lookup_response(h.request_id, lookup.table_ids, pooled,
                                                             aux=lookup.version or self.store.boot_version,
                                                             partials=codec.partials_of_flags(h.flags),
                                                             batch=lookup.kjt.batch)
                    req.stat = "lookups"
                    req.bags = sum(len(p) for p in pooled)
            else:
                tid, ids = codec.decode_fetch(payload)
                version = codec.fetch_version(payload, h.flags) or self.store.boot_version
                req.reply = codec.encode_fetch_response(h.request_id, tid, self.store.fetch(tid, ids, version),
                                                        aux=version)
                req.stat = "fetches"
        except (ProtocolError, RequestRejected) as e:
            if isinstance(e, ProtocolError):  # a malformed frame (a rejected id is an ordinary answer)
                self._warn.warn(peer.conn.peer, "bad-frame", "%s frame refused: %s", _type_name(h.type), e)
            req.reply, req.stat = codec.encode_error(h.request_id, e.code, str(e)), "errors"
        except Exception as e:  # a bug must not take the server down
            logger.exception("request %d failed", h.request_id)
            req.reply, req.stat = codec.encode_error(h.request_id, ErrorCode.INTERNAL, f"internal error: {e}"), "errors"
        self._done.append((peer, req))
        if not self.inline:
            self._wake()

    def _finish_done(self) -> None:
        touched: dict[int, _Peer] = {}
        while self._done:
            peer, req = self._done.popleft()
            req.state = _DONE
            peer.running -= 1
            peer.done += 1
            self.stats[req.stat] += 1
            self.stats["bags_pooled"] += req.bags
            self._sched.finished()
            self.rankers.count_answer(peer.member, req.stat)
            if not peer.dead:
                touched[id(peer)] = peer
        for peer in touched.values():
            self._ready(peer, 0)

    def _advance(self, peer: _Peer) -> None:
        """Move answered heads to the outbox (against credits), then start more pooling."""
        while peer.pending and peer.pending[0].state == _DONE:
            head = peer.pending[0]
            if head.needs_credit and peer.pool is not None and not peer.pool.take():
                break
            peer.pending.popleft()
            if head.header is not None:
                peer.done -= 1
            assert head.reply is not None
            self._enqueue(peer, head.reply, head.payload)
            head.reply = None
        while peer.queued and peer.running < self.RUNNING_PER_CONN and peer.done < self.REPLIES_AHEAD:
            req = peer.queued.popleft()
            req.state = _RUNNING
            peer.running += 1
            self._sched.push(peer.fd if peer.member is None else peer.member.ranker.token, self._work, peer, req)

    def _answer_now(self, peer: _Peer, reply: list) -> None:
        """An answer the loop made itself: it still waits behind earlier requests of this connection."""
        peer.pending.append(_Request(None, None, needs_credit=False, reply=reply))

    # ------------------------------------------------------------------ sending

    def _enqueue(self, peer: _Peer, frame: list, payload: memoryview | None) -> None:
        for b in frame:
            v = memoryview(b).cast("B")
            if len(v):
                peer.outbox.append(v)
                peer.outbox_bytes += len(v)
                peer.queued_bytes += len(v)
        if payload is not None:
            peer.recycle.append((peer.queued_bytes, payload))

    def _flush(self, peer: _Peer) -> None:
        out = peer.outbox
        if not out and peer.conn.send_backlogged():
            try:
                peer.conn.send_nowait([])   # RDMA: push what the stream holds as the ranker's grants arrive
            except OSError:
                self._drop(peer)
                return
        while out:
            try:
                n = peer.conn.send_nowait(out)
            except OSError:
                self._drop(peer)
                return
            if n == 0:
                break
            peer.sent_bytes += n
            peer.outbox_bytes -= n
            self.stats["bytes_out"] += n
            self.rankers.count_out(peer.member, n)
            while out and n >= len(out[0]):
                n -= len(out.popleft())
            if n:
                out[0] = out[0][n:]
        while peer.recycle and peer.recycle[0][0] <= peer.sent_bytes:
            peer.reader.recycle(peer.recycle.popleft()[1])
        if peer.closing and not out:
            self._drain(peer)
            self._drop(peer)

    def _drain(self, peer: _Peer) -> None:
        """Take what the peer already sent: closing a TCP socket with unread bytes resets the
        connection, which can destroy the ERROR frame before the peer reads it."""
        scratch = memoryview(bytearray(1 << 16))
        try:
            for _ in range(16):
                if not peer.conn.recv_nowait(scratch):
                    return
        except OSError:
            pass

    def _close_after(self, peer: _Peer, frame: list) -> None:
        """Send ``frame`` after what is already going out, then close (answers not yet made are dropped)."""
        peer.closing = True
        peer.close_by = time.monotonic() + self.CLOSE_GRACE_S
        peer.pending.clear()
        peer.queued.clear()
        self._enqueue(peer, frame, None)

    # ------------------------------------------------------------------ bookkeeping

    def _update(self, peer: _Peer) -> None:
        """Watch for what this connection can do next: read (unless paused or closing), write (if backed up)."""
        want = 0 if peer.closing or self._paused(peer) else selectors.EVENT_READ
        if peer.outbox:
            want |= selectors.EVENT_WRITE
        elif peer.conn.send_backlogged():
            # RDMA took the bytes but holds them until the ranker grants ring slots: its
            # fd turns readable when the grants land, even while reading is paused.
            want |= selectors.EVENT_READ
        if want == peer.events:
            return
        if peer.events == 0:
            self._sel.register(peer.fd, want, peer)
        elif want == 0:
            self._sel.unregister(peer.fd)
        else:
            self._sel.modify(peer.fd, want, peer)
        peer.events = want

    def _drop(self, peer: _Peer) -> None:
        if peer.dead:
            return
        peer.dead = True
        if peer.events:
            self._sel.unregister(peer.fd)
            peer.events = 0
        peer.conn.close()
        if self._peers.get(peer.fd) is peer:
            del self._peers[peer.fd]
        if peer.pool is not None and self._data_peer.get(id(peer.pool)) is peer:
            del self._data_peer[id(peer.pool)]
        if peer.member is not None:
            self.rankers.leave(peer.member)
            peer.member = None
        peer.pending.clear()
        peer.queued.clear()
        peer.outbox.clear()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (the pipe is full) or stopping

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


class _InlineExecutor:
    """Runs each task at once on the calling thread (the event loop): ``EmbeddingServer(inline=True)``."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> None:
        fn(*args)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _type_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return str(ftype)
