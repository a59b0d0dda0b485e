"""Request slots: a same-host client writes a request's payload once into its shared region.

A client whose region the ranker took with flag REQUEST_SLOT (``flexemr.wire.replyslot``
negotiates the region) writes a PREDICT or CLIENT_LOOKUP payload, exactly the
bytes the normal frame would carry, into the region's request area and sends a
16-byte descriptor instead: the ids, lengths and dense features cross no socket
(no sendmsg copy on the client, no receive into a growing buffer on the ranker).

Negotiation (both flags are ignored by peers that predate them; docs/PROTOCOL.md)::

    client                                          ranker
      PING  flags=REPLY_SLOT                   ->
                                               <-   PONG flags=REPLY_SLOT|REQUEST_SLOT  (takes requests too)
      REPLY_REGION flags=REQUEST_SLOT + memfd  ->
                                               <-   REPLY_REGION flags=REQUEST_SLOT     (requests may come from it)

Layout (little-endian)::

    request (PREDICT / CLIENT_LOOKUP with flag REQUEST_SLOT; type, aux, request_id as the normal frame)
        u64 request_offset, u64 nbytes    [| u64 slot_offset, u64 slot_capacity  when REPLY_SLOT is set too]
        region[request_offset : request_offset + nbytes] = the normal request's payload

Checks the ranker makes before it reads a byte (a failure is an ERROR naming it,
and the connection keeps being served): the offset is 8-aligned, the span lies
inside the region, it is not empty and does not overlap the reply slot the same
request names (the answer would be written over the request it answers).

Write order that makes it safe: the client writes the request area before it
sends the descriptor; the ranker copies the span out once, when the
descriptor arrives, so a client that rewrites the area later (a bug, or a
hostile peer) changes nothing the ranker validated.  The client writes the
area again only after the request's answer (or its error) arrived: one
request in flight per client object, and a client that gives up waiting drops
the connection and its region with it.
"""

from __future__ import annotations

import struct
from typing import Sequence

from flexemr.errors import ProtocolError
from flexemr.wire.frame import HEADER, FrameFlag

REQUEST_SLOT = int(FrameFlag.REQUEST_SLOT)
REQUEST_ALIGN = 8
_U64x2 = struct.Struct("<QQ")
DESCRIPTOR_SIZE = _U64x2.size        # 16


def encode_descriptor(frame: Sequence, offset: int, nbytes: int) -> list:
    """The small frame that replaces request ``frame`` once its payload sits at ``offset`` of the region."""
    magic, version, ftype, flags, aux, rid, _plen = HEADER.unpack_from(frame[0], 0)
    return [HEADER.pack(magic, version, ftype, flags | REQUEST_SLOT, aux, rid, DESCRIPTOR_SIZE),
            _U64x2.pack(offset, nbytes)]


def decode_descriptor(payload) -> tuple[int, int]:
    """``(request_offset, nbytes)`` of a request flagged REQUEST_SLOT (its reply-slot trailer already split off)."""
    if len(payload) != DESCRIPTOR_SIZE:
        raise ProtocolError(f"request flagged REQUEST_SLOT has a {len(payload)}-byte payload, expected its "
                            f"{DESCRIPTOR_SIZE}-byte descriptor (u64 request_offset, u64 nbytes)")
    return _U64x2.unpack_from(payload, 0)


def check_span(offset: int, nbytes: int, region_bytes: int,
               reply_slot: tuple[int, int] | None = None) -> None:
    """Raise ProtocolError naming what is wrong with request bytes ``[offset, offset + nbytes)`` of a
    ``region_bytes`` region; ``reply_slot`` ``(offset, capacity)``: the slot the same request names."""
    if offset % REQUEST_ALIGN:
        raise ProtocolError(f"request offset {offset} in the shared region is not a multiple of {REQUEST_ALIGN}")
    if nbytes == 0:
        raise ProtocolError("request in the shared region is 0 bytes long")
    if offset >= region_bytes or nbytes > region_bytes - offset:
        raise ProtocolError(f"request bytes [{offset}, {offset + nbytes}) run past the end of the "
                            f"{region_bytes}-byte shared region")
    if reply_slot is not None:
        s_off, s_cap = reply_slot
        if offset < s_off + s_cap and s_off < offset + nbytes:
            raise ProtocolError(f"request bytes [{offset}, {offset + nbytes}) overlap the reply slot "
                                f"[{s_off}, {s_off + s_cap}) the same request names")
