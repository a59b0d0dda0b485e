"""Payload layouts of the flexemr frames (see frame.py for the header).

Payloads are runs of little-endian sections, each starting on an 8-byte
boundary, so that every array decodes as an ``np.frombuffer`` view (no copy,
no per-element Python) and encodes as a list of buffers for ``sendmsg``::

    KJT block (ids of T tables for B bags, TorchRec KeyedJaggedTensor layout)
      u32 id_bytes, u32 0      width of every id: 4 (i32) or 8 (i64)     (protocol 2)
      i64 counts[T]            ids per table
      i32 lengths[T*B]         bag lengths, table-major        (padded to 8)
      i32|i64 values[sum(counts)]  ids, table-major, bag order  (padded to 8)

    LOOKUP        u32 B, u32 T | u32 table_ids[T] (pad) | u32 bags[T] (pad) | KJT block  (protocol 3)
                  (compact: table t carries bags[t] <= B bags, its lengths section
                  holds bags[t] entries; the ranker leaves out the bags that have no
                  ids for this server and remembers which ones it sent)
                  [| u64 budget_us   when flags has DEADLINE: time left when sent]
                  [| u64 granted_ns  when flags has INBAND_CREDIT; aux = credits]
    LOOKUP_RESP   u32 B, u16 T, u16 partials | u32 table_ids[T] (pad) | u32 dims[T] (pad)
                  | u32 bags[T] (pad)                                           (protocol 3)
                  | partial[bags[t], dims[t]] for each t in order, as ``partials`` says:
                  0 f32, 1 f16, 2 bf16 (the top half of an f32, rounded to nearest even)
    FETCH         u32 table_id, u32 0 | i64 ids[n]
    FETCH_RESP    u32 table_id, u32 dim | f32 rows[n, dim]  (unpadded: n = rest / (4 dim))
    PREDICT       u32 B, u32 T, u32 F, u32 names_len | names (utf-8, "\\n"-joined, pad)
                  | f32 dense[B*F] (pad) | KJT block    (aux = the client's timeout in ms, 0: none)
    CLIENT_LOOKUP same as PREDICT with F = 0
    PREDICT_RESP  f32 scores[B]
    CLIENT_LOOKUP_RESP u32 B, u32 T, u32 names_len, u32 0 | names (pad) | u32 dims[T] (pad)
                  | f32 pooled[B, dims[t]] for each t
    ERROR         utf-8 message (aux = ErrorCode)
    HELLO         u32 role, u32 n_shards | n x (u32 table_id, u32 dim, u64 start, u64 end)
                  | utf-8 name
    CREDIT        u64 sent_ns (CLOCK_MONOTONIC of the granter; aux = credits;
                  request_id = the connection id the credits are for)
    HELLO (ranker -> server) aux = initial credits (0: no flow control);
                  name = "<ranker token>/<conn id>/<data|credit>"
    STATS_RESP    u64 counters[len(SERVER_STATS)]
    MODEL         u32 op, u32 version, u32 base, u32 0 | utf-8 path (pad)     (ModelOp: load/retire/list)
    MODEL_RESP    u32 n, u32 0, u64 rss_bytes, u64 peak_rss_bytes
                  | n x (u32 version, u32 state, u32 base, f32 load_s) | utf-8 message (pad)

Model versions (flag MODEL_VERSION, docs/PROTOCOL.md *Model versions*): a
LOOKUP names its version in ``u32 version, u32 0`` before the deadline
trailer, a FETCH in its second u32; LOOKUP_RESP and FETCH_RESP carry the
version that served them in ``aux``; PREDICT_RESP ends with ``u32 version,
u32 0``, CLIENT_LOOKUP_RESP has it in the 4th u32 of its head.

Ids travel as int32 when every id of the block fits (the ranker narrows a
subrequest whose tables all have fewer than 2^31 rows; the client narrows
when its ids allow), else as int64: half the id bytes on every hop.
    AUTH_CHALLENGE u32 alg, u32 nonce_len | u8 server_nonce[nonce_len] (pad) | utf-8 message
    AUTH_PROOF    u32 alg, u32 nonce_len | u8 ranker_nonce[nonce_len] (pad) | u8 mac[32]
    AUTH_OK       u8 mac[32]

Decoders check every size against the payload length before building a
view, so truncated or hostile payloads raise ProtocolError, never IndexError
or a huge allocation.  Mean pooling travels as partial *sums*: the ranker
knows how many ids it sent to each server for each bag.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Sequence

import numpy as np

from flexemr.errors import ProtocolError
from flexemr.wire.frame import HEADER_SIZE, VERSION, FrameFlag, FrameType, header_flags, pack_header, set_header_aux

_U32x2 = struct.Struct("<II")
_U32x4 = struct.Struct("<IIII")
_U64 = struct.Struct("<Q")
_MODEL_VERSION = int(FrameFlag.MODEL_VERSION)
_U32_U16x2 = struct.Struct("<IHH")
_SHARD = np.dtype([("table_id", "<u4"), ("dim", "<u4"), ("start", "<u8"), ("end", "<u8")])

BAD_FRAME, SIZE_MISMATCH = 1, 4

ROLE_RANKER, ROLE_EMBEDDING, ROLE_CLIENT = 1, 2, 3


def _pad(n: int) -> int:
    return (-n) & 7


_ZEROS = bytes(8)


class _Writer:
    """Collects sections as a buffer list (arrays are referenced, not copied)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list = []
        self.size = 0

    def add(self, buf) -> None:
        n = buf.nbytes if isinstance(buf, (np.ndarray, memoryview)) else len(buf)
        if n:
            self.parts.append(buf)
            self.size += n
        p = _pad(n)
        if p:
            self.parts.append(_ZEROS[:p])
            self.size += p

    def add_concatenated(self, arrays, dtype: str | np.dtype) -> None:
        """One section made of ``arrays`` back to back as ``dtype``: padded once, after the last (none copied
        unless its dtype or layout differs)."""
        total = 0
        for arr in arrays:
            a = np.ascontiguousarray(arr, dtype=dtype)
            if a.nbytes:
                self.parts.append(a)
                total += a.nbytes
        self.size += total
        p = _pad(total)
        if p:
            self.parts.append(_ZEROS[:p])
            self.size += p


class _IntoWriter:
    """Writes sections straight into ``dest`` (a uint8 array) instead of collecting them: an array whose dtype
    differs from its section's is cast on the way in (one pass, no temporary).  Once a section would run past
    the end of ``dest`` nothing more is written and ``overflow`` is set."""

    __slots__ = ("dest", "size", "overflow")

    def __init__(self, dest: np.ndarray) -> None:
        self.dest = dest
        self.size = 0
        self.overflow = False

    def _room(self, n: int) -> bool:
        if self.overflow or self.size + n + _pad(n) > len(self.dest):
            self.overflow = True
            return False
        return True

    def _pad_after(self, n: int) -> None:
        p = _pad(n)
        if p:
            self.dest[self.size : self.size + p] = 0
            self.size += p

    def add(self, buf) -> None:
        src = np.ascontiguousarray(buf).reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) \
            else np.frombuffer(buf, np.uint8)
        n = src.nbytes
        if not self._room(n):
            return
        self.dest[self.size : self.size + n] = src
        self.size += n
        self._pad_after(n)

    def add_concatenated(self, arrays, dtype: str | np.dtype) -> None:
        dt = np.dtype(dtype)
        total = sum(int(np.size(a)) for a in arrays) * dt.itemsize
        if not self._room(total):
            return
        for arr in arrays:
            n = int(np.size(arr)) * dt.itemsize
            if n:
                np.copyto(self.dest[self.size : self.size + n].view(dt), np.reshape(arr, -1), casting="unsafe")
                self.size += n
        self._pad_after(total)


class _Reader:
    """Bounds-checked section reader over a payload memoryview."""

    __slots__ = ("buf", "off", "what")

    def __init__(self, buf, what: str) -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
        self.off = 0
        self.what = what

    def array(self, dtype, count: int, field: str) -> np.ndarray:
        dt = np.dtype(dtype)
        if count < 0:
            raise ProtocolError(f"{self.what}: negative {field} count {count}", SIZE_MISMATCH)
        nbytes = dt.itemsize * count
        end = self.off + nbytes
        if end > len(self.buf):
            raise ProtocolError(
                f"{self.what}: truncated at {field}: needs {nbytes} bytes at offset {self.off}, "
                f"payload has {len(self.buf)}",
                SIZE_MISMATCH,
            )
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.off)
        self.off = end + _pad(nbytes)
        return arr

    def struct(self, st: struct.Struct, field: str) -> tuple:
        if self.off + st.size > len(self.buf):
            raise ProtocolError(f"{self.what}: truncated at {field}", SIZE_MISMATCH)
        vals = st.unpack_from(self.buf, self.off)
        self.off += st.size + _pad(st.size)
        return vals

    def raw(self, n: int, field: str) -> memoryview:
        if n < 0 or self.off + n > len(self.buf):
            raise ProtocolError(f"{self.what}: truncated at {field}", SIZE_MISMATCH)
        out = self.buf[self.off : self.off + n]
        self.off += n + _pad(n)
        return out

    def finish(self) -> None:
        if self.off < len(self.buf) - 7 or self.off > len(self.buf) + 7:
            raise ProtocolError(
                f"{self.what}: payload is {len(self.buf)} bytes but its sections end at {self.off}",
                SIZE_MISMATCH,
            )


# ---------------------------------------------------------------- KJT block


@dataclasses.dataclass(slots=True)
class KJT:
    """Ids of T tables for B bags, decoded as views over the payload."""

    batch: int
    counts: np.ndarray   # int64 [T]
    lengths: np.ndarray  # int32 [T, B]; a compact block (LOOKUP): int32 [sum(bags)], table-major
    values: np.ndarray   # int32 or int64 [sum(counts)] (as sent)
    starts: np.ndarray   # int64 [T + 1]: value offset of each table
    bag_starts: np.ndarray | None = None   # int64 [T + 1]: lengths offset of each table (compact blocks)

    def table(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        values = self.values[self.starts[i] : self.starts[i + 1]]
        if self.bag_starts is None:
            return values, self.lengths[i]
        return values, self.lengths[self.bag_starts[i] : self.bag_starts[i + 1]]

    def bags(self, i: int) -> int:
        """Bags table ``i`` carries (B unless the block is compact)."""
        return self.batch if self.bag_starts is None else int(self.bag_starts[i + 1] - self.bag_starts[i])


ID_DTYPES = {4: np.dtype("<i4"), 8: np.dtype("<i8")}
_INT32_MAX = 2**31 - 1


def ids_wire_dtype(values: Sequence[np.ndarray], narrow: bool = False) -> np.dtype:
    """The id width of a KJT block: int32 if every (non-empty) array is int32 already, or ``narrow``; else int64.

    ``narrow`` is the sender's promise that every id fits int32 (every table
    of the block has fewer than 2^31 rows and the ids were checked, or
    :func:`fits_int32` said so).
    """
    if narrow or all(v.dtype == np.int32 or not len(v) for v in values):
        return ID_DTYPES[4]
    return ID_DTYPES[8]


def fits_int32(values: np.ndarray) -> bool:
    """True when every id is in [0, 2^31): one max over the ids read as unsigned (a negative id is huge)."""
    if not len(values) or values.dtype == np.int32:
        return True
    u = values if values.dtype.kind == "u" else values.view(values.dtype.str.replace("i", "u"))
    return int(u.max()) <= _INT32_MAX


def _add_kjt(w: _Writer | _IntoWriter, counts: np.ndarray, lengths: Sequence[np.ndarray] | np.ndarray,
             values: Sequence[np.ndarray], ids: np.dtype | None = None) -> None:
    ids = ids_wire_dtype(values) if ids is None else np.dtype(ids)
    w.add(_U32x2.pack(ids.itemsize, 0))
    w.add(np.ascontiguousarray(counts, dtype="<i8"))
    if isinstance(lengths, np.ndarray):
        w.add(np.ascontiguousarray(lengths, dtype="<i4"))
    else:
        w.add_concatenated(lengths, "<i4")   # table-major [T*B]: one section, padded after the whole block
    w.add_concatenated(values, ids)


def _read_kjt(r: _Reader, batch: int, ntables: int, bags: np.ndarray | None = None) -> KJT:
    """A KJT block of ``ntables`` tables of ``batch`` bags each, or of ``bags[t]`` bags (compact)."""
    id_bytes, _ = r.struct(_U32x2, "id width")
    ids = ID_DTYPES.get(id_bytes)
    if ids is None:
        raise ProtocolError(f"{r.what}: ids are {id_bytes} bytes wide; protocol {VERSION} sends 4 or 8", BAD_FRAME)
    counts = r.array("<i8", ntables, "counts")
    if ntables and counts.min(initial=0) < 0:
        raise ProtocolError(f"{r.what}: negative id count", SIZE_MISMATCH)
    bag_starts = None
    if bags is not None and (not ntables or int(bags.min()) == batch):
        bags = None                    # every table carries all B bags: the plain [T, B] layout
    if bags is None:
        lengths = r.array("<i4", ntables * batch, "lengths").reshape(ntables, batch)
        if batch and ntables and lengths.min() < 0:
            t = int(np.argmin(lengths.min(axis=1)))
            raise ProtocolError(f"{r.what}: table #{t} has a negative bag length", SIZE_MISMATCH)
        sums = lengths.sum(axis=1, dtype=np.int64) if batch else np.zeros(ntables, np.int64)
    else:
        bag_starts = np.zeros(ntables + 1, dtype=np.int64)
        np.cumsum(bags, out=bag_starts[1:])
        lengths = r.array("<i4", int(bag_starts[-1]), "lengths")
        if len(lengths) and lengths.min() < 0:
            t = int(np.searchsorted(bag_starts, int(np.argmin(lengths)), side="right") - 1)
            raise ProtocolError(f"{r.what}: table #{t} has a negative bag length", SIZE_MISMATCH)
        # Per-table sums of a ragged section: one cumsum read at the table offsets.
        csum = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=csum[1:])
        sums = csum[bag_starts[1:]] - csum[bag_starts[:-1]]
    if not np.array_equal(sums, counts):
        t = int(np.nonzero(sums != counts)[0][0])
        raise ProtocolError(
            f"{r.what}: table #{t}: bag lengths sum to {int(sums[t])} but {int(counts[t])} ids were sent",
            SIZE_MISMATCH,
        )
    total = int(counts.sum())
    values = r.array(ids, total, "values")
    starts = np.zeros(ntables + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return KJT(batch, counts, lengths, values, starts, bag_starts)


def _read_bags(r: _Reader, batch: int, ntables: int) -> np.ndarray:
    """The ``u32 bags[T]`` section of a compact LOOKUP / LOOKUP_RESP; none may exceed B."""
    bags = r.array("<u4", ntables, "bags")
    if ntables and int(bags.max()) > batch:
        t = int(np.argmax(bags))
        raise ProtocolError(f"{r.what}: table #{t} carries {int(bags[t])} bags, more than the batch of {batch}",
                            SIZE_MISMATCH)
    return bags


def _bag_counts(batch: int, lengths: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """u32 [T]: how many bags each table of an outgoing LOOKUP carries (at most ``batch``)."""
    if isinstance(lengths, np.ndarray) and lengths.ndim == 2:
        return np.full(lengths.shape[0], lengths.shape[1], dtype="<u4")
    bags = np.fromiter((len(ln) for ln in lengths), dtype="<u4", count=len(lengths))
    if len(bags) and int(bags.max()) > batch:
        raise ValueError(f"a LOOKUP table carries {int(bags.max())} bags, more than its batch of {batch}")
    return bags


# ---------------------------------------------------------------- LOOKUP


@dataclasses.dataclass(slots=True)
class LookupRequest:
    table_ids: np.ndarray  # uint32 [T]
    kjt: KJT
    budget_us: int = 0     # time left for the answer when the ranker sent it (0: no deadline)
    version: int = 0       # model version the ranker asks for (0: not named, the server's boot version)


def encode_lookup(
    request_id: int,
    batch: int,
    table_ids: Sequence[int] | np.ndarray,
    lengths: Sequence[np.ndarray] | np.ndarray,
    values: Sequence[np.ndarray],
    aux: int = 0,
    flags: int = 0,
    credit_trailer: bool = False,
    budget_us: int = 0,
    narrow_ids: bool = False,
    version: int = 0,
) -> list:
    """Buffers (header first) of a LOOKUP frame; arrays are referenced, not copied.

    ``lengths`` may be compact: table ``i`` then carries ``len(lengths[i])``
    bags (at most ``batch``), the ones that have ids for this server; the
    caller remembers which bags those are (the answer has one partial per
    bag sent, in the same order).

    Ids go as int32 when they are int32 already or ``narrow_ids`` says they
    all fit (the caller knows every table has fewer than 2^31 rows; int64 ids
    are then converted, one pass), else as int64.

    ``budget_us`` (> 0) is the time the answer may still take: the server drops
    the work once it has waited longer.  ``credit_trailer`` reserves the in-band
    credit trailer (8 zero bytes, always last) so the engine can fill in credits
    and their grant time in place just before sending.
    """
    tids = np.asarray(table_ids, dtype="<u4")
    counts = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    w = _Writer()
    w.add(_U32x2.pack(batch, len(tids)))
    w.add(tids)
    w.add(_bag_counts(batch, lengths))
    _add_kjt(w, counts, lengths, values, ids_wire_dtype(values, narrow_ids))
    if version > 0:
        w.add(_U32x2.pack(int(version), 0))
        flags |= _MODEL_VERSION
    if budget_us > 0:
        w.add(_U64.pack(int(budget_us)))
        flags |= 2  # FrameFlag.DEADLINE
    if credit_trailer:
        # The flag marks the trailer whether or not credits ride on this frame
        # (aux = 0 then): the receiver must always strip it.
        w.add(_ZEROS)
        flags |= 1  # FrameFlag.INBAND_CREDIT
    return [pack_header(FrameType.LOOKUP, request_id, w.size, aux, flags), *w.parts]


def decode_lookup(payload, flags: int = 0) -> LookupRequest:
    payload = memoryview(payload)
    if flags & 1:  # INBAND_CREDIT: the last 8 bytes are the grant time, not sections
        payload = payload[: max(0, len(payload) - 8)]
    budget = 0
    if flags & 2:  # DEADLINE: the 8 bytes before any credit trailer
        if len(payload) < 8:
            raise ProtocolError("LOOKUP: too short for its deadline", SIZE_MISMATCH)
        (budget,) = _U64.unpack_from(payload, len(payload) - 8)
        payload = payload[: len(payload) - 8]
    version = 0
    if flags & _MODEL_VERSION:  # the 8 bytes before the deadline
        if len(payload) < 8:
            raise ProtocolError("LOOKUP: too short for its model version", SIZE_MISMATCH)
        version, _ = _U32x2.unpack_from(payload, len(payload) - 8)
        if version == 0:
            raise ProtocolError("LOOKUP: flagged MODEL_VERSION but names version 0", SIZE_MISMATCH)
        payload = payload[: len(payload) - 8]
    r = _Reader(payload, "LOOKUP")
    batch, ntables = r.struct(_U32x2, "batch/tables")
    tids = r.array("<u4", ntables, "table_ids")
    kjt = _read_kjt(r, batch, ntables, _read_bags(r, batch, ntables))
    r.finish()
    return LookupRequest(tids, kjt, budget, version)


# Partials' precision on the wire (LOOKUP_RESP's ``partials`` field; the ranker
# asks with a LOOKUP flag).  f16 rounds to within 2^-11 relative (|x| <= 65504;
# a partial outside that range travels as f32), bf16 to within 2^-8 relative
# over f32's whole range.
PARTIALS = {"fp32": 0, "fp16": 1, "bf16": 2}
_PARTIAL_BYTES = {0: 4, 1: 2, 2: 2}
_FP16_MAX = 65504.0
FLAG_PARTIALS_FP16 = 4    # LOOKUP: the ranker takes f16 partials (FrameFlag.PARTIALS_FP16)
FLAG_PARTIALS_BF16 = 8    # LOOKUP: the ranker takes bf16 partials (FrameFlag.PARTIALS_BF16)


def partials_flags(partials: str) -> int:
    """LOOKUP flag bits asking for ``partials`` ("fp32", "fp16" or "bf16")."""
    if partials not in PARTIALS:
        raise ValueError(f"partials must be one of {', '.join(PARTIALS)}, got {partials!r}")
    return {"fp32": 0, "fp16": FLAG_PARTIALS_FP16, "bf16": FLAG_PARTIALS_BF16}[partials]


def partials_of_flags(flags: int) -> str:
    """The partials' precision a LOOKUP's flags ask for (fp32 when none)."""
    if flags & FLAG_PARTIALS_BF16:
        return "bf16"
    if flags & FLAG_PARTIALS_FP16:
        return "fp16"
    return "fp32"


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    out = rounded.astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def lookup_response_size(batch: int | Sequence[int], dims: Sequence[int], partials: str = "fp32") -> int:
    """Payload bytes of a LOOKUP_RESP: lets a receiver reserve its slot up front.

    ``batch`` is the bags of every table, or one count per table (a compact LOOKUP's ``bags``).
    """
    t = len(dims)
    bags = [batch] * t if isinstance(batch, int) else [int(b) for b in batch]
    width = _PARTIAL_BYTES[PARTIALS[partials]]
    head = 8 + (4 * t + _pad(4 * t)) * 3
    return head + sum(width * b * d + _pad(width * b * d) for b, d in zip(bags, dims))  # each partial 8-aligned


def encode_lookup_response(request_id: int, table_ids: np.ndarray, pooled: Sequence[np.ndarray], aux: int = 0,
                           partials: str = "fp32", batch: int | None = None) -> list:
    """Buffers of a LOOKUP_RESP; ``pooled[i]`` is float32 [bags_i, dim_i] (C order).

    ``batch`` echoes the LOOKUP's B (default: the most bags of any table);
    each partial has one row per bag its table carried in the LOOKUP.

    ``partials`` "fp16" or "bf16" halves the bytes (one rounding per value; see
    PARTIALS); f16 falls back to f32 for a frame with a value f16 cannot hold.
    """
    bags = np.fromiter((p.shape[0] for p in pooled), dtype="<u4", count=len(pooled))
    if batch is None:
        batch = int(bags.max()) if len(bags) else 0
    if len(pooled) > 0xFFFF:
        raise ValueError(f"a LOOKUP_RESP carries at most 65535 tables, got {len(pooled)}")
    code = PARTIALS[partials]
    if code == 1 and any(p.size and not (np.abs(p).max() <= _FP16_MAX) for p in pooled):
        code = 0
    w = _Writer()
    w.add(_U32_U16x2.pack(batch, len(pooled), code))
    w.add(np.asarray(table_ids, dtype="<u4"))
    w.add(np.fromiter((p.shape[1] for p in pooled), dtype="<u4", count=len(pooled)))
    w.add(bags)
    for p in pooled:
        if code == 0:
            w.add(np.ascontiguousarray(p, dtype="<f4"))
        elif code == 1:
            w.add(np.asarray(p).astype("<f2"))
        else:
            w.add(_to_bf16(p))
    return [pack_header(FrameType.LOOKUP_RESP, request_id, w.size, aux), *w.parts]


def decode_lookup_response(payload) -> tuple[np.ndarray, list[np.ndarray]]:
    """(table_ids, [float32 [bags_t, dim_t]]) of a LOOKUP_RESP payload (views when sent as f32)."""
    r = _Reader(payload, "LOOKUP_RESP")
    batch, ntables, code = r.struct(_U32_U16x2, "batch/tables/partials")
    if code not in _PARTIAL_BYTES:
        raise ProtocolError(f"LOOKUP_RESP: unknown partials precision {code} (0 f32, 1 f16, 2 bf16)", BAD_FRAME)
    tids = r.array("<u4", ntables, "table_ids")
    dims = r.array("<u4", ntables, "dims")
    bags = _read_bags(r, batch, ntables)
    wire = ("<f4", "<f2", "<u2")[code]
    out = [r.array(wire, int(b) * int(d), f"partial[{i}]").reshape(int(b), int(d))
           for i, (b, d) in enumerate(zip(bags, dims))]
    r.finish()
    if code == 1:
        out = [p.astype(np.float32) for p in out]
    elif code == 2:
        out = [_from_bf16(p) for p in out]
    return tids, out


# ---------------------------------------------------------------- FETCH


def encode_fetch(request_id: int, table_id: int, ids: np.ndarray, version: int = 0) -> list:
    """Buffers of a FETCH; ``version`` > 0 names the model version (its second u32, flag MODEL_VERSION)."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    w = _Writer()
    w.add(_U32x2.pack(table_id, int(version)))
    w.add(ids)
    return [pack_header(FrameType.FETCH, request_id, w.size, flags=_MODEL_VERSION if version > 0 else 0), *w.parts]


def fetch_version(payload, flags: int) -> int:
    """The model version a FETCH names (0: not named)."""
    if not flags & _MODEL_VERSION or len(payload) < 8:
        return 0
    return _U32x2.unpack_from(payload, 0)[1]


def decode_fetch(payload) -> tuple[int, np.ndarray]:
    r = _Reader(payload, "FETCH")
    table_id, _ = r.struct(_U32x2, "table_id")
    n = (len(r.buf) - r.off) // 8
    ids = r.array("<i8", n, "ids")
    r.finish()
    return table_id, ids


def encode_fetch_response(request_id: int, table_id: int, rows: np.ndarray, aux: int = 0) -> list:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    w = _Writer()
    w.add(_U32x2.pack(table_id, rows.shape[1]))
    # The row count is implied by the payload length, so the rows are not padded:
    # with dim 1 and an odd count, 4 bytes of padding would read as one more row.
    if rows.nbytes:
        w.parts.append(rows)
        w.size += rows.nbytes
    return [pack_header(FrameType.FETCH_RESP, request_id, w.size, aux), *w.parts]


def decode_fetch_response(payload) -> tuple[int, np.ndarray]:
    r = _Reader(payload, "FETCH_RESP")
    table_id, dim = r.struct(_U32x2, "table_id/dim")
    if dim == 0:
        raise ProtocolError("FETCH_RESP: dim is 0", SIZE_MISMATCH)
    n = (len(r.buf) - r.off) // (4 * dim)
    rows = r.array("<f4", n * dim, "rows").reshape(n, dim)
    r.finish()
    return table_id, rows


# ---------------------------------------------------------------- client requests


@dataclasses.dataclass(slots=True)
class ClientRequest:
    names: list[str]
    dense: np.ndarray | None  # float32 [B, F] or None for CLIENT_LOOKUP
    kjt: KJT

    @property
    def batch(self) -> int:
        return self.kjt.batch


def _names_blob(names: Sequence[str]) -> bytes:
    for n in names:
        if "\n" in n:
            raise ValueError(f"table name {n!r} contains a newline")
    return "\n".join(names).encode()


def encode_client_request(
    request_id: int,
    names: Sequence[str],
    lengths: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    batch: int,
    dense: np.ndarray | None = None,
    timeout_ms: int = 0,
    narrow_ids: bool = False,
) -> list:
    """Buffers of a PREDICT (dense given) or CLIENT_LOOKUP (dense None) frame (aux = timeout, ms).

    ``narrow_ids``: every id is known to fit int32 (see :func:`fits_int32`): send them as int32.
    """
    w = _Writer()
    ftype = _client_request_sections(w, names, lengths, values, batch, dense, narrow_ids)
    return [pack_header(ftype, request_id, w.size, aux=max(0, min(int(timeout_ms), 0xFFFFFFFF))), *w.parts]


def write_client_request(
    dest: np.ndarray,
    request_id: int,
    names: Sequence[str],
    lengths: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    batch: int,
    dense: np.ndarray | None = None,
    timeout_ms: int = 0,
    narrow_ids: bool = False,
) -> tuple[bytes, int] | None:
    """The payload :func:`encode_client_request` would send, written straight into the uint8 array ``dest``
    (ids cast to their wire width on the way in): ``(that frame's header, payload bytes)``, or None when it
    does not fit (``dest`` then holds a partial write)."""
    w = _IntoWriter(dest)
    ftype = _client_request_sections(w, names, lengths, values, batch, dense, narrow_ids)
    if w.overflow:
        return None
    return pack_header(ftype, request_id, w.size, aux=max(0, min(int(timeout_ms), 0xFFFFFFFF))), w.size


def _client_request_sections(w: _Writer | _IntoWriter, names: Sequence[str], lengths: Sequence[np.ndarray],
                             values: Sequence[np.ndarray], batch: int, dense: np.ndarray | None,
                             narrow_ids: bool) -> FrameType:
    """Add a PREDICT / CLIENT_LOOKUP payload's sections to ``w``; the frame type they make."""
    blob = _names_blob(names)
    nfeat = 0 if dense is None else dense.shape[1]
    counts = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    w.add(_U32x4.pack(batch, len(names), nfeat, len(blob)))
    w.add(blob)
    if dense is not None:
        w.add(np.ascontiguousarray(dense, dtype="<f4"))
    _add_kjt(w, counts, list(lengths), values, ids_wire_dtype(values, narrow_ids))
    return FrameType.PREDICT if dense is not None else FrameType.CLIENT_LOOKUP


def decode_client_request(payload, ftype: int) -> ClientRequest:
    what = "PREDICT" if ftype == FrameType.PREDICT else "LOOKUP"
    r = _Reader(payload, what)
    batch, ntables, nfeat, blob_len = r.struct(_U32x4, "header")
    try:
        names = bytes(r.raw(blob_len, "names")).decode().split("\n") if ntables else []
    except UnicodeDecodeError:
        raise ProtocolError(f"{what}: table names are not utf-8", BAD_FRAME) from None
    if len(names) != ntables:
        raise ProtocolError(f"{what}: {ntables} tables announced but {len(names)} names sent", SIZE_MISMATCH)
    dense = None
    if ftype == FrameType.PREDICT:
        dense = r.array("<f4", batch * nfeat, "dense").reshape(batch, nfeat)
    kjt = _read_kjt(r, batch, ntables)
    r.finish()
    return ClientRequest(names, dense, kjt)


def encode_scores(request_id: int, scores: np.ndarray, version: int = 0) -> list:
    """Buffers of a PREDICT_RESP; ``version`` > 0 adds the ``u32 version, u32 0`` trailer (flag MODEL_VERSION)."""
    s = np.ascontiguousarray(scores, dtype="<f4")
    if version <= 0:
        return [pack_header(FrameType.PREDICT_RESP, request_id, s.nbytes, aux=len(s)), s]
    return [pack_header(FrameType.PREDICT_RESP, request_id, s.nbytes + 8, aux=len(s), flags=_MODEL_VERSION), s,
            _U32x2.pack(int(version), 0)]


def scores_version(payload, flags: int) -> int:
    """The model version that served a PREDICT_RESP (0: not named)."""
    if not flags & _MODEL_VERSION or len(payload) < 8:
        return 0
    return _U32x2.unpack_from(payload, len(payload) - 8)[0]


def decode_scores(payload, flags: int = 0) -> np.ndarray:
    mv = memoryview(payload)
    if flags & _MODEL_VERSION:  # the version trailer
        if len(mv) < 8:
            raise ProtocolError("PREDICT_RESP: too short for its model version", SIZE_MISMATCH)
        mv = mv[: len(mv) - 8]
    if len(mv) % 4:
        raise ProtocolError("PREDICT_RESP: payload is not a float32 array", SIZE_MISMATCH)
    return np.frombuffer(mv, dtype="<f4")


def encode_pooled(request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray], version: int = 0) -> list:
    """Buffers of a CLIENT_LOOKUP_RESP; ``version`` (the model version that served it) in the head's 4th u32."""
    batch = pooled[0].shape[0] if pooled else 0
    head, _offsets, size = pooled_layout(names, [p.shape[1] for p in pooled], batch, version)
    w = _Writer()
    w.add(head)
    for p in pooled:
        w.add(np.ascontiguousarray(p, dtype="<f4"))
    return [pooled_header(request_id, size, version), *w.parts]


def pooled_layout(names: Sequence[str], dims: Sequence[int], batch: int,
                  version: int = 0) -> tuple[bytes, list[int], int]:
    """Where a CLIENT_LOOKUP_RESP's sections go: ``(head, offsets, payload size)``.

    ``head`` is everything before the first table's floats (sizes, names and
    dims, each padded to 8); table ``i``'s [batch, dims[i]] float32 rows start
    at ``offsets[i]`` of the payload (8-aligned, each section padded).
    ``encode_pooled`` is this layout with the arrays appended; the ranker also
    uses it to accumulate an answer straight into a client's reply slot
    (flexemrd.inference.replies.SocketReplies.place_pooled).
    """
    blob = _names_blob(names)
    dims_bytes = np.asarray(dims, dtype="<u4").tobytes()
    head = b"".join((_U32x4.pack(batch, len(names), len(blob), int(version)), blob, _ZEROS[: _pad(len(blob))],
                     dims_bytes, _ZEROS[: _pad(len(dims_bytes))]))
    offsets, off = [], len(head)
    for d in dims:
        offsets.append(off)
        n = 4 * batch * int(d)
        off += n + _pad(n)
    return head, offsets, off


def pooled_header(request_id: int, payload_len: int, version: int = 0) -> bytes:
    """The frame header of a CLIENT_LOOKUP_RESP whose payload is ``payload_len`` bytes."""
    return pack_header(FrameType.CLIENT_LOOKUP_RESP, request_id, payload_len,
                       flags=_MODEL_VERSION if version > 0 else 0)


def pooled_version(payload) -> int:
    """The model version that served a CLIENT_LOOKUP_RESP (0: not named)."""
    if len(payload) < 16:
        return 0
    return _U32x4.unpack_from(payload, 0)[3]


def decode_pooled(payload) -> dict[str, np.ndarray]:
    r = _Reader(payload, "CLIENT_LOOKUP_RESP")
    batch, ntables, blob_len, _ = r.struct(_U32x4, "header")
    try:
        names = bytes(r.raw(blob_len, "names")).decode().split("\n") if ntables else []
    except UnicodeDecodeError:
        raise ProtocolError(f"{r.what}: table names are not utf-8", BAD_FRAME) from None
    if len(set(names)) != ntables:
        raise ProtocolError(f"{r.what}: {ntables} tables announced but {len(set(names))} distinct names sent",
                            SIZE_MISMATCH)
    dims = r.array("<u4", ntables, "dims")
    out = {n: r.array("<f4", batch * int(d), n).reshape(batch, int(d)) for n, d in zip(names, dims)}
    r.finish()
    return out


# ---------------------------------------------------------------- small frames


def encode_error(request_id: int, code: int, message: str) -> list:
    body = message.encode("utf-8", "replace")[:65536]
    return [pack_header(FrameType.ERROR, request_id, len(body), aux=int(code)), body]


def decode_error(payload) -> str:
    return bytes(payload).decode("utf-8", "replace")


@dataclasses.dataclass(slots=True)
class Hello:
    role: int
    name: str
    shards: np.ndarray  # structured [n] of (table_id, dim, start, end)
    blob: bytes = b""   # a transport's connection set-up (RDMA: flexemr.transport.rdma.blob), b"" for TCP


def encode_hello(request_id: int, role: int, name: str, shards: Sequence[tuple[int, int, int, int]] = (),
                 credits: int = 0, blob: bytes = b"") -> list:
    """Buffers of a HELLO; a ranker's ``credits`` (aux) are the response slots it grants up front (0: no flow control).

    ``blob`` (optional) follows the name after a NUL: the transport's
    connection set-up, e.g. the RDMA ConnectionBlob, which must not start
    with a NUL byte.  Peers that send none decode as before.
    """
    if not 0 <= credits <= 0xFFFF_FFFF:
        raise ValueError(f"HELLO credits must fit a u32, got {credits}")
    arr = np.array(list(shards), dtype=_SHARD)
    w = _Writer()
    w.add(_U32x2.pack(role, len(arr)))
    w.add(arr)
    if blob:
        if blob[:1] == b"\0":
            raise ValueError("HELLO blob must not start with a NUL byte")
        w.add(name.encode() + b"\0")
        w.add(blob)
    else:
        w.add(name.encode())
    return [pack_header(FrameType.HELLO, request_id, w.size, aux=credits), *w.parts]


def decode_hello(payload) -> Hello:
    r = _Reader(payload, "HELLO")
    role, n = r.struct(_U32x2, "role/n_shards")
    shards = r.array(_SHARD, n, "shards")
    # The name is the rest of the payload up to the first NUL (the encoder pads
    # to 8 bytes with NULs); a transport blob may follow the padding, itself padded.
    name, sep, tail = bytes(r.buf[r.off :]).partition(b"\0")
    return Hello(role, name.decode("utf-8", "replace"), shards, tail.lstrip(b"\0") if sep else b"")


SERVER_STATS = ("lookups", "fetches", "errors", "bytes_in", "bytes_out", "connections", "credits_received",
                "credit_waits", "credit_wait_ns", "credit_latency_p50_ns", "credit_latency_p99_ns", "credit_samples",
                "expired", "bags_pooled")   # bags_pooled: (bag, table) pairs pooled (compact LOOKUPs send fewer)


def encode_stats(request_id: int, values: Sequence[int]) -> list:
    arr = np.asarray(values, dtype="<u8")
    return [pack_header(FrameType.STATS_RESP, request_id, arr.nbytes), arr]


def decode_stats(payload) -> dict[str, int]:
    mv = memoryview(payload)
    if len(mv) % 8:
        raise ProtocolError("STATS_RESP: payload is not a u64 array", SIZE_MISMATCH)
    arr = np.frombuffer(mv, dtype="<u8")
    return {k: int(v) for k, v in zip(SERVER_STATS, arr)}


def inband_grant_ns(payload) -> int:
    """Grant time of the credits a LOOKUP carries in band."""
    if len(payload) < 8:
        raise ProtocolError("LOOKUP: flagged INBAND_CREDIT but shorter than its 8-byte trailer", SIZE_MISMATCH)
    return struct.unpack_from("<Q", payload, len(payload) - 8)[0]


def set_inband_credit(frame, credits: int, granted_ns: int) -> None:
    """Piggyback ``credits`` on a whole LOOKUP frame in place (header + payload, e.g. a ring slot).

    The frame must have been encoded with ``credit_trailer=True``: its flag is
    already set and its last 8 bytes are the reserved trailer that receives
    ``granted_ns``; aux receives ``credits``.  Nothing is copied.
    """
    if len(frame) < HEADER_SIZE + 8 or not header_flags(frame) & FrameFlag.INBAND_CREDIT:
        raise ValueError("set_inband_credit: the frame has no in-band credit trailer "
                         "(encode it with encode_lookup(..., credit_trailer=True))")
    set_header_aux(frame, credits)
    _U64.pack_into(frame, len(frame) - 8, granted_ns)


def encode_credit(request_id: int, credits: int, sent_ns: int) -> list:
    return [pack_header(FrameType.CREDIT, request_id, 8, aux=credits), struct.pack("<Q", sent_ns)]


def decode_credit(payload) -> int:
    if len(payload) != 8:
        raise ProtocolError("CREDIT: payload must be 8 bytes", SIZE_MISMATCH)
    return struct.unpack("<Q", payload)[0]


# ---------------------------------------------------------------- model versions (control frames)


class ModelOp:
    """``op`` of a MODEL frame."""

    LOAD = 1         # map the model directory ``path`` as ``version`` (every table)
    LOAD_DELTA = 2   # ``version`` = ``base`` with the changed rows of the delta directory ``path``
    RETIRE = 3       # release ``version`` after its last request
    LIST = 4         # only answer MODEL_RESP


class VersionState:
    """``state`` of a version in a MODEL_RESP."""

    LOADING = 1
    LIVE = 2
    FAILED = 3
    LABELS = {1: "loading", 2: "live", 3: "failed"}


_MODEL_ENTRY = np.dtype([("version", "<u4"), ("state", "<u4"), ("base", "<u4"), ("load_s", "<f4")])
_U32x2Q2 = struct.Struct("<IIQQ")


@dataclasses.dataclass(slots=True)
class ModelRequest:
    op: int
    version: int
    base: int
    path: str


@dataclasses.dataclass(slots=True)
class ModelStatus:
    """What a server holds: ``versions[v] = (state, base, load_s)``; ``message`` explains failures."""

    versions: dict[int, tuple[int, int, float]]
    rss_bytes: int
    peak_rss_bytes: int
    message: str


def encode_model(request_id: int, op: int, version: int = 0, base: int = 0, path: str = "") -> list:
    w = _Writer()
    w.add(_U32x4.pack(op, version, base, 0))
    if path:
        w.add(path.encode())
    return [pack_header(FrameType.MODEL, request_id, w.size), *w.parts]


def decode_model(payload) -> ModelRequest:
    r = _Reader(payload, "MODEL")
    op, version, base, _ = r.struct(_U32x4, "op/version/base")
    try:
        path = bytes(r.buf[r.off:]).rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise ProtocolError("MODEL: path is not utf-8", BAD_FRAME) from None
    return ModelRequest(op, version, base, path)


def encode_model_status(request_id: int, status: ModelStatus) -> list:
    entries = np.array([(v, s, b, t) for v, (s, b, t) in sorted(status.versions.items())], dtype=_MODEL_ENTRY)
    w = _Writer()
    w.add(_U32x2Q2.pack(len(entries), 0, status.rss_bytes, status.peak_rss_bytes))
    w.add(entries)
    if status.message:
        w.add(status.message.encode("utf-8", "replace")[:65536])
    return [pack_header(FrameType.MODEL_RESP, request_id, w.size), *w.parts]


def decode_model_status(payload) -> ModelStatus:
    r = _Reader(payload, "MODEL_RESP")
    n, _, rss, peak = r.struct(_U32x2Q2, "n/rss")
    entries = r.array(_MODEL_ENTRY, n, "versions")
    message = bytes(r.buf[r.off:]).rstrip(b"\0").decode("utf-8", "replace")
    versions = {int(e["version"]): (int(e["state"]), int(e["base"]), float(e["load_s"])) for e in entries}
    return ModelStatus(versions, int(rss), int(peak), message)
# ---------------------------------------------------------------- authentication (flexemr.auth)

ALG_HMAC_SHA256 = 1
_AUTH_NONCE_BYTES = 32
_AUTH_MAC_BYTES = 32


@dataclasses.dataclass(slots=True)
class AuthChallenge:
    alg: int
    nonce: bytes
    message: str


def encode_auth_challenge(request_id: int, nonce: bytes, message: str = "authentication required") -> list:
    """The answer to a HELLO from a peer not authenticated yet: nothing but a nonce and that sentence."""
    w = _Writer()
    w.add(_U32x2.pack(ALG_HMAC_SHA256, len(nonce)))
    w.add(bytes(nonce))
    w.add(message.encode())
    return [pack_header(FrameType.AUTH_CHALLENGE, request_id, w.size), *w.parts]


def decode_auth_challenge(payload) -> AuthChallenge:
    r = _Reader(payload, "AUTH_CHALLENGE")
    alg, n = r.struct(_U32x2, "alg/nonce_len")
    if alg != ALG_HMAC_SHA256 or n != _AUTH_NONCE_BYTES:
        raise ProtocolError(f"AUTH_CHALLENGE: algorithm {alg} with a {n}-byte nonce is not supported "
                            f"(this peer speaks HMAC-SHA256, alg {ALG_HMAC_SHA256}, {_AUTH_NONCE_BYTES}-byte nonces)",
                            BAD_FRAME)
    nonce = bytes(r.raw(n, "nonce"))
    message = bytes(r.buf[r.off :]).rstrip(b"\0").decode("utf-8", "replace")
    return AuthChallenge(alg, nonce, message)


def encode_auth_proof(request_id: int, nonce: bytes, mac: bytes) -> list:
    if len(nonce) != _AUTH_NONCE_BYTES or len(mac) != _AUTH_MAC_BYTES:
        raise ValueError(f"AUTH_PROOF needs a {_AUTH_NONCE_BYTES}-byte nonce and a {_AUTH_MAC_BYTES}-byte mac")
    body = _U32x2.pack(ALG_HMAC_SHA256, len(nonce)) + bytes(nonce) + bytes(mac)
    return [pack_header(FrameType.AUTH_PROOF, request_id, len(body)), body]


def decode_auth_proof(payload) -> tuple[bytes, bytes]:
    """(ranker nonce, mac) of an AUTH_PROOF; ProtocolError naming what is wrong."""
    mv = memoryview(payload).cast("B")
    want = 8 + _AUTH_NONCE_BYTES + _AUTH_MAC_BYTES
    if len(mv) != want:
        raise ProtocolError(f"AUTH_PROOF: payload is {len(mv)} bytes, expected {want}", SIZE_MISMATCH)
    alg, n = _U32x2.unpack_from(mv, 0)
    if alg != ALG_HMAC_SHA256 or n != _AUTH_NONCE_BYTES:
        raise ProtocolError(f"AUTH_PROOF: algorithm {alg} with a {n}-byte nonce is not supported "
                            f"(expected alg {ALG_HMAC_SHA256}, {_AUTH_NONCE_BYTES}-byte nonce)", BAD_FRAME)
    return bytes(mv[8 : 8 + n]), bytes(mv[8 + n :])


def encode_auth_ok(request_id: int, mac: bytes) -> list:
    return [pack_header(FrameType.AUTH_OK, request_id, len(mac)), bytes(mac)]


def decode_auth_ok(payload) -> bytes:
    mv = memoryview(payload).cast("B")
    if len(mv) != _AUTH_MAC_BYTES:
        raise ProtocolError(f"AUTH_OK: payload is {len(mv)} bytes, expected {_AUTH_MAC_BYTES}", SIZE_MISMATCH)
    return bytes(mv)
