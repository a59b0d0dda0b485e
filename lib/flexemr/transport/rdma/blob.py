"""The connection blob: what one side of an RDMA connection tells the other.

It travels inside the authenticated TCP HELLO (the HMAC covers it), so this
module only checks that it is well formed, never who sent it.  Fixed layout,
network byte order (big-endian), 64-byte header then ``regions`` entries::

    offset  size  field            meaning
    ------  ----  ---------------  ---------------------------------------------
       0      4   magic            b"FXRB" (MAGIC)
       4      2   version          1, 2 or 3 (VERSIONS); unpack refuses any other
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
      56      1   accepts          highest version the sender can read (0 = 1: what v1
                                   peers leave there; they never look at bytes 56..63)
      57      1   (zero)
      58      2   tables           v2: number of table entries after the regions (v1: 0)
      60      4   boot_version     v2: the model version a FETCH naming none (0) is
                                   served from (v1: 0)
      64   24*n   region[i]        a memory region the peer may access remotely:
                                     +0  8  addr    virtual address
                                     +8  8  length  bytes
                                    +16  4  rkey
                                    +20  4  (zero)
       .   48*m   table[j]         (v2) rows of a table the peer may RDMA READ for
                                   cache fills (an embedding server's shard):
                                     +0  4  table_id
                                     +4  4  model_version  the version these rows are
                                    +8  8  first_row      global id of the first row
                                   +16  8  rows           rows registered from first_row
                                   +24  8  addr           virtual address of first_row
                                   +32  4  rkey
                                   +36  4  row_bytes      stride between rows
                                   +40  4  dim            values per row
                                   +44  1  dtype          1: little-endian float32
                                   +45  3  (zero)

Version 3 (same layout as 2): a ranker whose region 0 is a shm landing it
lends responses from (stream.py, landing.py) says ``accepts`` = 3; a v3
server answers it with version 3, meaning "I place my WRITEs in your region
0 as a byte ring within your byte grants" (instead of slot k at k x
recv_slot_bytes).  A v2 server ignores ``accepts`` beyond 2 and answers v2:
the ranker then receives into slots and copies, as before.

Versions: a ranker sends a version 1 blob with ``accepts`` = 2, which an
old (v1) server parses unchanged (it ignores bytes 56..63) and answers with
v1: no tables, cache fills keep going as FETCH frames.  A v2 server answers
a ranker whose blob accepts 2 with a v2 blob listing its tables; a ranker
that does not (an old one) gets v1.  So either side may be upgraded first.

A ranker lists its completion memory (the server WRITEs responses into it);
an embedding server lists the tables it lets the ranker READ (v2 table
entries).  Each side
takes min(own, peer) as the path MTU.  Bumping VERSION is the only way to
change a field's meaning; new fields go into the zero bytes with a new version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from flexemr.transport.rdma.errors import BlobError

MAGIC = b"FXRB"
VERSION = 3                 # the highest version this side writes and reads
VERSIONS = (1, 2, 3)
HEADER = struct.Struct("!4sHHIIII16sIIIIBxHI")
REGION = struct.Struct("!QQI4x")
TABLE = struct.Struct("!IIQQQIIIB3x")
MAX_REGIONS = 16
MAX_TABLES = 64
DTYPE_F32 = 1               # table entry dtype: little-endian float32 (what FETCH_RESP carries)
FLAG_CREDITS_IN_BAND = 1
FLAG_FRAME_STREAM = 2
KNOWN_FLAGS = FLAG_CREDITS_IN_BAND | FLAG_FRAME_STREAM
MAX_BYTES = HEADER.size + MAX_REGIONS * REGION.size + MAX_TABLES * TABLE.size
MTUS = (256, 512, 1024, 2048, 4096)
_U24 = 1 << 24
_U64 = 1 << 64

assert HEADER.size == 64 and REGION.size == 24 and TABLE.size == 48


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
class ReadTable:
    """Rows of one table (shard) an embedding server registered for RDMA READ (a v2 table entry)."""

    table_id: int
    model_version: int
    first_row: int
    rows: int
    addr: int
    rkey: int
    row_bytes: int
    dim: int
    dtype: int = DTYPE_F32

    def holds(self, ids_min: int, ids_max: int) -> bool:
        """Do rows ``[ids_min, ids_max]`` all lie inside this entry?"""
        return self.first_row <= ids_min and ids_max < self.first_row + self.rows

    def region(self) -> RemoteRegion:
        """The entry as a remote region (offset 0 = ``first_row``), for ``QueuePair.post_read``."""
        return RemoteRegion(self.addr, self.rows * self.row_bytes, self.rkey)


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
    version: int = 1            # what ``pack`` writes: 2 only to a peer that accepts it
    accepts: int = VERSION      # the highest version this sender reads
    tables: tuple[ReadTable, ...] = field(default_factory=tuple)   # v2 only
    boot_version: int = 0       # v2 only

    def __post_init__(self) -> None:
        _validate(self)

    def pack(self) -> bytes:
        """The wire bytes (HEADER.size + 24 * len(regions) + 48 * len(tables))."""
        head = HEADER.pack(MAGIC, self.version, len(self.regions), self.qpn, self.psn, self.credit_qpn,
                           self.credit_psn, self.gid, self.mtu, self.recv_slots, self.recv_slot_bytes,
                           self.flags, self.accepts, len(self.tables), self.boot_version)
        return (head + b"".join(REGION.pack(r.addr, r.length, r.rkey) for r in self.regions)
                + b"".join(TABLE.pack(t.table_id, t.model_version, t.first_row, t.rows, t.addr, t.rkey,
                                      t.row_bytes, t.dim, t.dtype) for t in self.tables))

    @property
    def peer_reads(self) -> int:
        """The highest version the sender reads (a v1 peer writes 0 there, meaning 1)."""
        return max(1, self.accepts)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ConnectionBlob:
        """Parse and validate; BlobError names the first field that is wrong."""
        data = bytes(data)
        if len(data) < HEADER.size:
            raise BlobError(f"connection blob: {len(data)} bytes, shorter than its {HEADER.size}-byte header")
        (magic, version, nregions, qpn, psn, cqpn, cpsn, gid, mtu, slots, slot_bytes, flags, accepts, ntables,
         boot) = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BlobError(f"connection blob: bad magic {magic!r} (expected {MAGIC!r})")
        if version not in VERSIONS:
            raise BlobError(f"connection blob: version {version} not supported (this side speaks "
                            f"{', '.join(map(str, VERSIONS))})")
        if nregions > MAX_REGIONS:
            raise BlobError(f"connection blob: regions = {nregions} exceeds the cap of {MAX_REGIONS}")
        if version == 1:
            ntables = boot = 0   # a v1 sender may leave anything in bytes 58..63; they mean nothing in v1
        if ntables > MAX_TABLES:
            raise BlobError(f"connection blob: tables = {ntables} exceeds the cap of {MAX_TABLES}")
        want = HEADER.size + nregions * REGION.size + ntables * TABLE.size
        if len(data) != want:
            raise BlobError(f"connection blob: {len(data)} bytes, but {nregions} regions and {ntables} tables "
                            f"make {want}")
        regions = tuple(RemoteRegion(*REGION.unpack_from(data, HEADER.size + i * REGION.size))
                        for i in range(nregions))
        at = HEADER.size + nregions * REGION.size
        tables = tuple(ReadTable(*TABLE.unpack_from(data, at + j * TABLE.size)) for j in range(ntables))
        return cls(qpn, psn, cqpn, cpsn, gid, mtu, slots, slot_bytes, flags, regions, version, accepts, tables,
                   boot)

    @classmethod
    def unpack_padded(cls, data: bytes | bytearray | memoryview) -> ConnectionBlob:
        """Like ``unpack``, for a blob followed by NUL padding (as it arrives inside a HELLO)."""
        data = bytes(data)
        if len(data) < HEADER.size:
            raise BlobError(f"connection blob: {len(data)} bytes, shorter than its {HEADER.size}-byte header")
        version, nregions = struct.unpack_from("!HH", data, 4)
        ntables = struct.unpack_from("!H", data, 58)[0] if version >= 2 else 0
        want = (HEADER.size + min(nregions, MAX_REGIONS + 1) * REGION.size
                + min(ntables, MAX_TABLES + 1) * TABLE.size)
        if len(data) < want or data[want:].strip(b"\0"):
            raise BlobError(f"connection blob: {len(data)} bytes do not hold {nregions} regions and {ntables} "
                            f"tables followed only by padding")
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
    if b.version not in VERSIONS:
        raise BlobError(f"connection blob: version {b.version} is not one of {VERSIONS}")
    if not 0 <= b.accepts < 256 or not 0 <= b.boot_version < 1 << 32:
        raise BlobError(f"connection blob: accepts = {b.accepts} / boot_version = {b.boot_version} out of range")
    if b.version == 1 and (b.tables or b.boot_version):
        raise BlobError("connection blob: table entries need version 2 (the peer only reads version 1)")
    if len(b.tables) > MAX_TABLES:
        raise BlobError(f"connection blob: {len(b.tables)} tables exceed the cap of {MAX_TABLES}")
    for j, t in enumerate(b.tables):
        if t.dtype != DTYPE_F32 or t.dim <= 0 or t.row_bytes < 4 * t.dim or t.rows <= 0:
            raise BlobError(f"connection blob: table[{j}] (table {t.table_id}) has dtype {t.dtype}, dim {t.dim}, "
                            f"row_bytes {t.row_bytes}, rows {t.rows}: not rows of float32")
        if not 0 <= t.addr < _U64 or t.addr + t.rows * t.row_bytes > _U64 or not 0 <= t.rkey < 1 << 32:
            raise BlobError(f"connection blob: table[{j}] (table {t.table_id}) addr=0x{t.addr:x} is not a valid range")
        if not 0 <= t.first_row < _U64 or not 0 <= t.table_id < 1 << 32 or not 0 <= t.model_version < 1 << 32:
            raise BlobError(f"connection blob: table[{j}] first_row / table_id / model_version out of range")


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
