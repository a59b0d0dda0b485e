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
"""

from __future__ import annotations

import itertools
import socket
import threading
from typing import Sequence

import numpy as np

from flexemr.errors import DeadlineExceeded, ProtocolError, RemoteError, RequestError
from flexemr.kserve.convert import csr_to_kjt
from flexemr.model.spec import ModelSpec
from flexemr.validation import Sparse, prepare_dense, prepare_sparse
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType
from flexemr.wire.stream import FrameReader, send_buffers

__all__ = ["InferenceClient", "Sparse", "prepare_sparse"]


def _timeout(timeout_ms: int | None) -> int:
    if timeout_ms is None:
        return 0
    if not (isinstance(timeout_ms, (int, np.integer)) or float(timeout_ms).is_integer()) or timeout_ms <= 0:
        raise RequestError(f"timeout_ms: must be a positive whole number of milliseconds, got {timeout_ms!r}")
    return int(timeout_ms)


class InferenceClient:
    """A connection to a ranker's inference socket."""

    def __init__(self, path: str, timeout: float | None = 60.0, max_payload: int = 1 << 30,
                 narrow_ids: bool = True) -> None:
        """``narrow_ids``: send ids as int32 when they all fit (one max pass per table; half the id bytes)."""
        self.path = path
        self.narrow_ids = narrow_ids
        self.timeout = timeout
        self.max_payload = max_payload
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # The model version that served the last answer (0: the ranker did not name one).
        self.last_version = 0
        self._flags = 0
        self._connect()

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

    def _discard(self) -> None:
        """Drop the connection: whatever it still owes us must never answer a later call."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = self._reader = None

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._discard()

    def _call(self, frame: list, request_id: int, expect: FrameType, timeout_ms: int | None = None):
        with self._lock:
            if self._sock is None:
                self._connect()
            sock_timeout = self.timeout
            if timeout_ms:
                # Our own wait outlives the ranker's deadline a little, so its error (naming the stage) wins.
                sock_timeout = timeout_ms / 1e3 + max(0.5, timeout_ms / 1e3)
            self._sock.settimeout(sock_timeout)
            try:
                send_buffers(self._sock, frame)
                while True:
                    h = self._reader.read_header()
                    # A fresh buffer per answer: the arrays we return are views of it,
                    # so nothing is copied after the socket read.
                    payload = self._reader.read_payload_owned(h)
                    if h.request_id == request_id or h.request_id == 0:
                        break
                    if h.request_id > request_id:
                        raise ProtocolError(f"answer to request {h.request_id} while waiting for {request_id}")
                    # A late answer to an earlier call: skip it.
            except (TimeoutError, socket.timeout):
                self._discard()
                raise DeadlineExceeded(ErrorCode.DEADLINE_EXCEEDED,
                                       f"no answer from the ranker on {self.path} within {sock_timeout:g} s "
                                       "(client timeout); the connection was reset") from None
            except (OSError, ProtocolError):
                self._discard()
                raise
            if h.type == FrameType.ERROR:
                msg = codec.decode_error(payload)
                if h.aux in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TABLE, ErrorCode.ID_OUT_OF_RANGE,
                             ErrorCode.SIZE_MISMATCH, ErrorCode.TOO_LARGE, ErrorCode.BAD_FRAME):
                    raise RequestError(msg)
                if h.aux == ErrorCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(h.aux, msg)
                raise RemoteError(h.aux, msg)
            if h.type != expect:
                raise ProtocolError(f"expected {expect.name}, got frame type {h.type}")
            self._flags = h.flags
            return payload

    def _narrow(self, values: list[np.ndarray]) -> bool:
        """Whether these ids may travel as int32 (negative or huge ids go as int64, for the ranker to name)."""
        return self.narrow_ids and all(codec.fits_int32(v) for v in values)

    def predict(self, dense: np.ndarray, sparse: Sparse, timeout_ms: int | None = None) -> np.ndarray:
        """Scores [B] float32 for a batch of B samples (``timeout_ms``: the request's deadline)."""
        d = prepare_dense(dense)
        names, values, lengths, batch = prepare_sparse(sparse, d.shape[0])
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, d, timeout_ms=_timeout(timeout_ms),
                                            narrow_ids=self._narrow(values))
        payload = self._call(frame, rid, FrameType.PREDICT_RESP, timeout_ms)
        self.last_version = codec.scores_version(payload, self._flags)
        return codec.decode_scores(payload, self._flags)

    def lookup(self, sparse: Sparse, timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        """Pooled embeddings [B, dim] per requested table (``timeout_ms``: the request's deadline)."""
        names, values, lengths, batch = prepare_sparse(sparse, None)
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, None, timeout_ms=_timeout(timeout_ms),
                                            narrow_ids=self._narrow(values))
        payload = self._call(frame, rid, FrameType.CLIENT_LOOKUP_RESP, timeout_ms)
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
