"""KServe v2 tensors <-> flexemr requests: the two input conventions, the outputs, the metadata.

Two input conventions, told apart by their names (a request uses one):

HPS (HugeCTR / HPS Triton backends), one slot per table, slots in the order of
the model's ``[[tables]]``::

    DES        FP32   [B*F], [1, B*F] or [B, F]   dense features, sample-major
    CATCOLUMN  INT64  [nnz] (or [1, nnz])         keys of every (sample, slot), sample-major
    ROWINDEX   INT32  [B*S + 1] (or [1, B*S+1])   CSR row offsets into CATCOLUMN:
               keys of sample b, slot s are CATCOLUMN[ROWINDEX[b*S+s] : ROWINDEX[b*S+s+1]]
               (ROWINDEX[0] == 0, non-decreasing, last == nnz; HugeCTR's criteo2predict.py
               writes exactly this).  UINT32/INT32/UINT64 keys (HPS's
               embeddingkey_long_type = false) and INT64 offsets are accepted too.

KJT (TorchRec's KeyedJaggedTensor layout), any subset of the tables::

    DES              FP32   [B, F]
    {NAME}__values   INT64  [nnz_NAME]
    {NAME}__lengths  INT32  [B]

Models: ``flexemr`` scores (``OUTPUT0`` FP32 [B]; DES required) and
``flexemr_lookup`` returns pooled embeddings (``{NAME}__pooled`` FP32 [B, dim]
per table requested, and with the HPS convention also ``OUTPUT0`` = all of them
concatenated in table order, FP32 [B, sum(dim)]).  DES is ignored by the lookup
model.  Every malformed input raises RequestError naming the input and field.
The CSR <-> KJT conversions are whole-array numpy (one stable sort), no loop
over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexemr.errors import RequestError
from flexemr.kserve.types import LOOKUP_MODEL, MODEL_VERSION, PREDICT_MODEL, Sparse, Tensor
from flexemr.model.spec import ModelSpec

DES, CATCOLUMN, ROWINDEX, OUTPUT0 = "DES", "CATCOLUMN", "ROWINDEX", "OUTPUT0"
VALUES_SUFFIX, LENGTHS_SUFFIX, POOLED_SUFFIX = "__values", "__lengths", "__pooled"
MODELS = (PREDICT_MODEL, LOOKUP_MODEL)

#: KServe datatype -> little-endian numpy dtype (BYTES is not a numeric tensor: refused).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_KEY_TYPES = ("INT64", "UINT64", "INT32", "UINT32")
_OFFSET_TYPES = ("INT32", "INT64")
_INT64_MAX = np.iinfo(np.int64).max


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype name of a numpy dtype."""
    for name, dt in DTYPES.items():
        if dt == np.dtype(dtype).newbyteorder("<") or dt == np.dtype(dtype):
            return name
    raise RequestError(f"no KServe datatype for numpy dtype {dtype}")


# ---------------------------------------------------------------- decoding tensors

def _check_shape(name: str, shape: Sequence[Any]) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise RequestError(f"input {name!r}: shape must be a list of integers, got {shape!r}") from None
    if any(d < 0 for d in dims) or any(isinstance(d, bool) for d in shape):
        raise RequestError(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def _dtype(name: str, datatype: str) -> np.dtype:
    dt = DTYPES.get(str(datatype).upper()) if isinstance(datatype, str) else None
    if dt is None:
        raise RequestError(f"input {name!r}: datatype {datatype!r} is not supported "
                           f"(expected one of {', '.join(DTYPES)})")
    return dt


def decode_raw(name: str, datatype: str, shape: Sequence[Any], buf: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw bytes (gRPC raw_input_contents, HTTP binary data); no copy."""
    dims = _check_shape(name, shape)
    dt = _dtype(name, datatype)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    nbytes = len(buf)
    if nbytes != count * dt.itemsize:
        raise RequestError(f"input {name!r}: {nbytes} bytes of data, but shape {list(dims)} of {datatype} "
                           f"needs {count * dt.itemsize}")
    return np.frombuffer(buf, dtype=dt).reshape(dims)


def decode_list(name: str, datatype: str, shape: Sequence[Any], data: Any) -> np.ndarray:
    """A tensor from JSON ``data`` (flat or nested lists) or typed gRPC contents."""
    dims = _check_shape(name, shape)
    dt = _dtype(name, datatype)
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise RequestError(f"input {name!r}: data must be a list of numbers, got {type(data).__name__}")
    try:
        arr = np.asarray(data)
        if arr.dtype == object or (arr.size and arr.dtype.kind not in "biuf"):
            raise ValueError("not numbers")
        if dt.kind in "iu" and arr.size and arr.dtype.kind == "f":
            raise ValueError(f"{datatype} data must be integers")
        if dt.kind in "iu" and arr.size and (arr.min() < np.iinfo(dt).min or arr.max() > np.iinfo(dt).max):
            raise ValueError(f"a value does not fit {datatype}")
        arr = arr.astype(dt, copy=False).reshape(-1)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError(f"input {name!r}: data is not a list of {datatype} values ({e})") from None
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if arr.size != count:
        raise RequestError(f"input {name!r}: {arr.size} values in data, but shape {list(dims)} holds {count}")
    return arr.reshape(dims)


# ---------------------------------------------------------------- CSR <-> KJT

def _as_keys(name: str, keys: np.ndarray) -> np.ndarray:
    k = np.asarray(keys).reshape(-1)
    if k.size and k.dtype.kind not in "iu":
        raise RequestError(f"{name}: keys must be integers, got dtype {k.dtype}")
    if k.dtype.kind == "u" and k.dtype.itemsize == 8 and k.size and int(k.max()) > _INT64_MAX:
        raise RequestError(f"{name}: a key does not fit int64 (max {_INT64_MAX})")
    return k.astype(np.int64, copy=False)


def csr_to_kjt(table_names: Sequence[str], keys: np.ndarray, row_index: np.ndarray) -> Sparse:
    """HPS CSR (keys sample-major, ``row_index`` [B*S+1]) -> {table: (values int64, lengths int32)}."""
    n_slots = len(table_names)
    k = _as_keys(CATCOLUMN, keys)
    r = np.asarray(row_index).reshape(-1)
    if r.size and r.dtype.kind not in "iu":
        raise RequestError(f"{ROWINDEX}: row offsets must be integers, got dtype {r.dtype}")
    if r.size < n_slots + 1 or (r.size - 1) % n_slots:
        raise RequestError(f"{ROWINDEX}: has {r.size} offsets; expected batch x slots + 1 with {n_slots} slots "
                           f"(one per table: {', '.join(table_names)}), e.g. {n_slots + 1} for one sample")
    r = r.astype(np.int64, copy=False)
    if r[0] != 0:
        raise RequestError(f"{ROWINDEX}: must start at 0, starts at {int(r[0])}")
    counts = np.diff(r)
    if counts.size and counts.min() < 0:
        at = int(np.argmax(counts < 0))
        raise RequestError(f"{ROWINDEX}: offsets must not decrease ({ROWINDEX}[{at + 1}] = {int(r[at + 1])} "
                           f"< {ROWINDEX}[{at}] = {int(r[at])})")
    if int(r[-1]) != k.size:
        raise RequestError(f"{ROWINDEX}: last offset is {int(r[-1])} but {CATCOLUMN} has {k.size} keys")
    batch = counts.size // n_slots
    per_bag = counts.reshape(batch, n_slots)                  # [B, S]
    if per_bag.size and per_bag.max() > np.iinfo(np.int32).max:
        raise RequestError(f"{ROWINDEX}: a bag has more keys than int32 can count")
    # slot of every key, then one stable sort groups keys by slot and keeps sample order within a slot
    slot_of_key = np.repeat(np.tile(np.arange(n_slots, dtype=np.int32), batch), counts)
    order = np.argsort(slot_of_key, kind="stable")
    grouped = k[order]
    ends = np.cumsum(per_bag.sum(axis=0))
    starts = ends - per_bag.sum(axis=0)
    return {name: (grouped[starts[s]:ends[s]], per_bag[:, s].astype(np.int32))
            for s, name in enumerate(table_names)}


def kjt_to_csr(table_names: Sequence[str], sparse: Mapping[str, tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray]:
    """{table: (values, lengths)} -> HPS CSR (keys int64 sample-major, row_index int32 [B*S+1]).

    Every table of ``table_names`` must be present (a CSR request has all slots).
    """
    missing = [n for n in table_names if n not in sparse]
    if missing:
        raise RequestError(f"sparse: CSR needs every slot; missing tables {', '.join(missing)}")
    lengths = [np.asarray(sparse[n][1]).reshape(-1).astype(np.int64) for n in table_names]
    values = [_as_keys(f"sparse[{n!r}] values", sparse[n][0]) for n in table_names]
    batch = lengths[0].size
    for n, ln, v in zip(table_names, lengths, values):
        if ln.size != batch:
            raise RequestError(f"sparse[{n!r}] lengths: has {ln.size} bags but the batch has {batch}")
        if int(ln.sum()) != v.size:
            raise RequestError(f"sparse[{n!r}] lengths: sum to {int(ln.sum())} but there are {v.size} values")
    n_slots = len(table_names)
    per_bag = np.stack(lengths, axis=1) if n_slots else np.zeros((batch, 0), np.int64)   # [B, S]
    row_index = np.zeros(batch * n_slots + 1, dtype=np.int64)
    np.cumsum(per_bag.reshape(-1), out=row_index[1:])
    if row_index[-1] > np.iinfo(np.int32).max:
        raise RequestError(f"{ROWINDEX}: {int(row_index[-1])} keys do not fit int32 offsets")
    # keys arrive slot-major; the destination bag of each is b*S+s, a stable sort puts them sample-major
    slotmajor_bag = (np.arange(batch)[None, :] * n_slots + np.arange(n_slots)[:, None]).reshape(-1)
    bag_of_key = np.repeat(slotmajor_bag, per_bag.T.reshape(-1))
    keys = np.concatenate(values) if values else np.zeros(0, np.int64)
    return keys[np.argsort(bag_of_key, kind="stable")], row_index.astype(np.int32)


# ---------------------------------------------------------------- requests

def _dense(spec: ModelSpec, d: np.ndarray, batch: int) -> np.ndarray:
    if d.dtype != np.float32:
        raise RequestError(f"input {DES!r}: datatype must be FP32, got {datatype_of(d.dtype)}")
    f = spec.dense_features
    if d.size != batch * f:
        raise RequestError(f"input {DES!r}: shape {list(d.shape)} holds {d.size} values; the batch of {batch} "
                           f"needs {batch} x {f} dense features (shape [{batch}, {f}] or [{batch * f}])")
    return d.reshape(batch, f)


def _int_input(name: str, arr: np.ndarray, allowed: Sequence[str], field: str) -> np.ndarray:
    dt = datatype_of(arr.dtype)
    if dt not in allowed:
        raise RequestError(f"input {name!r}: {field} must be {' or '.join(allowed)}, got {dt}")
    return arr


def to_request(spec: ModelSpec, inputs: Mapping[str, np.ndarray], predict: bool
               ) -> tuple[np.ndarray | None, Sparse]:
    """Decoded input tensors -> (dense [B, F] float32 or None, {table: (values, lengths)})."""
    names = set(inputs)
    hps = names & {CATCOLUMN, ROWINDEX}
    kjt = {n for n in names if n.endswith(VALUES_SUFFIX) or n.endswith(LENGTHS_SUFFIX)}
    unknown = sorted(names - {DES} - hps - kjt)
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r} (inputs are {DES}, {CATCOLUMN}, {ROWINDEX} "
                           f"or {{table}}{VALUES_SUFFIX} / {{table}}{LENGTHS_SUFFIX}; tables: "
                           f"{', '.join(spec.table_names)})")
    if hps and kjt:
        raise RequestError(f"inputs mix the HPS convention ({', '.join(sorted(hps))}) with the KJT convention "
                           f"({sorted(kjt)[0]}, ...): use one")
    if hps:
        for need in (CATCOLUMN, ROWINDEX):
            if need not in inputs:
                raise RequestError(f"input {need!r}: required with {sorted(hps)[0]} (HPS convention)")
        keys = _int_input(CATCOLUMN, inputs[CATCOLUMN], _KEY_TYPES, "datatype")
        offsets = _int_input(ROWINDEX, inputs[ROWINDEX], _OFFSET_TYPES, "datatype")
        sparse = csr_to_kjt(spec.table_names, keys, offsets)
    elif kjt:
        sparse = {}
        for n in sorted(kjt):
            table = n[: -len(VALUES_SUFFIX)] if n.endswith(VALUES_SUFFIX) else n[: -len(LENGTHS_SUFFIX)]
            if table not in spec.table_names:
                raise RequestError(f"input {n!r}: unknown table {table!r} (model has {', '.join(spec.table_names)})")
            if table in sparse:
                continue
            vname, lname = table + VALUES_SUFFIX, table + LENGTHS_SUFFIX
            for need in (vname, lname):
                if need not in inputs:
                    raise RequestError(f"input {need!r}: required with {n!r} (KJT convention)")
            values = _int_input(vname, inputs[vname], ("INT64", "INT32"), "datatype").reshape(-1)
            lengths = _int_input(lname, inputs[lname], ("INT32", "INT64"), "datatype").reshape(-1)
            if lengths.size and lengths.min() < 0:
                raise RequestError(f"input {lname!r}: bag lengths must be >= 0 (found {int(lengths.min())})")
            if int(lengths.sum()) != values.size:
                raise RequestError(f"input {lname!r}: lengths sum to {int(lengths.sum())} but {vname!r} has "
                                   f"{values.size} values")
            sparse[table] = (values.astype(np.int64, copy=False), lengths.astype(np.int32, copy=False))
        batches = {t: ln.size for t, (_, ln) in sparse.items()}
        if len(set(batches.values())) > 1:
            first = next(iter(batches))
            other = next(t for t, b in batches.items() if b != batches[first])
            raise RequestError(f"input {other + LENGTHS_SUFFIX!r}: has {batches[other]} bags but "
                               f"{first + LENGTHS_SUFFIX!r} has {batches[first]}")
        # model table order, whatever the order of the inputs
        sparse = {t: sparse[t] for t in spec.table_names if t in sparse}
    else:
        raise RequestError(f"no sparse inputs: send {CATCOLUMN} + {ROWINDEX} (HPS convention) or "
                           f"{{table}}{VALUES_SUFFIX} + {{table}}{LENGTHS_SUFFIX} (KJT convention)")
    batch = next(iter(sparse.values()))[1].size
    if batch == 0:
        raise RequestError("the batch is empty (no samples)")
    dense = None
    if predict:
        if DES not in inputs:
            raise RequestError(f"input {DES!r}: required by model {PREDICT_MODEL!r} (FP32 [{batch}, "
                               f"{spec.dense_features}])")
        dense = _dense(spec, inputs[DES], batch)
    return dense, sparse


# ---------------------------------------------------------------- outputs and metadata

def outputs_of(spec: ModelSpec, model: str, result: np.ndarray | Mapping[str, np.ndarray],
               requested: Sequence[str] | None = None, hps: bool = False) -> list[Tensor]:
    """Response tensors for ``result``; ``requested`` output names (None = all) are checked."""
    if model == PREDICT_MODEL:
        out = [Tensor(OUTPUT0, "FP32", np.ascontiguousarray(result, dtype=np.float32).reshape(-1))]
    else:
        assert isinstance(result, Mapping)
        out = [Tensor(t + POOLED_SUFFIX, "FP32", np.ascontiguousarray(result[t], dtype=np.float32))
               for t in spec.table_names if t in result]
        if hps or (requested and OUTPUT0 in requested):
            if len(result) != len(spec.tables):
                raise RequestError(f"output {OUTPUT0!r}: the concatenation needs every table")
            out.insert(0, Tensor(OUTPUT0, "FP32", np.concatenate(
                [np.asarray(result[t], dtype=np.float32) for t in spec.table_names], axis=1)))
    if requested is None:
        return out
    by_name = {t.name: t for t in out}
    for name in requested:
        if name not in by_name:
            raise RequestError(f"requested output {name!r}: model {model!r} has outputs "
                               f"{', '.join(declared_outputs(spec, model))} (pooled outputs only for the tables sent)")
    return [by_name[n] for n in requested]


def declared_outputs(spec: ModelSpec, model: str) -> list[str]:
    if model == PREDICT_MODEL:
        return [OUTPUT0]
    return [OUTPUT0] + [t + POOLED_SUFFIX for t in spec.table_names]


def model_metadata(spec: ModelSpec, model: str) -> dict[str, Any]:
    """The KServe model metadata object (JSON shape; the gRPC front converts it)."""
    inputs = [{"name": DES, "datatype": "FP32", "shape": [-1, spec.dense_features]},
              {"name": CATCOLUMN, "datatype": "INT64", "shape": [-1]},
              {"name": ROWINDEX, "datatype": "INT32", "shape": [-1]}]
    for t in spec.table_names:
        inputs.append({"name": t + VALUES_SUFFIX, "datatype": "INT64", "shape": [-1]})
        inputs.append({"name": t + LENGTHS_SUFFIX, "datatype": "INT32", "shape": [-1]})
    if model == PREDICT_MODEL:
        outputs = [{"name": OUTPUT0, "datatype": "FP32", "shape": [-1]}]
    else:
        inputs = inputs[1:]
        outputs = [{"name": OUTPUT0, "datatype": "FP32", "shape": [-1, sum(t.dim for t in spec.tables)]}]
        outputs += [{"name": t.name + POOLED_SUFFIX, "datatype": "FP32", "shape": [-1, t.dim]} for t in spec.tables]
    return {"name": model, "versions": [MODEL_VERSION], "platform": "flexemr", "inputs": inputs, "outputs": outputs}


def check_model(name: str, version: str | None = None) -> str:
    """The model name if it is served (and the version, if given, is ours); RequestError otherwise."""
    if name not in MODELS:
        raise UnknownModel(f"unknown model {name!r} (this server has {', '.join(MODELS)})")
    if version not in (None, "", MODEL_VERSION):
        raise UnknownModel(f"model {name!r} has no version {version!r} (versions: {MODEL_VERSION})")
    return name


class UnknownModel(RequestError):
    """A request named a model or version this server does not have: HTTP 404 / NOT_FOUND."""
