"""Inference client: the Python API over the ranker's unix socket (a DESIGN.md contract).

    from flexemr.client import InferenceClient
    with InferenceClient("/run/flexemr/ranker.sock") as c:
        scores = c.predict(dense, sparse)   # -> np.ndarray [B] float32
        pooled = c.lookup(sparse)           # -> dict[name, np.ndarray [B, dim] float32]

``sparse`` maps table name to ``(values, lengths)``: int64 ids and int32 bag
lengths (TorchRec's KeyedJaggedTensor layout).  Input is checked here first
(shapes, dtypes, lengths that do not add up: the encoding checks of
:mod:`flexemr.validation`) so mistakes fail fast with a message naming the
field; the ranker runs the model checks (``validate_request``: table names, id
ranges, dense width, finite features) and answers an ERROR frame, raised as
RequestError.  One client
object serves one request at a time; use one per thread.
"""

from __future__ import annotations

import itertools
import socket
import threading

import numpy as np

from flexemr.errors import ProtocolError, RemoteError, RequestError
from flexemr.validation import Sparse, prepare_dense, prepare_sparse
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType
from flexemr.wire.stream import FrameReader, send_buffers

__all__ = ["InferenceClient", "Sparse", "prepare_sparse"]


class InferenceClient:
    """A connection to a ranker's inference socket."""

    def __init__(self, path: str, timeout: float | None = 60.0, max_payload: int = 1 << 30) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self._sock.close()
            raise ConnectionError(f"no flexemr ranker is serving on {path}: {e.strerror}") from None
        self._reader = FrameReader(self._sock, max_payload)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _call(self, frame: list, request_id: int, expect: FrameType):
        with self._lock:
            send_buffers(self._sock, frame)
            h = self._reader.read_header()
            # A fresh buffer per answer: the arrays we return are views of it,
            # so nothing is copied after the socket read.
            payload = self._reader.read_payload_owned(h)
            if h.request_id != request_id:
                raise ProtocolError(f"answer to request {h.request_id} while waiting for {request_id}")
            if h.type == FrameType.ERROR:
                msg = codec.decode_error(payload)
                if h.aux in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TABLE, ErrorCode.ID_OUT_OF_RANGE,
                             ErrorCode.SIZE_MISMATCH, ErrorCode.TOO_LARGE, ErrorCode.BAD_FRAME):
                    raise RequestError(msg)
                raise RemoteError(h.aux, msg)
            if h.type != expect:
                raise ProtocolError(f"expected {expect.name}, got frame type {h.type}")
            return payload

    def predict(self, dense: np.ndarray, sparse: Sparse) -> np.ndarray:
        """Scores [B] float32 for a batch of B samples."""
        d = prepare_dense(dense)
        names, values, lengths, batch = prepare_sparse(sparse, d.shape[0])
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, d)
        payload = self._call(frame, rid, FrameType.PREDICT_RESP)
        return codec.decode_scores(payload)

    def lookup(self, sparse: Sparse) -> dict[str, np.ndarray]:
        """Pooled embeddings [B, dim] per requested table."""
        names, values, lengths, batch = prepare_sparse(sparse, None)
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, None)
        payload = self._call(frame, rid, FrameType.CLIENT_LOOKUP_RESP)
        return codec.decode_pooled(payload)
