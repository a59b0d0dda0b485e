"""Inference client: the Python API over the ranker's unix socket (a DESIGN.md contract).

    from flexemr.client import InferenceClient
    with InferenceClient("/run/flexemr/ranker.sock") as c:
        scores = c.predict(dense, sparse)   # -> np.ndarray [B] float32
        pooled = c.lookup(sparse)           # -> dict[name, np.ndarray [B, dim] float32]
        scores = c.predict_csr(dense, keys, row_index, tables=spec.table_names)  # HPS-style CSR

``sparse`` maps table name to ``(values, lengths)``: int64 ids and int32 bag
lengths (TorchRec's KeyedJaggedTensor layout).  Input is checked here first
(shapes, dtypes, lengths that do not add up) so mistakes fail fast with a
message naming the field; the ranker checks again (table names, id ranges,
dense width) and answers an ERROR frame, raised as RequestError.  One client
object serves one request at a time; use one per thread.
"""

from __future__ import annotations

import itertools
import socket
import threading
from typing import Mapping, Sequence

import numpy as np

from flexemr.errors import ProtocolError, RemoteError, RequestError
from flexemr.kserve.convert import csr_to_kjt
from flexemr.model.spec import ModelSpec
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType
from flexemr.wire.stream import FrameReader, send_buffers

Sparse = Mapping[str, "tuple[np.ndarray, np.ndarray]"]


def _as_ids(name: str, values, lengths) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values)
    ln = np.asarray(lengths)
    if v.ndim != 1:
        raise RequestError(f"sparse[{name!r}] values: must be 1-D, got shape {v.shape}")
    if ln.ndim != 1:
        raise RequestError(f"sparse[{name!r}] lengths: must be 1-D, got shape {ln.shape}")
    if v.size and v.dtype.kind not in "iu":
        raise RequestError(f"sparse[{name!r}] values: ids must be integers (int64), got dtype {v.dtype}")
    if ln.size and ln.dtype.kind not in "iu":
        raise RequestError(f"sparse[{name!r}] lengths: must be integers (int32), got dtype {ln.dtype}")
    if ln.size and ln.min() < 0:
        raise RequestError(f"sparse[{name!r}] lengths: bag lengths must be >= 0 (found {int(ln.min())})")
    total = int(ln.sum()) if ln.size else 0
    if total != v.size:
        raise RequestError(f"sparse[{name!r}] lengths: sum to {total} but there are {v.size} values")
    if ln.size and ln.max() > np.iinfo(np.int32).max:
        raise RequestError(f"sparse[{name!r}] lengths: a bag length does not fit int32")
    return v.astype(np.int64, copy=False), ln.astype(np.int32, copy=False)


def prepare_sparse(sparse: Sparse, batch: int | None) -> tuple[list[str], list[np.ndarray], list[np.ndarray], int]:
    if not isinstance(sparse, Mapping) or not sparse:
        raise RequestError("sparse: must be a non-empty mapping of table name -> (values, lengths)")
    names, values, lengths = [], [], []
    for name, pair in sparse.items():
        if not isinstance(name, str) or not name or "\n" in name:
            raise RequestError(f"sparse: invalid table name {name!r}")
        try:
            vals, lens = pair
        except (TypeError, ValueError):
            raise RequestError(f"sparse[{name!r}]: must be a (values, lengths) pair") from None
        v, ln = _as_ids(name, vals, lens)
        if batch is None:
            batch = len(ln)
        elif len(ln) != batch:
            raise RequestError(f"sparse[{name!r}] lengths: has {len(ln)} bags but the batch has {batch}")
        names.append(name)
        values.append(v)
        lengths.append(ln)
    return names, values, lengths, int(batch or 0)


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
        d = np.asarray(dense)
        if d.ndim != 2:
            raise RequestError(f"dense: must be 2-D [batch, dense_features], got shape {d.shape}")
        if d.dtype.kind != "f":
            raise RequestError(f"dense: must be float32, got dtype {d.dtype}")
        names, values, lengths, batch = prepare_sparse(sparse, d.shape[0])
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, d.astype(np.float32, copy=False))
        payload = self._call(frame, rid, FrameType.PREDICT_RESP)
        return codec.decode_scores(payload)

    def lookup(self, sparse: Sparse) -> dict[str, np.ndarray]:
        """Pooled embeddings [B, dim] per requested table."""
        names, values, lengths, batch = prepare_sparse(sparse, None)
        rid = next(self._ids)
        frame = codec.encode_client_request(rid, names, lengths, values, batch, None)
        payload = self._call(frame, rid, FrameType.CLIENT_LOOKUP_RESP)
        return codec.decode_pooled(payload)

    def predict_csr(self, dense: np.ndarray, keys: np.ndarray, row_index: np.ndarray,
                    tables: Sequence[str] | ModelSpec) -> np.ndarray:
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
        return self.predict(d.reshape(batch, d.size // batch), sparse)
