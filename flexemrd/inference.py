"""Inference process: the unix-socket API, batching, routing to engines, NN, replies.

    clients ──▶ session threads (decode + validate) ──▶ queue
                batcher thread: coalesce ≤ max_batch samples or max_wait_ms,
                split per server, write LOOKUP frames into engine rings
    engines ──▶ completion thread: one doorbell for all completion rings;
                add each partial into the batch's accumulators, release slot
                finisher thread: global pooling, DLRM forward, replies

The batcher is the only writer of the submission rings and the completion
thread the only reader of the completion rings (single producer, single
consumer).  Control requests (migrations, cache commands) are applied by the
batcher between batches, so the data path never waits on the control path.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from flexemr import enginemsg as em
from flexemr.errors import ProtocolError, RequestError
from flexemr.model.spec import ModelSpec
from flexemr.routing.split import split_batch
from flexemr.routing.table import RoutingTable
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameType, unpack_header
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.batching import Accumulator, Work, merge, validate

logger = logging.getLogger(__name__)


class Session:
    """One client connection; replies may come from the finisher thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True

    def send(self, frame: list) -> None:
        if not self.alive:
            return
        try:
            with self.lock:
                send_buffers(self.sock, frame)
        except OSError:
            self.alive = False


class Batch:
    __slots__ = ("seq", "works", "size", "tables", "acc", "remaining", "started", "error", "parts", "submitted",
                 "parts_done")

    def __init__(self, seq: int, works: list[Work], size: int, tables: list[int], acc: dict[int, Accumulator]) -> None:
        self.seq = seq
        self.works = works
        self.size = size
        self.tables = tables
        self.acc = acc
        self.remaining = 0
        self.started = time.perf_counter()
        self.submitted = self.started
        self.parts_done = self.started
        self.error: str | None = None
        self.parts: dict[int, tuple[int, list[int], list[np.ndarray]]] = {}  # rid -> (conn, tables, counts)


class LatencyWindow:
    """Recent request latencies for p50/p99 (bounded; read by the stats publisher)."""

    def __init__(self, size: int = 4096) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.samples = 0

    def add(self, seconds: float, samples: int) -> None:
        self.values.append(seconds)
        self.count += 1
        self.samples += samples

    def percentiles(self) -> tuple[float, float]:
        if not self.values:
            return 0.0, 0.0
        a = np.fromiter(self.values, dtype=np.float64)
        p50, p99 = np.percentile(a, [50, 99])
        return float(p50), float(p99)


class InferenceService:
    def __init__(
        self,
        spec: ModelSpec,
        routing: RoutingTable,
        connections: dict[int, tuple[int, str]],
        owners: dict[int, int],
        submission: list,
        completion: list,
        doorbell,
        dense_model=None,
        device: str = "cpu",
        max_batch: int = 4096,
        max_wait_s: float = 0.001,
        max_inflight: int = 4,
        max_request_bytes: int = 256 << 20,
        request_timeout_s: float = 30.0,
        cache=None,
        inband_credits: bool = False,
        shared_mapping: bool = False,
        local_pooler=None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.heartbeat = heartbeat or (lambda: None)  # ReadyPipe.beat: the supervisor's liveness check
        self.local_pooler = local_pooler
        self.inband_credits = inband_credits
        # "shared" mapping: subrequests go to engines in turn, whoever owns the
        # connection (engines then contend for per-connection locks).
        self._engine_rr = itertools.cycle(range(len(submission))) if shared_mapping else None
        self.spec = spec
        self.routing = routing
        self.connections = connections
        self.owners = dict(owners)                 # conn -> engine (the batcher's view)
        self.server_conns: dict[int, list[int]] = {}
        for cid, (server, _addr) in sorted(connections.items()):
            self.server_conns.setdefault(server, []).append(cid)
        self._rr = {s: itertools.cycle(c) for s, c in self.server_conns.items()}
        self.sub = submission
        self.comp = completion
        self.doorbell = doorbell
        self.model = dense_model
        self.device = device
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.cache = cache
        self.queue: queue.Queue[Work | None] = queue.Queue()
        self.finish_q: queue.Queue[Batch | None] = queue.Queue()
        self.inflight = threading.BoundedSemaphore(max_inflight)
        self.pending: dict[int, Batch] = {}
        self.fills: dict[int, tuple[int, int, np.ndarray]] = {}  # rid -> (conn, table, rows) of a cache fill
        self.pending_lock = threading.Lock()
        self.rids = itertools.count(1)
        self.seqs = itertools.count(1)
        self.stop = threading.Event()
        self.accepting = True
        self.latency = LatencyWindow()
        # Where a request's time goes, batch by batch (emrctl status --json: ranker.stages_ms).
        self.stages = {k: LatencyWindow(1024) for k in ("queue", "route", "remote", "finish")}
        self.errors = 0
        self.batches = 0
        self.batch_samples = 0
        self.conn_submitted: dict[int, int] = {c: 0 for c in connections}
        self.conn_completed: dict[int, int] = {c: 0 for c in connections}
        self.control_hooks: list[Callable[[], None]] = []
        nt = len(spec.tables)
        # Per-table counters (cumulative; the stats publisher sends deltas).
        self.t_lookups = np.zeros(nt, dtype=np.int64)   # bags looked up
        self.t_ids = np.zeros(nt, dtype=np.int64)       # ids looked up
        self.t_wire = np.zeros(nt, dtype=np.int64)      # bytes on the wire: ids out + partials back
        self._rate_prev = (time.monotonic(), 0)
        self._sessions: set[Session] = set()
        self._carry: Work | None = None
        self._threads: list[threading.Thread] = []
        self.listener: socket.socket | None = None

    # ------------------------------------------------------------------ serving

    def start(self, listener: socket.socket) -> None:
        self.listener = listener
        loops = [("accept", self._accept_loop), ("batcher", self._batcher), ("finisher", self._finisher)]
        if self.comp:
            loops.append(("completion", self._completion))
        for name, fn in loops:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def drain_and_stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer everything already accepted, then stop."""
        self.accepting = False
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.pending_lock:
                busy = bool(self.pending)
            if not busy and self.queue.empty() and self._carry is None and self.finish_q.empty() \
                    and self.inflight._value == self.inflight._initial_value:  # type: ignore[attr-defined]
                break
            time.sleep(0.005)
        self.stop.set()
        self.queue.put(None)
        self.finish_q.put(None)
        for t in self._threads:
            t.join(2)
        for s in list(self._sessions):
            try:
                s.sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        assert self.listener is not None
        self.listener.settimeout(0.2)
        while not self.stop.is_set() and self.accepting:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            s = Session(sock)
            self._sessions.add(s)
            threading.Thread(target=self._session_loop, args=(s,), daemon=True, name="session").start()

    def _session_loop(self, s: Session) -> None:
        reader = FrameReader(s.sock, self.max_request_bytes)
        try:
            while not self.stop.is_set():
                try:
                    h = reader.read_header()
                except ProtocolError as e:
                    fields = reader.raw_header_fields()
                    self.errors += 1
                    if fields[0] == b"FXMR" and fields[6] > self.max_request_bytes:
                        s.send(codec.encode_error(fields[5], ErrorCode.TOO_LARGE,
                                                  f"request of {fields[6]} bytes exceeds [ranker].max_request_bytes "
                                                  f"= {self.max_request_bytes}"))
                        reader.skip(fields[6])
                        continue
                    s.send(codec.encode_error(0, ErrorCode.BAD_FRAME, f"{e}; closing the connection"))
                    return
                # A fresh buffer per request: its arrays live on in the batch.
                payload = reader.read_payload_owned(h)
                if h.type == FrameType.PING:
                    s.send([codec.pack_header(FrameType.PONG, h.request_id, 0)])
                    continue
                if not self.accepting:
                    s.send(codec.encode_error(h.request_id, ErrorCode.UNAVAILABLE, "the ranker is shutting down"))
                    continue
                try:
                    work = self._admit(s, h, payload)
                except (RequestError, ProtocolError) as e:
                    self.errors += 1
                    s.send(codec.encode_error(h.request_id, ErrorCode.BAD_REQUEST, str(e)))
                    continue
                if work is not None:
                    self.queue.put(work)
        except (ConnectionError, OSError):
            pass
        finally:
            s.alive = False
            self._sessions.discard(s)
            try:
                s.sock.close()
            except OSError:
                pass

    def _admit(self, s: Session, h, payload) -> Work | None:
        if h.type not in (FrameType.PREDICT, FrameType.CLIENT_LOOKUP):
            raise RequestError(f"the inference socket serves PREDICT and LOOKUP frames, not type {h.type}")
        predict = h.type == FrameType.PREDICT
        req = codec.decode_client_request(payload, h.type)
        tables = validate(self.spec, req, predict)
        if req.batch == 0:
            if predict:
                s.send(codec.encode_scores(h.request_id, np.zeros(0, np.float32)))
            else:
                s.send(codec.encode_pooled(h.request_id, req.names,
                                           [np.zeros((0, self.spec.tables[i].dim), np.float32) for i in tables]))
            return None
        return Work(s, h.request_id, predict, req.batch, tables, req.dense, req.names)

    # ------------------------------------------------------------------ batcher

    def _next_batch(self) -> list[Work] | None:
        first = self._carry
        self._carry = None
        while first is None:
            if self.stop.is_set():
                return None
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                self.heartbeat()  # the batcher is the only loop without engines (local pooling)
                self._run_control_hooks()
                continue
            if first is None:
                return None
        works, n = [first], first.batch
        deadline = first.arrived + self.max_wait_s
        while n < self.max_batch:
            try:
                w = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if w is None:
                self.queue.put(None)
                break
            if n + w.batch > self.max_batch:
                self._carry = w
                break
            works.append(w)
            n += w.batch
        return works

    def _run_control_hooks(self) -> None:
        for hook in self.control_hooks:
            try:
                hook()
            except Exception:
                logger.exception("control hook failed")

    def _batcher(self) -> None:
        while True:
            self.heartbeat()
            works = self._next_batch()
            if works is None:
                return
            self._run_control_hooks()
            while not self.inflight.acquire(timeout=0.2):
                if self.stop.is_set():
                    return
            try:
                self._dispatch(works)
            except Exception as e:
                logger.exception("dispatch failed")
                self._fail_works(works, ErrorCode.INTERNAL, f"internal error while routing: {e}")
                self.inflight.release()

    def _dispatch(self, works: list[Work]) -> None:
        tables = sorted({t for w in works for t in w.tables})
        size, values, lengths = merge(works, tables)
        acc = {t: Accumulator(self.spec.tables[t].pooling, size, self.spec.tables[t].dim, ln)
               for t, ln in zip(tables, lengths)}
        batch = Batch(next(self.seqs), works, size, tables, acc)
        if self.local_pooler is not None:
            for t, v, ln in zip(tables, values, lengths):
                acc[t].set_pooled(self.local_pooler.pool(t, v, ln))
            self.finish_q.put(batch)
            return
        if self.cache is not None:
            values, lengths = self.cache.serve(batch, tables, values, lengths, self.queue.qsize())
        for t, v in zip(tables, values):
            self.t_lookups[t] += size
            self.t_ids[t] += len(v)
        plan = split_batch(self.routing, size, tables, values, lengths)
        for part in plan.parts.values():
            for t, v in zip(part.tables, part.values):
                self.t_wire[t] += 8 * len(v) + 4 * size + 4 * size * self.spec.tables[t].dim
        if not plan.parts:
            self.finish_q.put(batch)
            return
        batch.remaining = len(plan.parts)
        frames = []
        for server, part in plan.parts.items():
            cid = next(self._rr[server])
            rid = next(self.rids)
            batch.parts[rid] = (cid, part.tables, part.lengths)
            frames.append((cid, rid, codec.encode_lookup(rid, size, part.tables, part.lengths, part.values,
                                                         credit_trailer=self.inband_credits)))
        with self.pending_lock:
            for _cid, rid, _f in frames:
                self.pending[rid] = batch
        batch.submitted = time.perf_counter()
        for cid, rid, frame in frames:
            engine = self.owners[cid] if self._engine_rr is None else next(self._engine_rr)
            ok = self.sub[engine].write(em.PREFIX.pack(cid, 0), *frame, kind=em.SUB_FRAME, timeout=self.request_timeout_s)
            if not ok:
                self._complete_part(rid, error=f"engine {engine} did not accept the subrequest in time")
                continue
            self.conn_submitted[cid] += 1
        if self.cache is not None:
            self._send_fills()

    def _send_fills(self) -> None:
        """Fetch hot missed rows for the cache, after the batch's own subrequests (off the request path)."""
        for server, table, rows in self.cache.fill_requests():
            cid = next(self._rr[server])
            rid = next(self.rids)
            with self.pending_lock:
                self.fills[rid] = (cid, table, rows)
            engine = self.owners[cid] if self._engine_rr is None else next(self._engine_rr)
            # Never wait for ring space on behalf of a fill: skip it instead.
            if not self.sub[engine].write(em.PREFIX.pack(cid, 0), *codec.encode_fetch(rid, table, rows),
                                          kind=em.SUB_FRAME, timeout=0):
                self._fill_done(rid, None)

    def _fill_done(self, rid: int, payload: memoryview | None) -> bool:
        """Completion of a cache fill (False if ``rid`` is not a fill)."""
        with self.pending_lock:
            fill = self.fills.pop(rid, None)
        if fill is None:
            return False
        _cid, table, rows = fill
        data = None
        if payload is not None:
            tid, data = codec.decode_fetch_response(payload)
            if tid != table:
                data = None
        self.cache.filled(table, rows, data)
        return True

    # ------------------------------------------------------------------ control (batcher thread)

    def migrate(self, cid: int, to_engine: int) -> bool:
        """Route ``cid`` through ``to_engine`` from now on (runs on the batcher thread)."""
        old = self.owners[cid]
        if old == to_engine:
            return False
        if self._engine_rr is not None:
            raise ValueError("connections do not migrate under the \"shared\" mapping (every engine sends on all)")
        self.owners[cid] = to_engine
        self.sub[old].write(em.PREFIX.pack(cid, to_engine), kind=em.SUB_MIGRATE, timeout=10)
        logger.info("migrating connection %d from engine %d to engine %d", cid, old, to_engine)
        return True

    # ------------------------------------------------------------------ completions

    def _completion(self) -> None:
        last_check = time.monotonic()
        while not self.stop.is_set():
            self.heartbeat()
            self.doorbell.wait(0.2)
            for ring in self.comp:
                while True:
                    msg = ring.peek()
                    if msg is None:
                        break
                    try:
                        self._on_completion(msg.kind, msg.data)
                    except Exception:
                        logger.exception("bad completion")
                    finally:
                        msg.release()
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                self._expire(now)

    def _on_completion(self, kind: int, data: memoryview) -> None:
        cid, arg = em.PREFIX.unpack_from(data, 0)
        if kind == em.COMP_FRAME:
            h = unpack_header(data[em.PREFIX_SIZE : em.PREFIX_SIZE + HEADER_SIZE])
            payload = data[em.PREFIX_SIZE + HEADER_SIZE : em.PREFIX_SIZE + HEADER_SIZE + h.payload_len]
            if h.type == FrameType.LOOKUP_RESP:
                self.conn_completed[cid] = self.conn_completed.get(cid, 0) + 1
                self._complete_part(h.request_id, payload=payload)
            elif h.type == FrameType.FETCH_RESP:
                self._fill_done(h.request_id, payload)
            elif h.type == FrameType.ERROR and self.fills and self._fill_done(h.request_id, None):
                pass
            elif h.type == FrameType.ERROR:
                self.conn_completed[cid] = self.conn_completed.get(cid, 0) + 1
                msg = codec.decode_error(payload)
                self._complete_part(h.request_id, error=f"embedding server {self.connections[cid][0]}: {msg}")
        elif kind == em.COMP_LOST:
            reason = bytes(data[em.PREFIX_SIZE :]).decode("utf-8", "replace")
            with self.pending_lock:
                rids = [rid for rid, b in self.pending.items() if b.parts.get(rid, (None,))[0] == cid]
                lost_fills = [rid for rid, f in self.fills.items() if f[0] == cid]
            for rid in rids:
                self._complete_part(rid, error=reason)
            for rid in lost_fills:
                self._fill_done(rid, None)
        elif kind == em.COMP_MIGRATED:
            self.on_migrated(cid, arg)

    def on_migrated(self, cid: int, engine: int) -> None:
        """Hook: the connection now lives in ``engine`` (the control glue replaces it)."""
        logger.info("connection %d now lives in engine %d", cid, engine)

    def _complete_part(self, rid: int, payload: memoryview | None = None, error: str | None = None) -> None:
        with self.pending_lock:
            batch = self.pending.pop(rid, None)
        if batch is None:
            return  # the batch already failed or expired
        cid, tables, counts = batch.parts[rid]
        if error is not None:
            batch.error = batch.error or error
        elif batch.error is None:
            tids, partials = codec.decode_lookup_response(payload)
            for t, part, cnt in zip(tables, partials, counts):
                batch.acc[t].add(part, cnt)
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.parts_done = time.perf_counter()
            self.finish_q.put(batch)

    def _expire(self, now: float) -> None:
        limit = time.perf_counter() - self.request_timeout_s
        with self.pending_lock:
            old = [rid for rid, b in self.pending.items() if b.started < limit]
        for rid in old:
            self._complete_part(rid, error=f"no answer from the embedding servers within {self.request_timeout_s:g} s")

    # ------------------------------------------------------------------ finishing

    def _finisher(self) -> None:
        while True:
            batch = self.finish_q.get()
            if batch is None:
                return
            try:
                if batch.error is not None:
                    self._fail_works(batch.works, ErrorCode.UNAVAILABLE, batch.error)
                else:
                    self._finish(batch)
            except Exception as e:
                logger.exception("finishing batch %d failed", batch.seq)
                self._fail_works(batch.works, ErrorCode.INTERNAL, f"internal error: {e}")
            finally:
                self.inflight.release()

    def _finish(self, batch: Batch) -> None:
        pooled = {t: batch.acc[t].result() for t in batch.tables}
        scores = None
        if any(w.predict for w in batch.works):
            scores = self._forward(batch, pooled)
        off = 0
        done = time.perf_counter()
        for w in batch.works:
            sl = slice(off, off + w.batch)
            off += w.batch
            if w.predict:
                w.session.send(codec.encode_scores(w.request_id, scores[sl]))
            else:
                order = [self.spec.table_index(n) for n in w.names]
                w.session.send(codec.encode_pooled(w.request_id, w.names, [pooled[t][sl] for t in order]))
            self.latency.add(done - w.arrived, w.batch)
        sent = time.perf_counter()
        st = self.stages
        st["queue"].add(batch.started - batch.works[0].arrived, 0)
        if batch.parts:
            st["route"].add(batch.submitted - batch.started, 0)
            st["remote"].add(batch.parts_done - batch.submitted, 0)
            st["finish"].add(sent - batch.parts_done, 0)
        else:
            st["finish"].add(sent - batch.started, 0)
        self.batches += 1
        self.batch_samples += batch.size

    def _forward(self, batch: Batch, pooled: dict[int, np.ndarray]) -> np.ndarray:
        """Scores for the batch's predict requests (lookup-only rows stay 0 and are not sent)."""
        import torch

        if all(w.predict for w in batch.works):
            rows = None
            dense = batch.works[0].dense if len(batch.works) == 1 else np.concatenate([w.dense for w in batch.works])
        else:
            starts = np.cumsum([0] + [w.batch for w in batch.works[:-1]])
            rows = np.concatenate([np.arange(o, o + w.batch) for o, w in zip(starts, batch.works) if w.predict])
            dense = np.concatenate([w.dense for w in batch.works if w.predict])
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense)).to(self.device)
            emb = [torch.from_numpy(pooled[t] if rows is None else pooled[t][rows]).to(self.device)
                   for t in range(len(self.spec.tables))]
            out = self.model(d, emb).float().cpu().numpy()
        if rows is None:
            return out
        full = np.zeros(batch.size, dtype=np.float32)
        full[rows] = out
        return full

    def _fail_works(self, works: list[Work], code: int, message: str) -> None:
        self.errors += len(works)
        for w in works:
            w.session.send(codec.encode_error(w.request_id, code, message))

    # ------------------------------------------------------------------ stats

    def table_counters(self) -> dict[str, np.ndarray]:
        out = {"lookups": self.t_lookups.copy(), "ids_total": self.t_ids.copy(), "bytes_wire": self.t_wire.copy()}
        if self.cache is not None:
            out["hits"] = self.cache.hits_by_table()
        return out

    def stats(self) -> dict[str, Any]:
        p50, p99 = self.latency.percentiles()
        now, count = time.monotonic(), self.latency.count
        t0, c0 = self._rate_prev
        rate = (count - c0) / (now - t0) if now > t0 else 0.0
        if now - t0 >= 1.0:
            self._rate_prev = (now, count)
        return {
            "requests_per_s": rate,
            "requests_total": self.latency.count,
            "samples_total": self.latency.samples,
            "errors_total": self.errors,
            "batches_total": self.batches,
            "mean_batch": (self.batch_samples / self.batches) if self.batches else 0.0,
            "latency_p50_ms": p50 * 1e3,
            "latency_p99_ms": p99 * 1e3,
            "inflight_batches": len({id(b) for b in list(self.pending.values())}),
            "stages_ms": {k: [round(v * 1e3, 2) for v in w.percentiles()] for k, w in self.stages.items()},
        }


def bind_unix_socket(path: str, mode: int = 0o660) -> socket.socket:
    """Bind the inference socket, replacing a stale one left by a crash."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            probe.close()
            raise RuntimeError(f"{path} is in use by a running ranker")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(256)
    return sock
