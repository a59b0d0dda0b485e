"""Frame header of the flexemr wire protocol (ranker <-> embedding server, client <-> ranker).

Every message is one frame: a fixed 32-byte header followed by ``payload_len``
bytes of payload.  All integers are little-endian::

    offset size field        meaning
    ------ ---- ------------ ---------------------------------------------------
       0    4   magic        b"FXMR"
       4    2   version      protocol version (VERSION); a peer refuses others
       6    2   type         FrameType
       8    4   flags        FrameFlag bits
      12    4   aux          type-specific small value (error code, credits, ...)
      16    8   request_id   chosen by the requester, echoed in the answer
      24    8   payload_len  bytes that follow; checked against the receiver's
                             limit *before* anything is allocated
      32        payload      type-specific; see codec.py and docs/PROTOCOL.md

Payloads are sequences of 8-byte aligned numpy sections, so decoding is a set
of ``np.frombuffer`` views and never touches elements one by one in Python.
"""

from __future__ import annotations

import enum
import struct

from flexemr.errors import ProtocolError

MAGIC = b"FXMR"
VERSION = 3   # 2: KJT blocks say their id width; 3: compact LOOKUPs (bags per table); see docs/PROTOCOL.md
HEADER = struct.Struct("<4sHHIIQQ")
HEADER_SIZE = HEADER.size  # 32
_FLAGS_AT = struct.Struct("<I")     # offset 8
_AUX_AT = struct.Struct("<I")       # offset 12
_REQUEST_ID_AT = struct.Struct("<Q")  # offset 16
DEFAULT_MAX_PAYLOAD = 1 << 30  # 1 GiB; configurable per endpoint


class FrameType(enum.IntEnum):
    HELLO = 1            # either direction: identity, and (server -> ranker) the shards held
    LOOKUP = 2           # ranker -> server: pooled lookup subrequest (KJT section, table ids)
    LOOKUP_RESP = 3      # server -> ranker: one partial pooled vector per (table, bag)
    FETCH = 4            # ranker -> server: raw rows, for cache fills
    FETCH_RESP = 5       # server -> ranker: the rows [n, dim]
    ERROR = 6            # either direction: code (aux) + message
    CREDIT = 7           # ranker -> server on the priority channel: aux = response slots granted
    PREDICT = 8          # client -> ranker: dense + sparse (table names)
    PREDICT_RESP = 9     # ranker -> client: scores [B]
    CLIENT_LOOKUP = 10   # client -> ranker: sparse only
    CLIENT_LOOKUP_RESP = 11  # ranker -> client: pooled vectors per table
    PING = 12            # either direction: liveness; answered with PONG
    PONG = 13
    STATS = 14           # ranker/tool -> server: counters request
    STATS_RESP = 15      # server -> requester: fixed u64 counters (codec.SERVER_STATS)
    MODEL = 16           # ranker/tool -> server: load, retire or list model versions (codec.encode_model)
    MODEL_RESP = 17      # server -> requester: every version it holds and its state
    AUTH_CHALLENGE = 18  # server -> ranker, answering HELLO when a secret is required: the server's nonce
    AUTH_PROOF = 19      # ranker -> server: the ranker's nonce + HMAC proof (flexemr.auth)
    AUTH_OK = 20         # server -> ranker: the server's HMAC proof back; the ranker then repeats HELLO
    REPLY_REGION = 21    # client -> ranker: a shared reply region (memfd by SCM_RIGHTS); ranker -> client: accepted


class FrameFlag(enum.IntFlag):
    NONE = 0
    INBAND_CREDIT = 1    # LOOKUP carries credits in aux and a u64 grant time after its sections
    DEADLINE = 2         # LOOKUP/FETCH carry a u64 time budget (µs, left when sent) before any credit trailer
    PARTIALS_FP16 = 4    # LOOKUP: answer with f16 partials (LOOKUP_RESP says what it sent)
    PARTIALS_BF16 = 8    # LOOKUP: answer with bf16 partials
    MODEL_VERSION = 16   # LOOKUP: a u32 model version before the other trailers; FETCH: the version in its
                          # second u32; PREDICT_RESP: a u32 version trailer; CLIENT_LOOKUP_RESP: in its 4th u32
    REPLY_SLOT = 32      # PING/PONG: offer/accept a reply region; PREDICT/CLIENT_LOOKUP: a reply-slot trailer;
                          # PREDICT_RESP/CLIENT_LOOKUP_RESP: the answer is in that slot (see wire/replyslot.py)
    REQUEST_SLOT = 64    # PONG/REPLY_REGION: requests may come through the region too; PREDICT/CLIENT_LOOKUP:
                          # the payload is in the client's region, the frame carries where (wire/requestslot.py)


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1        # header or payload layout is malformed
    UNKNOWN_TABLE = 2
    ID_OUT_OF_RANGE = 3  # an id outside the table or outside the shards this server holds
    SIZE_MISMATCH = 4    # counts / lengths / payload sizes disagree
    TOO_LARGE = 5        # payload over the receiver's limit
    UNSUPPORTED = 6      # frame type or version this peer does not serve
    INTERNAL = 7
    BAD_REQUEST = 8      # client request failed validation (field named in the message)
    OVERLOADED = 9
    UNAVAILABLE = 10     # the ranker cannot reach an embedding server
    DEADLINE_EXCEEDED = 11  # the request ran out of time (the message names the stage)
    UNKNOWN_VERSION = 12    # a LOOKUP/FETCH names a model version this server does not hold (any more)
    UNAUTHENTICATED = 13    # a frame other than HELLO/AUTH_PROOF before authentication, or a failed proof


class Header:
    """A decoded frame header (plain attributes: cheap to build per frame)."""

    __slots__ = ("type", "flags", "aux", "request_id", "payload_len")

    def __init__(self, type: int, flags: int, aux: int, request_id: int, payload_len: int) -> None:
        self.type = type
        self.flags = flags
        self.aux = aux
        self.request_id = request_id
        self.payload_len = payload_len

    def __repr__(self) -> str:
        try:
            tname = FrameType(self.type).name
        except ValueError:
            tname = str(self.type)
        return f"Header({tname}, flags={self.flags}, aux={self.aux}, id={self.request_id}, len={self.payload_len})"


# The frames an inference client speaks have not changed since version 2 (protocol 3 changed
# only the ranker <-> embedding server LOOKUP): they are still sent as version 2, and a version 2
# header is still accepted for them, so clients and rankers can be upgraded in either order.
# Every other frame is sent as VERSION and refused in any other version, so an embedding server
# and a ranker of different protocols refuse each other at their first frame (the HELLO).
CLIENT_VERSION = 2
_CLIENT_TYPES = frozenset(int(t) for t in (FrameType.PREDICT, FrameType.PREDICT_RESP, FrameType.CLIENT_LOOKUP,
                                           FrameType.CLIENT_LOOKUP_RESP, FrameType.ERROR, FrameType.PING,
                                           FrameType.PONG, FrameType.REPLY_REGION))
_VERSION_OF = {t: (CLIENT_VERSION if t in _CLIENT_TYPES else VERSION) for t in (int(x) for x in FrameType)}


def pack_header(ftype: int, request_id: int, payload_len: int, aux: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, _VERSION_OF.get(ftype, VERSION), ftype, flags, aux, request_id, payload_len)


def pack_header_into(buf, offset: int, ftype: int, request_id: int, payload_len: int, aux: int = 0, flags: int = 0) -> None:
    HEADER.pack_into(buf, offset, MAGIC, _VERSION_OF.get(ftype, VERSION), ftype, flags, aux, request_id, payload_len)


def header_request_id(frame) -> int:
    """``request_id`` of the frame whose header starts ``frame`` (no full decode: hot path)."""
    return _REQUEST_ID_AT.unpack_from(frame, 16)[0]


def header_flags(frame) -> int:
    """``flags`` of the frame whose header starts ``frame``."""
    return _FLAGS_AT.unpack_from(frame, 8)[0]


def set_header_aux(frame, aux: int) -> None:
    """Overwrite ``aux`` in place in the header that starts the writable buffer ``frame``."""
    _AUX_AT.pack_into(frame, 12, aux)


def unpack_header(buf, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Header:
    """Decode and validate a header; raises ProtocolError naming what is wrong."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"truncated header: {len(buf)} of {HEADER_SIZE} bytes")
    magic, version, ftype, flags, aux, rid, plen = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a flexemr peer")
    if version != VERSION and not (version == CLIENT_VERSION and ftype in _CLIENT_TYPES):
        raise ProtocolError(f"protocol version {version} not supported (this peer speaks {VERSION})")
    if ftype not in _KNOWN_TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if plen > max_payload:
        raise ProtocolError(f"payload of {plen} bytes exceeds the limit of {max_payload} bytes")
    return Header(ftype, flags, aux, rid, plen)


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
