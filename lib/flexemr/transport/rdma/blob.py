"""The connection blob: what one side of an RDMA connection tells the other.

It travels inside the authenticated TCP HELLO (the HMAC covers it), so this
module only checks that it is well formed, never who sent it.  Fixed layout,
network byte order (big-endian), 64-byte header then ``regions`` entries::

    offset  size  field            meaning
    ------  ----  ---------------  ---------------------------------------------
       0      4   magic            b"FXRB" (MAGIC)
       4      2   version          VERSION (1); unpack refuses any other
       6      2   regions          number of region entries that follow (<= MAX_REGIONS)
       8      4   qpn              data QP number (24 bits, non-zero)
      12      4   psn              data QP's first send PSN (24 bits)
      16      4   credit_qpn       credit QP number (24 bits, non-zero)
      20      4   credit_psn       credit QP's first send PSN (24 bits)
      24     16   gid              the sender's port GID (raw bytes; RoCE v2:
                                   ::ffff:a.b.c.d)
      40      4   mtu              the sender's active path MTU in bytes (256..4096)
      44      4   recv_slots       receives the sender keeps posted on its data QP
                                   (the peer's initial send credits; 0: none)
      48      4   recv_slot_bytes  largest SEND the sender accepts (0: none)
      52      4   flags            bit 0 FLAG_CREDITS_IN_BAND: credit grants travel on
                                   the data QP (the comparison mode), not the credit
                                   QP; bit 1 FLAG_FRAME_STREAM: the sender is one
                                   daemon Connection carrying frames on ONE QP (the
                                   credit fields repeat the data QP; region 0 is its
                                   receive ring of recv_slots x recv_slot_bytes,
                                   written by RDMA WRITE WITH IMM); other bits must
                                   be zero
      56      8   (zero)
      64   24*n   region[i]        a memory region the peer may access remotely:
                                     +0  8  addr    virtual address
                                     +8  8  length  bytes
                                    +16  4  rkey
                                    +20  4  (zero)

A ranker lists its completion memory (the server WRITEs responses into it);
an embedding server lists the tables it lets the ranker READ.  Each side
takes min(own, peer) as the path MTU.  Bumping VERSION is the only way to
change a field's meaning; new fields go into the zero bytes with a new version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from flexemr.transport.rdma.errors import BlobError

MAGIC = b"FXRB"
VERSION = 1
HEADER = struct.Struct("!4sHHIIII16sIIII8x")
REGION = struct.Struct("!QQI4x")
MAX_REGIONS = 16
FLAG_CREDITS_IN_BAND = 1
FLAG_FRAME_STREAM = 2
KNOWN_FLAGS = FLAG_CREDITS_IN_BAND | FLAG_FRAME_STREAM
MAX_BYTES = HEADER.size + MAX_REGIONS * REGION.size
MTUS = (256, 512, 1024, 2048, 4096)
_U24 = 1 << 24
_U64 = 1 << 64

assert HEADER.size == 64 and REGION.size == 24


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """A peer's registered memory: where it lives and the key that opens it."""

    addr: int
    length: int
    rkey: int

    def check(self, offset: int, nbytes: int, what: str) -> int:
        """The remote address of ``[offset, offset + nbytes)``; ValueError if it leaves the region."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise ValueError(
                f"{what}: bytes [{offset}, {offset + nbytes}) are outside the peer's region of {self.length} bytes"
            )
        return self.addr + offset


@dataclass(frozen=True, slots=True)
class ConnectionBlob:
    """One side's connection data (see the module docstring for the layout)."""

    qpn: int
    psn: int
    credit_qpn: int
    credit_psn: int
    gid: bytes
    mtu: int
    recv_slots: int = 0
    recv_slot_bytes: int = 0
    flags: int = 0
    regions: tuple[RemoteRegion, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _validate(self)

    def pack(self) -> bytes:
        """The wire bytes (HEADER.size + 24 * len(regions))."""
        head = HEADER.pack(MAGIC, VERSION, len(self.regions), self.qpn, self.psn, self.credit_qpn,
                           self.credit_psn, self.gid, self.mtu, self.recv_slots, self.recv_slot_bytes,
                           self.flags)
        return head + b"".join(REGION.pack(r.addr, r.length, r.rkey) for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ConnectionBlob:
        """Parse and validate; BlobError names the first field that is wrong."""
        data = bytes(data)
        if len(data) < HEADER.size:
            raise BlobError(f"connection blob: {len(data)} bytes, shorter than its {HEADER.size}-byte header")
        magic, version, nregions, qpn, psn, cqpn, cpsn, gid, mtu, slots, slot_bytes, flags = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BlobError(f"connection blob: bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise BlobError(f"connection blob: version {version} not supported (this side speaks {VERSION})")
        if nregions > MAX_REGIONS:
            raise BlobError(f"connection blob: regions = {nregions} exceeds the cap of {MAX_REGIONS}")
        want = HEADER.size + nregions * REGION.size
        if len(data) != want:
            raise BlobError(f"connection blob: {len(data)} bytes, but {nregions} regions make {want}")
        regions = tuple(RemoteRegion(*REGION.unpack_from(data, HEADER.size + i * REGION.size))
                        for i in range(nregions))
        return cls(qpn, psn, cqpn, cpsn, gid, mtu, slots, slot_bytes, flags, regions)

    @classmethod
    def unpack_padded(cls, data: bytes | bytearray | memoryview) -> ConnectionBlob:
        """Like ``unpack``, for a blob followed by NUL padding (as it arrives inside a HELLO)."""
        data = bytes(data)
        if len(data) < HEADER.size:
            raise BlobError(f"connection blob: {len(data)} bytes, shorter than its {HEADER.size}-byte header")
        nregions = struct.unpack_from("!H", data, 6)[0]
        want = HEADER.size + min(nregions, MAX_REGIONS + 1) * REGION.size
        if len(data) < want or data[want:].strip(b"\0"):
            raise BlobError(f"connection blob: {len(data)} bytes do not hold {nregions} regions "
                            f"followed only by padding")
        return cls.unpack(data[:want])


def _validate(b: ConnectionBlob) -> None:
    for name in ("qpn", "credit_qpn"):
        v = getattr(b, name)
        if not 0 < v < _U24:
            raise BlobError(f"connection blob: {name} = {v} is not a 24-bit queue pair number")
    for name in ("psn", "credit_psn"):
        v = getattr(b, name)
        if not 0 <= v < _U24:
            raise BlobError(f"connection blob: {name} = {v} is not a 24-bit packet sequence number")
    if not isinstance(b.gid, bytes) or len(b.gid) != 16:
        raise BlobError(f"connection blob: gid must be 16 bytes, got {b.gid!r}")
    if b.gid == bytes(16):
        raise BlobError("connection blob: gid is all zeros (the sender picked an empty GID table entry)")
    if b.mtu not in MTUS:
        raise BlobError(f"connection blob: mtu = {b.mtu} is not one of {MTUS}")
    for name in ("recv_slots", "recv_slot_bytes"):
        v = getattr(b, name)
        if not 0 <= v < 1 << 32:
            raise BlobError(f"connection blob: {name} = {v} does not fit in 32 bits")
    if b.flags & ~KNOWN_FLAGS or b.flags < 0:
        raise BlobError(f"connection blob: flags = 0x{b.flags:x} has bits this side does not know "
                        f"(known: 0x{KNOWN_FLAGS:x})")
    if len(b.regions) > MAX_REGIONS:
        raise BlobError(f"connection blob: {len(b.regions)} regions exceed the cap of {MAX_REGIONS}")
    for i, r in enumerate(b.regions):
        if r.length <= 0 or not 0 <= r.addr < _U64 or r.addr + r.length > _U64:
            raise BlobError(f"connection blob: region[{i}] addr=0x{r.addr:x} length={r.length} is not a valid range")
        if not 0 <= r.rkey < 1 << 32:
            raise BlobError(f"connection blob: region[{i}] rkey = {r.rkey} does not fit in 32 bits")


def gid_bytes(gid_text: str) -> bytes:
    """pyverbs' "0000:...:020f" GID text as 16 raw bytes."""
    raw = bytes.fromhex(gid_text.replace(":", ""))
    if len(raw) != 16:
        raise BlobError(f"GID {gid_text!r} is not 16 bytes")
    return raw


def gid_text(gid: bytes) -> str:
    """16 raw GID bytes as pyverbs' text form (eight groups of four hex digits)."""
    h = gid.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))
