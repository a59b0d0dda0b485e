"""Embedding server: holds table shards and answers pooled lookups with partial pools.

Tables are mapped read-only from the model directory's ``.npy`` files (whole
files: ids stay global, only the pages of this server's shards are touched).
Each ranker connection gets a thread; torch's ``embedding_bag`` releases the
GIL, so connections pool in parallel.

A bad request (unknown table, id outside this server's shards, sizes that
disagree, an oversized frame) is answered with an ERROR frame and the
connection keeps serving.  Only a frame whose *header* is unreadable (wrong
magic or version) closes that one connection, because the byte stream can no
longer be resynchronised; the process and other connections are unaffected.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import socket
import threading
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flexemr.errors import ProtocolError
from flexemr.model.spec import ModelSpec
from flexemr.model.tables import open_tables
from flexemr.routing.table import Shard
from flexemr.types import Pooling
from flexemr.wire import codec
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, ErrorCode, FrameFlag, FrameType, pack_header
from flexemr.wire.stream import FrameReader, send_buffers

logger = logging.getLogger(__name__)


class RequestRejected(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(slots=True)
class _TableState:
    index: int
    name: str
    dim: int
    mode: str              # torch embedding_bag mode: "sum" (sum and mean) or "max"
    weight: torch.Tensor   # the whole table (read-only map)
    starts: np.ndarray     # shard range starts held here (sorted)
    ends: np.ndarray
    whole: bool = False    # every row is held here: embedding_bag's own bounds check suffices


class EmbeddingStore:
    """The shards this server holds and the pooling kernel over them (no sockets)."""

    def __init__(self, model_dir: str, spec: ModelSpec, shards: Sequence[Shard]) -> None:
        self.spec = spec
        names = sorted({s.table for s in shards}, key=spec.table_index)
        maps = open_tables(model_dir, spec, names)
        self.tables: dict[int, _TableState] = {}
        for name in names:
            idx = spec.table_index(name)
            t = spec.tables[idx]
            mine = sorted((s for s in shards if s.table == name), key=lambda s: s.start)
            with warnings.catch_warnings():
                # The map is read-only on purpose; torch only reads it.
                warnings.simplefilter("ignore", UserWarning)
                weight = torch.from_numpy(maps[name])
            self.tables[idx] = _TableState(
                index=idx,
                name=name,
                dim=t.dim,
                mode="max" if t.pooling is Pooling.MAX else "sum",
                weight=weight,
                starts=np.array([s.start for s in mine], dtype=np.int64),
                ends=np.array([s.end for s in mine], dtype=np.int64),
                whole=len(mine) == 1 and mine[0].start == 0 and mine[0].end == t.rows,
            )
        self.shards = list(shards)

    def hello_shards(self) -> list[tuple[int, int, int, int]]:
        return [(self.spec.table_index(s.table), self.spec.table(s.table).dim, s.start, s.end) for s in self.shards]

    def _table(self, tid: int) -> _TableState:
        st = self.tables.get(int(tid))
        if st is None:
            what = self.spec.tables[tid].name if tid < len(self.spec.tables) else f"#{tid}"
            raise RequestRejected(ErrorCode.UNKNOWN_TABLE, f"table {what} is not held by this server")
        return st

    def _check_ids(self, st: _TableState, ids: np.ndarray) -> None:
        if not len(ids):
            return
        lo, hi = int(ids.min()), int(ids.max())
        if len(st.starts) == 1 and lo >= st.starts[0] and hi < st.ends[0]:
            return
        k = np.searchsorted(st.starts, ids, side="right") - 1
        bad = (k < 0) | (ids >= st.ends[np.maximum(k, 0)])
        if bad.any():
            first = int(ids[np.argmax(bad)])
            ranges = ", ".join(f"[{a}, {b})" for a, b in zip(st.starts, st.ends))
            raise RequestRejected(
                ErrorCode.ID_OUT_OF_RANGE,
                f"table {st.name}: id {first} is outside the rows this server holds ({ranges}); "
                f"{int(bad.sum())} ids out of range",
            )

    def pool(self, req: codec.LookupRequest) -> list[torch.Tensor]:
        """Partial pools [B, dim] per requested table (sums for mean tables)."""
        kjt = req.kjt
        out = []
        states = [self._table(t) for t in req.table_ids]
        for i, st in enumerate(states):
            if not st.whole:  # ids of other servers' shards are valid rows to torch: check here
                self._check_ids(st, kjt.table(i)[0])
        for i, st in enumerate(states):
            values, lengths = kjt.table(i)
            offsets = np.zeros(kjt.batch + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            try:
                out.append(
                    F.embedding_bag(
                        torch.from_numpy(values), st.weight, torch.from_numpy(offsets),
                        mode=st.mode, include_last_offset=True,
                    )
                )
            except RuntimeError:
                # A whole table's ids are checked by the kernel as it gathers (a
                # separate min/max pass costs ~5% of a lookup); name the bad id.
                self._check_ids(st, values)
                raise
        return out

    def fetch(self, table_id: int, ids: np.ndarray) -> np.ndarray:
        st = self._table(table_id)
        self._check_ids(st, ids)
        return st.weight.numpy()[ids]


class CreditPool:
    """Response slots a ranker connection has granted this server (FlexEMR 3.2).

    A response is sent only against a credit.  Credits arrive on the priority
    channel (a separate connection) or in band on lookups; either way they are
    applied by the thread that reads them, never by the one waiting to send.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.credits = 0
        self.received = 0
        self.waits = 0
        self.wait_ns = 0

    def give(self, n: int) -> None:
        with self._cond:
            self.credits += n
            self.received += n
            self._cond.notify_all()

    def take(self, stop: threading.Event) -> bool:
        with self._cond:
            if self.credits <= 0:
                self.waits += 1
                t0 = time.perf_counter_ns()
                while self.credits <= 0 and not stop.is_set():
                    self._cond.wait(0.2)
                self.wait_ns += time.perf_counter_ns() - t0
            if self.credits <= 0:
                return False
            self.credits -= 1
            return True


class _ConnCtx:
    """Per-connection state: a send lock (reader and worker both answer) and its credits."""

    __slots__ = ("sock", "peer", "send_lock", "pool", "work", "worker", "replies", "sender", "closed", "spare")

    SPARE_BUFFERS = 4               # the daemon's default credits per connection
    SPARE_MAX_BYTES = 64 << 20      # a rare huge request does not pin its buffer

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self.pool: CreditPool | None = None
        self.work: "queue.Queue | None" = None
        self.worker: threading.Thread | None = None
        self.replies: "queue.Queue | None" = None   # worker -> sender, bounded
        self.sender: threading.Thread | None = None
        self.closed = threading.Event()
        self.spare: collections.deque[bytearray] = collections.deque()

    def buffer(self, n: int) -> memoryview:
        """A buffer for a queued payload: a recycled one if big enough.

        A fresh multi-MB buffer costs a page fault per 4 KiB on its first write
        (~1.5 ms of CPU per 10 MB received), which competes with pooling.
        """
        while self.spare:
            buf = self.spare.pop()
            if len(buf) >= n:
                return memoryview(buf)[:n]
        return memoryview(bytearray(n))

    def recycle(self, payload: memoryview) -> None:
        """Give back a payload once nothing refers to its contents (its reply is sent)."""
        buf = payload.obj
        if isinstance(buf, bytearray) and len(buf) <= self.SPARE_MAX_BYTES and len(self.spare) < self.SPARE_BUFFERS:
            self.spare.append(buf)


class EmbeddingServer:
    """Accepts ranker connections on a TCP socket and serves each in a thread.

    A flow-controlled connection (its HELLO grants credits) gets three threads:
    the reader (frames in, credits applied at once), a worker (pools) and a
    sender (waits for a credit, sends), so reading, pooling and sending of
    successive requests overlap.
    """

    REPLIES_AHEAD = 2   # pooled replies a worker may hold while the sender waits for credits

    def __init__(
        self,
        store: EmbeddingStore,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "embedding",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        sock: socket.socket | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.max_payload = max_payload
        if sock is None:
            sock = socket.create_server((host, port), backlog=128)
        self.sock = sock
        self.address = sock.getsockname()[:2]
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._pools: dict[str, CreditPool] = {}
        self._credit_lat = collections.deque(maxlen=8192)
        self.stats = {k: 0 for k in codec.SERVER_STATS}

    def serve_forever(self, on_ready: Callable[[], None] | None = None,
                      heartbeat: Callable[[], None] | None = None) -> None:
        self.sock.settimeout(0.2)
        if on_ready:
            on_ready()
        logger.info("serving %d shards on %s:%d", len(self.store.shards), *self.address)
        while not self._stop.is_set():
            if heartbeat is not None:
                heartbeat()  # ReadyPipe.beat: the supervisor's liveness check
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
                self.stats["connections"] += 1
            threading.Thread(target=self._serve_conn, args=(conn, peer), daemon=True, name=f"conn-{peer}").start()
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pool(self, key: str) -> CreditPool:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = CreditPool()
            return pool

    def counters(self) -> list[int]:
        lat = np.fromiter(self._credit_lat, dtype=np.int64) if self._credit_lat else None
        pools = list(self._pools.values())
        s = dict(self.stats)
        s["credits_received"] = sum(p.received for p in pools)
        s["credit_waits"] = sum(p.waits for p in pools)
        s["credit_wait_ns"] = sum(p.wait_ns for p in pools)
        if lat is not None:
            s["credit_latency_p50_ns"], s["credit_latency_p99_ns"] = (int(x) for x in np.percentile(lat, [50, 99]))
            s["credit_samples"] = len(lat)
        return [max(0, int(s.get(k, 0))) for k in codec.SERVER_STATS]

    # ------------------------------------------------------------ per connection

    def _send(self, ctx: _ConnCtx, frame: list) -> None:
        with ctx.send_lock:
            self.stats["bytes_out"] += send_buffers(ctx.sock, frame)

    def _serve_conn(self, conn: socket.socket, peer) -> None:
        ctx = _ConnCtx(conn, peer)
        reader = FrameReader(conn, self.max_payload)
        try:
            while not self._stop.is_set():
                try:
                    h = reader.read_header()
                except ProtocolError as e:
                    # Too large: we know the length, so skip it and go on. Anything
                    # else means the stream is lost: say why, then close this one.
                    self.stats["errors"] += 1
                    skip = _oversized_length(reader)
                    if skip is not None:
                        self._send(ctx, codec.encode_error(_request_id(reader), ErrorCode.TOO_LARGE, str(e)))
                        reader.skip(skip)
                        continue
                    self._send(ctx, codec.encode_error(0, ErrorCode.BAD_FRAME, str(e)))
                    logger.warning("closing connection from %s: %s", peer, e)
                    return
                self.stats["bytes_in"] += 32 + h.payload_len
                if ctx.work is not None and h.type in (FrameType.LOOKUP, FrameType.FETCH):
                    # Flow-controlled: a worker pools and waits for credits, so this
                    # thread keeps reading (and applying in-band credits) meanwhile.
                    payload = ctx.buffer(h.payload_len)
                    reader.read_payload_into(h, payload)
                    if h.flags & FrameFlag.INBAND_CREDIT and h.type == FrameType.LOOKUP:
                        try:
                            granted_ns = codec.inband_grant_ns(payload)
                        except ProtocolError as e:  # too short for its trailer: answer, keep serving
                            self.stats["errors"] += 1
                            self._send(ctx, codec.encode_error(h.request_id, e.code, str(e)))
                            continue
                        if h.aux:  # the trailer is always there; credits only when aux > 0
                            self._credit(ctx.pool, h.aux, granted_ns)
                    ctx.work.put((h, payload))
                    continue
                payload = reader.read_payload(h)
                if h.type == FrameType.CREDIT:
                    self._credit(ctx.pool, h.aux, codec.decode_credit(payload))
                    continue
                if h.type == FrameType.HELLO:
                    self._hello(ctx, h, payload)
                    continue
                reply = self._answer(h, payload)
                if reply is not None:
                    self._send(ctx, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            ctx.closed.set()  # a reply still waiting for a credit has nobody to go to
            if ctx.work is not None:
                ctx.work.put(None)
            with self._lock:
                self._conns.discard(conn)
            if ctx.worker is not None:
                ctx.worker.join(5)
            if ctx.sender is not None:
                ctx.sender.join(5)
            conn.close()

    def _credit(self, pool: CreditPool | None, n: int, granted_ns: int) -> None:
        if pool is None:
            return
        if granted_ns:
            self._credit_lat.append(time.monotonic_ns() - granted_ns)
        pool.give(n)

    def _hello(self, ctx: _ConnCtx, h, payload) -> None:
        hello = codec.decode_hello(payload)
        parts = hello.name.split("/")
        if hello.role == codec.ROLE_RANKER and len(parts) == 3:
            key, channel = "/".join(parts[:2]), parts[2]
            pool = self._pool(key)
            ctx.pool = pool
            if channel == "data" and h.aux > 0:
                pool.give(h.aux)
                ctx.work = queue.Queue()
                ctx.replies = queue.Queue(maxsize=self.REPLIES_AHEAD)
                ctx.worker = threading.Thread(target=self._worker, args=(ctx,), daemon=True, name="worker")
                ctx.sender = threading.Thread(target=self._sender, args=(ctx,), daemon=True, name="sender")
                ctx.worker.start()
                ctx.sender.start()
        self._send(ctx, codec.encode_hello(h.request_id, codec.ROLE_EMBEDDING, self.name, self.store.hello_shards()))

    def _worker(self, ctx: _ConnCtx) -> None:
        """Pools queued requests; hands replies to the sender, so pooling the next
        request overlaps sending this one (a 17 MB LOOKUP_RESP takes ~10% of a lookup)."""
        assert ctx.work is not None and ctx.replies is not None
        while True:
            item = ctx.work.get()
            if item is None:
                self._hand_over(ctx, None)
                return
            h, payload = item
            reply = self._answer(h, payload)
            if reply is None:
                ctx.recycle(payload)
                continue
            if not self._hand_over(ctx, (reply, payload)):
                return

    def _hand_over(self, ctx: _ConnCtx, item) -> bool:
        """Queue a reply for the sender; blocks while REPLIES_AHEAD replies wait for credits."""
        while True:
            try:
                ctx.replies.put(item, timeout=0.2)
                return True
            except queue.Full:
                if ctx.closed.is_set() or not ctx.sender.is_alive():
                    return False

    def _sender(self, ctx: _ConnCtx) -> None:
        """Sends replies in request order, each against one credit."""
        assert ctx.replies is not None and ctx.pool is not None
        while True:
            item = ctx.replies.get()
            if item is None:
                return
            reply, payload = item
            if not ctx.pool.take(ctx.closed):
                return
            try:
                self._send(ctx, reply)
            except OSError:
                return
            # Only now: a reply may refer to the request's bytes (a LOOKUP_RESP's table ids).
            del reply, item
            ctx.recycle(payload)

    def _answer(self, h, payload) -> list | None:
        try:
            return self._handle(h, payload)
        except RequestRejected as e:
            self.stats["errors"] += 1
            return codec.encode_error(h.request_id, e.code, str(e))
        except ProtocolError as e:
            self.stats["errors"] += 1
            return codec.encode_error(h.request_id, e.code, str(e))
        except Exception as e:  # a bug must not take the server down
            logger.exception("request %d failed", h.request_id)
            return codec.encode_error(h.request_id, ErrorCode.INTERNAL, f"internal error: {e}")

    def _handle(self, h, payload) -> list | None:
        t = h.type
        if t == FrameType.LOOKUP:
            req = codec.decode_lookup(payload, h.flags)
            pooled = self.store.pool(req)
            self.stats["lookups"] += 1
            return codec.encode_lookup_response(h.request_id, req.table_ids, [p.numpy() for p in pooled])
        if t == FrameType.FETCH:
            tid, ids = codec.decode_fetch(payload)
            self.stats["fetches"] += 1
            return codec.encode_fetch_response(h.request_id, tid, self.store.fetch(tid, ids))
        if t == FrameType.PING:
            return [pack_header(FrameType.PONG, h.request_id, 0)]
        if t == FrameType.STATS:
            return codec.encode_stats(h.request_id, self.counters())
        raise RequestRejected(ErrorCode.UNSUPPORTED, f"an embedding server does not serve {FrameType(t).name} frames")


def _oversized_length(reader: FrameReader) -> int | None:
    """Payload length of a header refused only for its size (so it can be skipped)."""
    from flexemr.wire.frame import MAGIC, VERSION

    magic, version, _t, _f, _a, _rid, plen = reader.raw_header_fields()
    if magic == MAGIC and version == VERSION and plen > reader.max_payload:
        return plen
    return None


def _request_id(reader: FrameReader) -> int:
    return reader.raw_header_fields()[5]
