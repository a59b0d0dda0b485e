"""Inference client: the Python API over the ranker's unix socket (a DESIGN.md contract).

    from flexemr.client import InferenceClient
    with InferenceClient("/run/flexemr/ranker.sock") as c:
        scores = c.predict(dense, sparse)   # -> np.ndarray [B] float32
        pooled = c.lookup(sparse)           # -> dict[name, np.ndarray [B, dim] float32]
        scores = c.predict_csr(dense, keys, row_index, tables=spec.table_names)  # HPS-style CSR

``sparse`` maps table name to ``(values, lengths)``: int64 ids and int32 bag
lengths (TorchRec's KeyedJaggedTensor layout).  Input is checked here first
(shapes, dtypes, lengths that do not add up: the encoding checks of
:mod:`flexemr.validation`) so mistakes fail fast with a message naming the
field; the ranker runs the model checks (``validate_request``: table names, id
ranges, dense width, finite features) and answers an ERROR frame, raised as
RequestError.  One client
object serves one request at a time; use one per thread.

Deadlines: ``predict(..., timeout_ms=50)`` sends the budget with the request;
the ranker and the embedding servers drop work that can no longer make it and
the call raises ``DeadlineExceeded`` naming the stage that ran out of time.
A call whose answer does not arrive in time on the socket (the client's own
timeout) discards the connection, so the next call is never answered with a
late answer to this one; the client reconnects on its next call.

Shared-memory replies (``shm_replies=True``, the default): on connecting, the
client offers the ranker a reply region (a sealed memfd of
``reply_region_bytes``, cut into ``reply_slots`` slots, passed over the
socket; see :mod:`flexemr.wire.replyslot`).  A ranker that takes it writes
each answer once into a slot the request names, and the arrays returned are
numpy views of that slot: no copy on either side of the socket.  A slot stays
**leased** until every array returned from it (and every view of those) is
garbage, so the ranker never writes over an answer the caller still holds.
With every slot leased (a caller keeping many answers), or an answer larger
than a slot, answers come by the normal frame: a call never waits for a slot.
An old ranker, or one that refuses the region (its per-process limit,
``shm_replies_error`` says why), is served by frames as before.  Arrays from
a slot are writable; writing them touches only that answer.  Use
``np.copy`` to keep an answer for long without holding its slot.

Shared-memory requests (``shm_requests=True``, the default, with
``shm_replies``): the region also holds a request area of
``request_region_bytes``; a ranker that takes requests from it (it says so in
its PONG and its REPLY_REGION ack) reads each request's ids, lengths and dense
features from there, and the socket carries a 16-byte descriptor (see
:mod:`flexemr.wire.requestslot`).  A request larger than the area goes by
frame (logged once per client); an old ranker, or one with
``[ranker].shm_requests = false``, gets frames (logged once per connection).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from typing import NoReturn, Sequence

import numpy as np

from flexemr.client_shm import DEFAULT_REGION_BYTES, DEFAULT_REQUEST_BYTES, DEFAULT_SLOTS, ReplyRegion, Slot
from flexemr.errors import DeadlineExceeded, ProtocolError, RemoteError, RequestError
from flexemr.kserve.convert import csr_to_kjt
from flexemr.model.spec import ModelSpec
from flexemr.validation import Sparse, prepare_dense, prepare_sparse
from flexemr.wire import codec
from flexemr.wire import replyslot, requestslot
from flexemr.wire.frame import ErrorCode, FrameType, Header, pack_header
from flexemr.wire.stream import FrameReader, send_buffers

__all__ = ["InferenceClient", "Sparse", "prepare_sparse"]

logger = logging.getLogger(__name__)


class _Request:
    """One checked request, encoded when the connection is known: as a frame, or into the shared region."""

    __slots__ = ("rid", "names", "lengths", "values", "batch", "dense", "timeout_ms", "narrow")

    def __init__(self, rid: int, names: list[str], lengths: list[np.ndarray], values: list[np.ndarray], batch: int,
                 dense: np.ndarray | None, timeout_ms: int, narrow: bool) -> None:
        self.rid, self.names, self.lengths, self.values = rid, names, lengths, values
        self.batch, self.dense, self.timeout_ms, self.narrow = batch, dense, timeout_ms, narrow

    def frame(self) -> list:
        return codec.encode_client_request(self.rid, self.names, self.lengths, self.values, self.batch, self.dense,
                                           timeout_ms=self.timeout_ms, narrow_ids=self.narrow)

    def into(self, region: ReplyRegion) -> list | None:
        """Write the payload into ``region``'s request area; the descriptor frame, or None if it does not fit."""
        done = codec.write_client_request(region.request_area, self.rid, self.names, self.lengths, self.values,
                                          self.batch, self.dense, timeout_ms=self.timeout_ms, narrow_ids=self.narrow)
        if done is None:
            return None
        head, n = done
        return requestslot.encode_descriptor([head], region.request_offset, n)


def _timeout(timeout_ms: int | None) -> int:
    if timeout_ms is None:
        return 0
    if not (isinstance(timeout_ms, (int, np.integer)) or float(timeout_ms).is_integer()) or timeout_ms <= 0:
        raise RequestError(f"timeout_ms: must be a positive whole number of milliseconds, got {timeout_ms!r}")
    return int(timeout_ms)


class InferenceClient:
    """A connection to a ranker's inference socket."""

    def __init__(self, path: str, timeout: float | None = 60.0, max_payload: int = 1 << 30,
                 narrow_ids: bool = True, shm_replies: bool = True,
                 reply_region_bytes: int = DEFAULT_REGION_BYTES, reply_slots: int = DEFAULT_SLOTS,
                 shm_requests: bool = True, request_region_bytes: int = DEFAULT_REQUEST_BYTES) -> None:
        """``narrow_ids``: send ids as int32 when they all fit (one max pass per table; half the id bytes).

        ``shm_replies``: offer the ranker a reply region of ``reply_region_bytes`` in ``reply_slots``
        slots (see the module docstring); False: every answer comes by frame over the socket.
        ``shm_requests``: the region also carries requests, up to ``request_region_bytes`` each (needs
        ``shm_replies``); False: every request goes by frame over the socket.
        """
        self.path = path
        self.narrow_ids = narrow_ids
        self.timeout = timeout
        self.max_payload = max_payload
        self.shm_replies = shm_replies
        self.reply_region_bytes = reply_region_bytes
        self.reply_slots = reply_slots
        self.shm_requests = shm_replies and shm_requests
        self.request_region_bytes = request_region_bytes if self.shm_requests else 0
        if shm_replies:
            ReplyRegion.check_size(reply_region_bytes, reply_slots)
            ReplyRegion.check_request_size(self.request_region_bytes)
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._region: ReplyRegion | None = None
        self._early_error: tuple[Header, memoryview] | None = None   # an ERROR frame that answered the region offer
        # Why the ranker took no reply region on the last connect (None: it took it, or none was offered).
        self.shm_replies_error: str | None = None
        self._requests_in_region = False    # the ranker reads requests from the region (it said so)
        self._told_too_big = False          # the "does not fit the request area" line is logged once
        # Requests sent through the shared region (the others went by frame), all connections together.
        self.shm_requests_sent = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # The model version that served the last answer (0: the ranker did not name one).
        self.last_version = 0
        self._flags = 0
        self._connect()

    @property
    def shm_active(self) -> bool:
        """True when answers on this connection may come through the shared reply region."""
        return self._region is not None

    @property
    def shm_requests_active(self) -> bool:
        """True when requests on this connection go through the shared region (those that fit its area)."""
        return self._region is not None and self._requests_in_region

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ConnectionError(f"no flexemr ranker is serving on {self.path}: {e.strerror}") from None
        self._sock = sock
        self._reader = FrameReader(sock, self.max_payload)
        if self.shm_replies:
            try:
                self._offer_region()
            except BaseException:
                self._discard()
                raise

    def _offer_region(self) -> None:
        """PING with REPLY_SLOT; a ranker that answers PONG with it gets a fresh region (wire/replyslot.py)."""
        assert self._sock is not None and self._reader is not None
        rid = next(self._ids)
        send_buffers(self._sock, [pack_header(FrameType.PING, rid, 0, flags=replyslot.REPLY_SLOT)])
        h, payload = self._answer(rid)
        if h.type == FrameType.ERROR:
            # Said to the connection, not to the PING (OVERLOADED at accept): the first call reports it,
            # as it would without the offer.
            self._early_error = (h, payload)
            return
        if h.type != FrameType.PONG or not h.flags & replyslot.REPLY_SLOT:
            return   # a ranker without reply regions: frames as before
        # A request area only for a ranker that reads one (its pages would cost nothing, its budget would).
        takes_requests = bool(self.shm_requests and h.flags & requestslot.REQUEST_SLOT)
        if self.shm_requests and not takes_requests:
            logger.info("the ranker on %s reads no requests from shared memory (an older ranker, or "
                        "[ranker].shm_requests = false): requests go by frame", self.path)
        region = ReplyRegion(self.reply_region_bytes, self.reply_slots,
                             self.request_region_bytes if takes_requests else 0)
        rid = next(self._ids)
        try:
            replyslot.send_with_fd(self._sock, replyslot.encode_region(
                rid, region.region_bytes, requestslot.REQUEST_SLOT if takes_requests else 0), region.fd)
            h, payload = self._answer(rid)
        finally:
            region.close()   # the ranker holds its own descriptor; the mapping stays
        if h.type == FrameType.ERROR:
            self.shm_replies_error = codec.decode_error(payload)
            logger.warning("the ranker on %s refused the reply region, answers come by frame: %s",
                           self.path, self.shm_replies_error)
            return
        if h.type != FrameType.REPLY_REGION:
            raise ProtocolError(f"expected REPLY_REGION, got frame type {h.type}")
        self._region = region
        self._requests_in_region = bool(takes_requests and h.flags & requestslot.REQUEST_SLOT)
        self.shm_replies_error = None

    def _answer(self, request_id: int) -> tuple[Header, memoryview]:
        """The next frame answering ``request_id`` (header, payload), skipping late answers to earlier calls."""
        assert self._reader is not None
        while True:
            h = self._reader.read_header()
            # A fresh buffer per answer: the arrays we return are views of it,
            # so nothing is copied after the socket read.
            payload = self._reader.read_payload_owned(h)
            if h.request_id == request_id or h.request_id == 0:
                return h, payload
            if h.request_id > request_id:
                raise ProtocolError(f"answer to request {h.request_id} while waiting for {request_id}")
            # A late answer to an earlier call: skip it.

    def _discard(self) -> None:
        """Drop the connection: whatever it still owes us must never answer a later call.

        The region goes with it: the ranker may still write a late answer into the slot
        in flight, so no slot of it is ever named again (leased arrays keep its memory)."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = self._reader = None
        self._region = None

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._discard()

    def _call(self, req: _Request, expect: FrameType, timeout_ms: int | None = None):
        request_id = req.rid
        with self._lock:
            if self._sock is None:
                self._connect()
            sock_timeout = self.timeout
            if timeout_ms:
                # Our own wait outlives the ranker's deadline a little, so its error (naming the stage) wins.
                sock_timeout = timeout_ms / 1e3 + max(0.5, timeout_ms / 1e3)
            self._sock.settimeout(sock_timeout)
            if self._early_error is not None:
                (h, payload), self._early_error = self._early_error, None
                self._discard()
                self._raise_error(h, payload)
            region = self._region
            frame = self._in_region(region, req) if region is not None and self._requests_in_region else None
            if frame is None:
                frame = req.frame()
            slot = region.acquire() if region is not None else None
            if slot is not None:
                frame = replyslot.add_slot_trailer(frame, slot.offset, slot.capacity)
            try:
                send_buffers(self._sock, frame)
                h, payload = self._answer(request_id)
                if slot is not None and h.flags & replyslot.REPLY_SLOT:
                    payload, slot = self._leased(region, slot, payload), None
            except (TimeoutError, socket.timeout):
                self._discard()
                raise DeadlineExceeded(ErrorCode.DEADLINE_EXCEEDED,
                                       f"no answer from the ranker on {self.path} within {sock_timeout:g} s "
                                       "(client timeout); the connection was reset") from None
            except (OSError, ProtocolError):
                self._discard()
                raise
            finally:
                if slot is not None and self._region is region:
                    region.release(slot)   # never answered into (the region is gone if the connection is)
            if h.type == FrameType.ERROR:
                self._raise_error(h, payload)
            if h.type != expect:
                raise ProtocolError(f"expected {expect.name}, got frame type {h.type}")
            self._flags = h.flags
            return payload

    def _in_region(self, region: ReplyRegion, req: _Request) -> list | None:
        """The request written into the region's request area: its descriptor frame, or None when it does
        not fit (sent by frame).  Safe to overwrite: the previous request on this connection was answered
        (or the connection, and its region, were dropped)."""
        frame = req.into(region)
        if frame is None:
            if not self._told_too_big:
                self._told_too_big = True
                logger.info("a request larger than the %d-byte shared request area (request_region_bytes) "
                            "goes by frame, as will others like it", region.request_capacity)
            return None
        self.shm_requests_sent += 1
        return frame

    @staticmethod
    def _raise_error(h: Header, payload: memoryview) -> NoReturn:
        """Raise what an ERROR frame says, as the exception its code calls for."""
        msg = codec.decode_error(payload)
        if h.aux in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TABLE, ErrorCode.ID_OUT_OF_RANGE,
                     ErrorCode.SIZE_MISMATCH, ErrorCode.TOO_LARGE, ErrorCode.BAD_FRAME):
            raise RequestError(msg)
        if h.aux == ErrorCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(h.aux, msg)
        raise RemoteError(h.aux, msg)

    @staticmethod
    def _leased(region: ReplyRegion, slot: Slot, descriptor) -> memoryview:
        """The answer the ranker wrote into ``slot``, as a view that keeps the slot leased."""
        offset, nbytes = replyslot.decode_descriptor(descriptor)
        try:
            return region.lease(slot, offset, nbytes)
        except ValueError as e:
            raise ProtocolError(str(e)) from None

    def _narrow(self, values: list[np.ndarray]) -> bool:
        """Whether these ids may travel as int32 (negative or huge ids go as int64, for the ranker to name)."""
        return self.narrow_ids and all(codec.fits_int32(v) for v in values)

    def predict(self, dense: np.ndarray, sparse: Sparse, timeout_ms: int | None = None) -> np.ndarray:
        """Scores [B] float32 for a batch of B samples (``timeout_ms``: the request's deadline)."""
        d = prepare_dense(dense)
        names, values, lengths, batch = prepare_sparse(sparse, d.shape[0])
        req = _Request(next(self._ids), names, lengths, values, batch, d, _timeout(timeout_ms), self._narrow(values))
        payload = self._call(req, FrameType.PREDICT_RESP, timeout_ms)
        self.last_version = codec.scores_version(payload, self._flags)
        return codec.decode_scores(payload, self._flags)

    def lookup(self, sparse: Sparse, timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        """Pooled embeddings [B, dim] per requested table (``timeout_ms``: the request's deadline)."""
        names, values, lengths, batch = prepare_sparse(sparse, None)
        req = _Request(next(self._ids), names, lengths, values, batch, None, _timeout(timeout_ms),
                       self._narrow(values))
        payload = self._call(req, FrameType.CLIENT_LOOKUP_RESP, timeout_ms)
        self.last_version = codec.pooled_version(payload)
        return codec.decode_pooled(payload)

    def predict_csr(self, dense: np.ndarray, keys: np.ndarray, row_index: np.ndarray,
                    tables: Sequence[str] | ModelSpec, timeout_ms: int | None = None) -> np.ndarray:
        """Scores [B] from HPS-style CSR input, so HugeCTR/HPS batching code keeps working.

        ``keys`` int64 (CATCOLUMN) and ``row_index`` int32 [B*S + 1] (ROWINDEX):
        the keys of sample b, slot s are ``keys[row_index[b*S+s]:row_index[b*S+s+1]]``,
        one slot per table in ``tables`` order (the model's ``[[tables]]``, or
        pass the ModelSpec).  ``dense`` is float32 [B, F] or flat [B*F].
        Converted by the same code as the KServe front (flexemr.kserve.convert).
        """
        names = tables.table_names if isinstance(tables, ModelSpec) else tuple(tables)
        if not names:
            raise RequestError("tables: need the table (slot) order of the model")
        sparse = csr_to_kjt(names, keys, row_index)
        batch = len(next(iter(sparse.values()))[1])
        d = np.asarray(dense)
        if batch == 0 or d.size % batch:
            raise RequestError(f"dense: {d.size} values do not split into the batch of {batch} samples "
                               "that ROWINDEX describes")
        return self.predict(d.reshape(batch, d.size // batch), sparse, timeout_ms)
