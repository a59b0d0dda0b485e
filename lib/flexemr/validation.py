"""Request validation: the one place that decides whether a request may be served.

Two layers, used by every entry point (the daemon's inference process, the
in-process :mod:`flexemr.monolithic` reference, the socket client):

``prepare_sparse`` / ``prepare_dense``
    the *encoding* checks on caller-supplied arrays: shapes, dtypes, bag
    lengths that add up, one batch size for every table.  The client runs them
    before it encodes a frame; on the daemon side the frame decoder enforces
    the same structure, so they are not repeated there.
    ``request_from_arrays`` runs them and builds the :class:`ClientRequest`
    the decoder would have produced, so an in-process caller gets exactly the
    daemon's second layer.

``validate_request(spec, req, predict)``
    the *model* checks, on a decoded request: known tables, each at most once,
    ids in range, every table and the right dense width for predict, dense
    features finite (NaN/Inf refused unless ``allow_nonfinite``) and, when
    limits are given, no more samples or ids than one request may carry.

Every failure is a :class:`RequestError` whose message starts with the field
(``sparse['a'] values: id 11 is past the end of table 'a' (11 rows)``,
``dense: sample 3 feature 5 is NaN``).  All checks are whole-array numpy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec
from flexemr.wire.codec import KJT, ClientRequest

__all__ = [
    "Sparse",
    "check_dense_finite",
    "check_limits",
    "prepare_dense",
    "prepare_sparse",
    "request_from_arrays",
    "validate_request",
]

Sparse = Mapping[str, "tuple[np.ndarray, np.ndarray]"]
TableIds = dict[int, tuple[np.ndarray, np.ndarray]]  # model table index -> (values int64, lengths int32)


# ---------------------------------------------------------------------- model checks (daemon + monolithic)


def validate_request(spec: ModelSpec, req: ClientRequest, predict: bool, *, allow_nonfinite: bool = False,
                     max_batch: int | None = None, max_ids: int | None = None) -> TableIds:
    """Check a decoded request against the model; returns ids by model table index.

    ``predict`` requests need every table and dense features of the model's
    width.  NaN/Inf dense features are refused unless ``allow_nonfinite``.
    ``max_batch`` / ``max_ids`` (None = no limit) bound one request: see
    :func:`check_limits`.
    """
    if max_batch is not None or max_ids is not None:
        check_limits(req, max_batch=max_batch, max_ids=max_ids)
    out: TableIds = {}
    index = {t.name: i for i, t in enumerate(spec.tables)}
    for k, name in enumerate(req.names):
        i = index.get(name)
        if i is None:
            raise RequestError(f"sparse: unknown table {name!r} (the model has {', '.join(spec.table_names)})")
        if i in out:
            raise RequestError(f"sparse: table {name!r} appears twice")
        values, lengths = req.kjt.table(k)
        # One pass over the ids: read as unsigned, a negative id is larger than any
        # table, so one max finds both kinds of bad id; min and max only on failure.
        if len(values) and int(_unsigned(values).max()) >= spec.tables[i].rows:
            lo, hi = int(values.min()), int(values.max())
            rows = spec.tables[i].rows
            if lo < 0:
                raise RequestError(f"sparse[{name!r}] values: id {lo} is negative")
            if hi >= rows:
                raise RequestError(f"sparse[{name!r}] values: id {hi} is past the end of table {name!r} ({rows} rows)")
        out[i] = (values, lengths)
    if predict:
        missing = [t.name for i, t in enumerate(spec.tables) if i not in out]
        if missing:
            raise RequestError(f"sparse: predict needs every table; missing {', '.join(map(repr, missing))}")
        if req.dense is None:
            raise RequestError(f"dense: predict needs dense features [batch, {spec.dense_features}]")
        if req.dense.shape[1] != spec.dense_features:
            raise RequestError(
                f"dense: has {req.dense.shape[1]} features per sample, the model expects {spec.dense_features}"
            )
    if req.dense is not None and not allow_nonfinite:
        check_dense_finite(req.dense)
    return out


def _unsigned(values: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the same width (a view, no copy)."""
    if values.dtype.kind == "u":
        return values
    return values.view(values.dtype.str.replace("i", "u"))


def check_dense_finite(dense: np.ndarray) -> None:
    """Refuse NaN/Inf dense features, naming the first one (``dense: sample 3 feature 5 is NaN``).

    A NaN would flow through the MLP into a NaN score the client cannot tell
    from a real one; refusing it names the culprit instead.
    """
    finite = np.isfinite(dense)
    if finite.all():
        return
    sample, feature = (int(x) for x in np.argwhere(~finite)[0])
    v = float(dense[sample, feature])
    what = "NaN" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    raise RequestError(f"dense: sample {sample} feature {feature} is {what}")


def check_limits(req: ClientRequest, *, max_batch: int | None = None, max_ids: int | None = None) -> None:
    """Refuse one request with more than ``max_batch`` samples or more than ``max_ids`` ids in all.

    These bound what a single client may make the ranker allocate and pool
    (the batcher coalesces requests up to ``max_batch``; a request larger than
    that could never be batched).  None means no limit.
    """
    if max_batch is not None and req.batch > max_batch:
        raise RequestError(f"batch: {req.batch} samples in one request, more than max_batch ({max_batch})")
    if max_ids is not None:
        counts = req.kjt.counts
        total = int(counts.sum()) if len(counts) else 0
        if total > max_ids:
            k = int(np.argmax(counts))
            raise RequestError(f"sparse: {total} ids in one request, more than max_ids ({max_ids}); "
                               f"the most in sparse[{req.names[k]!r}] ({int(counts[k])})")


# ---------------------------------------------------------------------- encoding checks (client + monolithic)


def _as_ids(name: str, values: object, lengths: object) -> tuple[np.ndarray, np.ndarray]:
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
    """(names, values int64, lengths int32, batch) of ``{table: (values, lengths)}``, or a RequestError.

    ``batch``: the batch size the dense features imply (None: taken from the
    first table).
    """
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


def prepare_dense(dense: object) -> np.ndarray:
    """Dense features as float32 [batch, features], or a RequestError naming the problem."""
    d = np.asarray(dense)
    if d.ndim != 2:
        raise RequestError(f"dense: must be 2-D [batch, dense_features], got shape {d.shape}")
    if d.dtype.kind != "f":
        raise RequestError(f"dense: must be float32, got dtype {d.dtype}")
    return d.astype(np.float32, copy=False)


def request_from_arrays(dense: object | None, sparse: Sparse) -> ClientRequest:
    """The ClientRequest the daemon would decode from these arrays (for in-process callers).

    Runs the encoding checks; then :func:`validate_request` gives an
    in-process caller exactly the daemon's answer to the same input.
    """
    d = None if dense is None else prepare_dense(dense)
    names, values, lengths, batch = prepare_sparse(sparse, None if d is None else d.shape[0])
    counts = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    starts = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    lens = np.stack(lengths) if lengths else np.zeros((0, batch), dtype=np.int32)
    vals = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
    return ClientRequest(names, d, KJT(batch, counts, lens, vals, starts))
