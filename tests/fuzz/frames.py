"""Hostile frames for the fuzz suite: valid frames from the codec, then mutated.

Two kinds, because a receiver treats them differently (docs/PROTOCOL.md):

- **keep-alive** frames have a valid header (magic, version, a known type,
  ``payload_len`` equal to the bytes sent) and a wrong, random or truncated
  payload, or wrong fields (counts, lengths, table ids, ids past the end,
  negative lengths, huge B/T, another type, random flags/aux).  Each must be
  answered by a frame echoing its ``request_id`` (ERROR or a valid answer),
  and the connection stays open.
- **closing** frames break the stream: a bad magic, version or type (answered
  ERROR BAD_FRAME, then closed), a header announcing more than the limit and
  no payload (answered ERROR TOO_LARGE: the fuzzer then hangs up), or a frame
  cut short before the sender closes its side (the receiver just closes).
"""

from __future__ import annotations

import struct

import numpy as np

from flexemr.wire import codec
from flexemr.wire.frame import HEADER, HEADER_SIZE, MAGIC, VERSION, FrameFlag, FrameType

_INTERESTING = np.array([0, 1, 2, 7, 8, 255, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                         0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF,
                         0xFFFF_FFFF_FFFF_FFFE, 1 << 40], dtype=np.uint64)


def _join(frame: list) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in frame)


def _set_rid(frame: bytes, rid: int) -> bytearray:
    out = bytearray(frame)
    struct.pack_into("<Q", out, 16, rid)
    return out


class FrameFactory:
    """Builds keep-alive and closing frames for one surface from a few valid templates."""

    def __init__(self, templates: list[bytes], types: list[int], max_payload: int, seed: int) -> None:
        self.templates = templates       # whole valid frames (header + payload) this surface serves
        self.types = np.array(types, dtype=np.uint16)  # frame types worth sending (all answered)
        self.max_payload = max_payload
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ keep-alive

    def keep_alive(self, rid: int) -> bytes:
        """One frame with a valid header and a hostile payload or fields."""
        rng = self.rng
        base = self.templates[int(rng.integers(len(self.templates)))]
        hdr = bytearray(base[:HEADER_SIZE])
        payload = np.frombuffer(base, dtype=np.uint8, offset=HEADER_SIZE).copy()
        kind = int(rng.integers(10))
        if kind <= 3:      # overwrite 1-3 aligned words: counts, B/T, lengths, table ids, ids, dims ...
            for _ in range(int(rng.integers(1, 4))):
                self._overwrite_word(payload)
        elif kind == 4:    # truncate the payload (the header says the shorter length)
            payload = payload[: int(rng.integers(0, max(1, len(payload))))]
        elif kind == 5:    # extend it with random bytes
            payload = np.concatenate([payload, rng.integers(0, 256, int(rng.integers(1, 256)), dtype=np.uint8)])
        elif kind == 6:    # random bytes of a random length
            payload = rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8)
        elif kind == 7:    # the payload of one type under another type's header
            struct.pack_into("<H", hdr, 6, int(rng.choice(self.types)))
        elif kind == 8:    # random flags and aux (DEADLINE, INBAND_CREDIT and undefined bits)
            struct.pack_into("<II", hdr, 8, int(rng.integers(0, 8)), int(rng.integers(0, 1 << 32)))
            if int(rng.integers(2)):
                struct.pack_into("<I", hdr, 8, int(FrameFlag.DEADLINE))
        else:              # ids far past the end, or negative: the last words of the payload
            n = len(payload) // 8
            if n:
                words = payload[: n * 8].view("<i8")
                k = int(rng.integers(1, min(n, 16) + 1))
                words[-k:] = rng.choice([-1, -(1 << 62), 1 << 40, (1 << 63) - 1, 10**9], size=k)
        if int(hdr[6]) == int(FrameType.HELLO):
            struct.pack_into("<I", hdr, 12, 0)   # credits in a HELLO would switch on flow control (no hang)
        struct.pack_into("<Q", hdr, 16, rid)
        struct.pack_into("<Q", hdr, 24, len(payload))
        return bytes(hdr) + payload.tobytes()

    def _overwrite_word(self, payload: np.ndarray) -> None:
        rng = self.rng
        if len(payload) < 4:
            return
        wide = len(payload) >= 8 and bool(rng.integers(2))
        size = 8 if wide else 4
        limit = min(len(payload) - size, 128) if rng.integers(4) else len(payload) - size
        off = int(rng.integers(0, limit // size + 1)) * size
        value = int(rng.choice(_INTERESTING)) if rng.integers(3) else int(rng.integers(0, 1 << 63))
        if not wide:
            value &= 0xFFFF_FFFF
        payload[off : off + size] = np.frombuffer(value.to_bytes(size, "little"), dtype=np.uint8)

    # ------------------------------------------------------------------ closing

    def closing(self, rid: int) -> tuple[str, bytes]:
        """(kind, bytes) of a frame after which the connection ends: "bad-header", "oversized", "truncated"."""
        rng = self.rng
        kind = int(rng.integers(5))
        if kind == 0:
            return "bad-header", HEADER.pack(b"XXXX", VERSION, 2, 0, 0, rid, 16) + bytes(16)
        if kind == 1:
            return "bad-header", HEADER.pack(MAGIC, VERSION + 1 + int(rng.integers(100)), 2, 0, 0, rid, 0)
        if kind == 2:
            return "bad-header", HEADER.pack(MAGIC, VERSION, 1000 + int(rng.integers(1000)), 0, 0, rid, 0)
        if kind == 3:
            size = self.max_payload + 1 + int(rng.integers(0, 1 << 40))
            return "oversized", HEADER.pack(MAGIC, VERSION, int(rng.choice(self.types)), 0, 0, rid, size)
        frame = self.keep_alive(rid)
        if len(frame) <= HEADER_SIZE:
            frame = _set_rid(self.templates[0], rid)
        cut = int(rng.integers(1, len(frame)))
        return "truncated", bytes(frame[:cut])


# ---------------------------------------------------------------------- templates


def ranker_templates(spec, seed: int = 0) -> list[bytes]:
    """Valid PREDICT / CLIENT_LOOKUP / PING frames for a model (small batches)."""
    rng = np.random.default_rng(seed)
    out = []
    for batch in (1, 3, 8):
        names = [t.name for t in spec.tables]
        lengths = [rng.integers(0, 4, batch).astype(np.int32) for _ in names]
        values = [rng.integers(0, t.rows, int(l.sum())).astype(np.int64) for t, l in zip(spec.tables, lengths)]
        dense = rng.standard_normal((batch, spec.dense_features)).astype(np.float32)
        out.append(_join(codec.encode_client_request(0, names, lengths, values, batch, dense)))
        out.append(_join(codec.encode_client_request(0, names[:1], lengths[:1], values[:1], batch)))
    out.append(HEADER.pack(MAGIC, VERSION, int(FrameType.PING), 0, 0, 0, 0))
    return out


def server_templates(shards: np.ndarray, seed: int = 0) -> list[bytes]:
    """Valid LOOKUP / FETCH / STATS / PING / HELLO frames for the shards a server holds."""
    rng = np.random.default_rng(seed)
    out = []
    for sh in shards[:4]:
        tid, start, end = int(sh["table_id"]), int(sh["start"]), int(sh["end"])
        for batch in (1, 4):
            lengths = rng.integers(0, 4, batch).astype(np.int32)
            ids = rng.integers(start, end, int(lengths.sum())).astype(np.int64)
            out.append(_join(codec.encode_lookup(0, batch, [tid], [lengths], [ids])))
            out.append(_join(codec.encode_lookup(0, batch, [tid], [lengths], [ids], budget_us=10**7)))
        out.append(_join(codec.encode_fetch(0, tid, rng.integers(start, end, 5).astype(np.int64))))
    out.append(HEADER.pack(MAGIC, VERSION, int(FrameType.STATS), 0, 0, 0, 0))
    out.append(HEADER.pack(MAGIC, VERSION, int(FrameType.PING), 0, 0, 0, 0))
    out.append(_join(codec.encode_hello(0, codec.ROLE_CLIENT, "fuzz")))
    return out


RANKER_TYPES = [int(t) for t in FrameType]
# Every type an embedding server answers (CREDIT is never answered: PROTOCOL.md).
SERVER_TYPES = [int(t) for t in FrameType if t != FrameType.CREDIT]
