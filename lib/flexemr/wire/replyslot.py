"""Reply slots: a client's shared-memory region where the ranker writes answers once.

A same-host client (``InferenceClient(..., shm_replies=True)``) hands the
ranker an anonymous shared region (a sealed memfd, passed with SCM_RIGHTS) and
names, per request, a slot of it that it is not using.  The ranker writes the
answer's payload into that slot, exactly the bytes the normal answer frame
would carry, and sends a 16-byte descriptor instead of the payload.  So a
4 MiB pooled answer costs the ranker one copy and the client none, instead of
a socket send, a receive and two kernel copies.

Negotiation (an old peer on either side keeps working; docs/PROTOCOL.md)::

    client                                          ranker
      PING  flags=REPLY_SLOT                   ->             (an old ranker ignores the flag)
                                               <-   PONG flags=REPLY_SLOT    (this ranker maps regions)
      REPLY_REGION u64 region_bytes + memfd    ->
                                               <-   REPLY_REGION u64 region_bytes   or ERROR (why)

Layouts (little-endian, every section 8-byte aligned)::

    REPLY_REGION payload (both ways)     u64 region_bytes
    request trailer (PREDICT / CLIENT_LOOKUP with flag REPLY_SLOT, after every other section)
                                         u64 slot_offset, u64 slot_capacity
    answer (PREDICT_RESP / CLIENT_LOOKUP_RESP with flag REPLY_SLOT; type, aux and
    the other flags as the normal answer)  u64 slot_offset, u64 nbytes
        region[slot_offset : slot_offset + nbytes] = the normal answer's payload

Write order that makes it safe: the ranker finishes writing the slot before
it sends the descriptor, and the client reads the slot only after it received
the descriptor (the socket orders them).  The client never names a slot that
an array it returned still points into, so the ranker never overwrites memory
a caller holds.  The region must be sealed against shrinking (F_SEAL_SHRINK):
a client that truncated it could otherwise make the ranker fault on a write.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Sequence

import numpy as np

from flexemr.errors import ProtocolError
from flexemr.wire.frame import HEADER, FrameFlag, FrameType, pack_header

REPLY_SLOT = int(FrameFlag.REPLY_SLOT)
MIN_SLOT_BYTES = 4096                # the smallest slot (and region) a client may offer
SLOT_ALIGN = 8                       # slot offsets are 8-aligned: every section decodes as an aligned view
_U64 = struct.Struct("<Q")
_U64x2 = struct.Struct("<QQ")
TRAILER_SIZE = _U64x2.size           # 16
DESCRIPTOR_SIZE = _U64x2.size        # 16
MAX_FDS_PER_READ = 4                 # ancillary room per receive; more fds than this are closed by the kernel
_ANC_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)


# ---------------------------------------------------------------- REPLY_REGION frame


def encode_region(request_id: int, region_bytes: int, flags: int = 0) -> list:
    """Buffers of a REPLY_REGION frame (client: send with the memfd, see ``send_with_fd``; ranker: the ack).

    ``flags`` REQUEST_SLOT: requests may come through the region too (wire/requestslot.py)."""
    return [pack_header(FrameType.REPLY_REGION, request_id, _U64.size, flags=flags), _U64.pack(region_bytes)]


def decode_region(payload) -> int:
    """``region_bytes`` of a REPLY_REGION payload."""
    if len(payload) != _U64.size:
        raise ProtocolError(f"REPLY_REGION: payload is {len(payload)} bytes, expected {_U64.size} (u64 region_bytes)")
    return _U64.unpack_from(payload, 0)[0]


# ---------------------------------------------------------------- request trailer


def add_slot_trailer(frame: list, offset: int, capacity: int) -> list:
    """The request ``frame`` (header + buffers) with flag REPLY_SLOT and the slot trailer appended."""
    magic, version, ftype, flags, aux, rid, plen = HEADER.unpack_from(frame[0], 0)
    head = HEADER.pack(magic, version, ftype, flags | REPLY_SLOT, aux, rid, plen + TRAILER_SIZE)
    return [head, *frame[1:], _U64x2.pack(offset, capacity)]


def split_slot_trailer(payload: memoryview) -> tuple[memoryview, int, int]:
    """``(payload without the trailer, slot_offset, slot_capacity)`` of a request flagged REPLY_SLOT."""
    if len(payload) < TRAILER_SIZE:
        raise ProtocolError(f"request flagged REPLY_SLOT is {len(payload)} bytes: too short for its "
                            f"{TRAILER_SIZE}-byte reply-slot trailer")
    offset, capacity = _U64x2.unpack_from(payload, len(payload) - TRAILER_SIZE)
    return payload[: len(payload) - TRAILER_SIZE], offset, capacity


def check_slot(offset: int, capacity: int, region_bytes: int) -> None:
    """Raise ProtocolError naming what is wrong with a slot of a ``region_bytes`` region."""
    if offset % SLOT_ALIGN:
        raise ProtocolError(f"reply slot offset {offset} is not a multiple of {SLOT_ALIGN}")
    if capacity == 0:
        raise ProtocolError("reply slot capacity is 0")
    if offset >= region_bytes or capacity > region_bytes - offset:
        raise ProtocolError(f"reply slot [{offset}, {offset + capacity}) runs past the end of the "
                            f"{region_bytes}-byte reply region")


# ---------------------------------------------------------------- answer descriptor


def payload_bytes(frame: Sequence) -> int:
    """Payload length of an encoded frame (its header says it)."""
    return HEADER.unpack_from(frame[0], 0)[6]


def encode_descriptor(frame: Sequence, offset: int) -> list:
    """The small frame that replaces ``frame`` once its payload sits at ``offset`` of the region."""
    magic, version, ftype, flags, aux, rid, plen = HEADER.unpack_from(frame[0], 0)
    return [HEADER.pack(magic, version, ftype, flags | REPLY_SLOT, aux, rid, DESCRIPTOR_SIZE),
            _U64x2.pack(offset, plen)]


def decode_descriptor(payload) -> tuple[int, int]:
    """``(slot_offset, nbytes)`` of an answer flagged REPLY_SLOT."""
    if len(payload) != DESCRIPTOR_SIZE:
        raise ProtocolError(f"answer flagged REPLY_SLOT has a {len(payload)}-byte payload, "
                            f"expected its {DESCRIPTOR_SIZE}-byte slot descriptor")
    return _U64x2.unpack_from(payload, 0)


def write_payload(frame: Sequence, dest: np.ndarray) -> int:
    """Copy the payload buffers of ``frame`` (everything after its header) back to back into the uint8 array
    ``dest``; returns the bytes written.  The caller checked that they fit."""
    off = 0
    for buf in frame[1:]:
        src = buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
        n = src.nbytes
        dest[off : off + n] = src
        off += n
    return off


# ---------------------------------------------------------------- descriptor passing


def send_with_fd(sock: socket.socket, frame: list, fd: int) -> None:
    """Send a small frame in one sendmsg with ``fd`` attached (SCM_RIGHTS) to its first byte."""
    data = b"".join(bytes(b) for b in frame)
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if sent < len(data):   # the rest carries no descriptor
        sock.sendall(data[sent:])


class FdCatchingSocket:
    """A stream socket whose ``recv_into`` also keeps the descriptors a peer attached (SCM_RIGHTS).

    Given to a ``FrameReader`` in place of the socket: a descriptor arrives with the first byte it was sent
    with, which a plain ``recv`` would drop (the kernel closes it).  At most ``MAX_FDS_PER_READ`` per
    receive, and in all until the owner takes them with ``take_fds``, are kept (the rest are closed at
    once); the owner must close what it does not use.
    """

    __slots__ = ("sock", "fds")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fds: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, view, nbytes: int = 0) -> int:
        target = view if not nbytes or nbytes >= len(view) else memoryview(view)[:nbytes]
        n, anc, _flags, _addr = self.sock.recvmsg_into([target], _ANC_BYTES, socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if len(self.fds) > MAX_FDS_PER_READ:
            # A peer attaching descriptors to every byte must not exhaust ours: keep the first few only.
            for fd in self.fds[MAX_FDS_PER_READ:]:
                os.close(fd)
            del self.fds[MAX_FDS_PER_READ:]
        return n

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds
