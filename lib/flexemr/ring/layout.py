"""Shared-memory layout of a flexemr SPSC message ring (data path).

One POSIX shared-memory segment per ring: a 4096-byte header page followed by
the data area.  All integers are little-endian (the host order on x86-64, which
the counter stores rely on; ``read_header`` refuses a big-endian host)::

    segment offset  size  field            written by  meaning
    --------------  ----  ---------------  ----------  ------------------------------------
         0            8   magic            creator     b"FXRING\\x00\\x01" (MAGIC)
         8            4   version          creator     VERSION; attach refuses any other
        12            4   header_bytes     creator     4096: where the data area starts
        16            8   capacity         creator     data-area bytes, multiple of 64
        24            8   max_message      creator     largest payload = capacity/2 - 8
        32            4   flags            creator     bit 0: the ring owns its data doorbell
        36           28   (zero)
        64           64   data_doorbell    creator     semaphore name, ASCII, NUL-padded
       128           64   space_doorbell   creator     semaphore name, ASCII, NUL-padded
       192           64   (zero)
      ---- producer cache line (only the producer stores here) ----
       256            8   head             producer    bytes published, monotonic
       264            8   msgs_written     producer    messages published
       272            8   bytes_written    producer    payload bytes published
       280            8   space_wait_seq   producer    bumped before sleeping on "space"
       288           32   (zero)
      ---- consumer cache line (only the consumer stores here) ----
       320            8   tail             consumer    bytes released, monotonic
       328            8   msgs_read        consumer    messages released
       336            8   bytes_read       consumer    payload bytes released
       344            8   space_woken_seq  consumer    last space_wait_seq it rang for
       352            8   (resume offset)  consumer    shm_stream.RESUME_OFFSET (migration)
       360           24   (zero)
      ---- lender cache line (the consumer, when it lends messages out; lend.py) ----
       384            8   lent_seq         consumer    lends made, monotonic
       392            8   lent_end         consumer    stream position just past the newest lend
       400            8   lent_bytes       consumer    payload bytes lent, monotonic
       408           40   (zero)
      ---- borrower cache line (only the borrowing process stores here) ----
       448            8   returned_seq     borrower    lends returned, a prefix in lend order
       456            8   returned_end     borrower    position just past the newest returned lend
       464            8   return_woken_seq borrower    last space_wait_seq it rang for
       472         3624   (zero)
      4096     capacity   data area        producer    message slots (below)

``head`` and ``tail`` are u64 byte counters that only grow; a counter's
position in the data area is ``counter % capacity`` and ``head - tail`` is the
number of bytes in use (they would wrap after 2**64 bytes: centuries).

Message slot (starts 64-byte aligned, never split across the end)::

    slot offset  size  field
         0         4   length   payload bytes (<= max_message)
         4         4   kind     caller's message kind, 0 .. 0xFFFFFFFE
         8    length   payload  8-byte aligned: np.frombuffer of float32/int64 works
                       padding  to the next multiple of 64

    slot bytes = align64(8 + length)

When the next slot does not fit between the write position and the end of the
data area, the producer writes a header whose kind is WRAP (0xFFFFFFFF) at the
write position, leaves the rest of the area unused and puts the slot at offset
0; ``head`` advances over both.  A slot of at most capacity/2 bytes always fits
in an empty ring, hence ``max_message``.  The 8-byte slot header is written as
one aligned u64 store, so a reader never sees half of it.

Publication order (why a reader never sees a torn message):

    producer: write payload -> write slot header (one u64 store) -> stats -> head (one u64 store)
    consumer: load head -> load slot header -> read payload -> ... -> release: stats -> tail

x86-64 is TSO: stores become visible in program order and loads are not
reordered with older loads, and CPython performs the stores of these
statements in program order, so a consumer that sees the new ``head`` sees the
header and payload behind it; a producer that sees the new ``tail`` knows the
consumer is done with the bytes before it.  The counters are written through a
numpy uint64 view (``ctr[HEAD] = value`` is a single aligned 8-byte store), never
byte by byte.  The one store->load pattern (sleep/wake on "space", see ring.py)
needs a full fence, which TSO does not give for free.

Lending (zero copy for a third process, see lend.py): the consumer may lend a
byte range of a message it holds to a *borrower* (another process that maps
the ring) and release the message at once.  The producer then must not reuse
the range until the borrower returns it, so its free space ends at::

    reclaim = tail                      if returned_end >= lent_end (nothing out)
              min(tail, returned_end)   otherwise

    lender:   lent_end, lent_seq (stores)  -> ... -> release: tail
    producer: load tail -> load lent_end -> load returned_end
    borrower: read the range -> returned_end, returned_seq -> FENCE -> space_wait_seq?

A producer that sees a ``tail`` past a lend also sees that lend's
``lent_end`` (stored earlier, TSO).  ``returned_end`` is the end of a lend
whose predecessors are all returned, so it never lies past an unreturned lend:
the bound is conservative (bytes between two lends wait for the later one)
and never unsafe.  All zero (no lend ever made): reclaim == tail, layout v1
unchanged.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

from flexemr.errors import FlexemrError

MAGIC = b"FXRING\x00\x01"
VERSION = 1
HEADER_BYTES = 4096
SLOT_ALIGN = 64
MSG_HEADER_BYTES = 8
MIN_CAPACITY = 4 * SLOT_ALIGN
# max_message must fit the u32 length field
MAX_CAPACITY = 1 << 33
WRAP = 0xFFFF_FFFF
MAX_KIND = WRAP - 1
NAME_FIELD_BYTES = 64

FLAG_OWNS_DATA_DOORBELL = 1

# static fields, written once by the creator before the magic
STATIC = struct.Struct("<8sIIQQI")  # magic, version, header_bytes, capacity, max_message, flags
OFF_DATA_DOORBELL = 64
OFF_SPACE_DOORBELL = 128

# indexes into the header page viewed as uint64 words (offset // 8)
HEAD = 256 // 8
MSGS_WRITTEN = HEAD + 1
BYTES_WRITTEN = HEAD + 2
SPACE_WAIT_SEQ = HEAD + 3
TAIL = 320 // 8
MSGS_READ = TAIL + 1
BYTES_READ = TAIL + 2
SPACE_WOKEN_SEQ = TAIL + 3
LENT_SEQ = 384 // 8
LENT_END = LENT_SEQ + 1
LENT_BYTES = LENT_SEQ + 2
RETURNED_SEQ = 448 // 8
RETURNED_END = RETURNED_SEQ + 1
RETURN_WOKEN_SEQ = RETURNED_SEQ + 2


class RingError(FlexemrError):
    """A ring segment is not what it should be (magic, version, size) or is corrupt."""


def slot_bytes(length: int) -> int:
    """Bytes one message of ``length`` payload bytes occupies (header + payload, 64-aligned)."""
    return (MSG_HEADER_BYTES + length + SLOT_ALIGN - 1) & ~(SLOT_ALIGN - 1)


def max_message_for(capacity: int) -> int:
    """Largest payload a ring of ``capacity`` accepts (its slot is at most capacity/2)."""
    return capacity // 2 - MSG_HEADER_BYTES


def check_capacity(capacity: int) -> None:
    """Raise ValueError unless ``capacity`` is a usable data-area size."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ValueError(f"ring capacity must be an int, got {capacity!r}")
    if capacity % SLOT_ALIGN or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(
            f"ring capacity {capacity} must be a multiple of {SLOT_ALIGN} "
            f"between {MIN_CAPACITY} and {MAX_CAPACITY} bytes"
        )


def _name_field(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= NAME_FIELD_BYTES:
        raise ValueError(f"doorbell name {name!r} is longer than {NAME_FIELD_BYTES - 1} bytes")
    return raw.ljust(NAME_FIELD_BYTES, b"\x00")


def write_header(
    buf: memoryview, capacity: int, data_doorbell: str, space_doorbell: str, flags: int
) -> None:
    """Initialise a zero-filled header page; the magic is stored last so a
    half-written header is never taken for a valid one."""
    buf[OFF_DATA_DOORBELL:OFF_DATA_DOORBELL + NAME_FIELD_BYTES] = _name_field(data_doorbell)
    buf[OFF_SPACE_DOORBELL:OFF_SPACE_DOORBELL + NAME_FIELD_BYTES] = _name_field(space_doorbell)
    STATIC.pack_into(buf, 0, b"\x00" * 8, VERSION, HEADER_BYTES, capacity, max_message_for(capacity), flags)
    buf[0:8] = MAGIC


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The static fields of a ring header, as read by ``read_header``."""

    capacity: int
    max_message: int
    flags: int
    data_doorbell: str
    space_doorbell: str


def _read_name(buf: memoryview, off: int) -> str:
    return bytes(buf[off:off + NAME_FIELD_BYTES]).rstrip(b"\x00").decode("ascii", "replace")


def read_header(buf: memoryview, segment_bytes: int, name: str) -> HeaderInfo:
    """Validate the header page of segment ``name`` and return its static fields.

    Raises RingError naming the ring and the field that is wrong.
    """
    if sys.byteorder != "little":
        raise RingError("flexemr rings store counters little-endian; this host is big-endian")
    if segment_bytes < HEADER_BYTES:
        raise RingError(f"ring {name!r}: segment is {segment_bytes} bytes, smaller than the {HEADER_BYTES}-byte header")
    magic, version, header_bytes, capacity, max_message, flags = STATIC.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RingError(f"ring {name!r}: bad magic {magic!r} (expected {MAGIC!r}); not a flexemr ring")
    if version != VERSION:
        raise RingError(f"ring {name!r}: layout version {version}, this flexemr reads version {VERSION}")
    if header_bytes != HEADER_BYTES:
        raise RingError(f"ring {name!r}: header_bytes {header_bytes}, expected {HEADER_BYTES}")
    try:
        check_capacity(capacity)
    except ValueError as exc:
        raise RingError(f"ring {name!r}: {exc}") from None
    if segment_bytes < HEADER_BYTES + capacity:
        raise RingError(
            f"ring {name!r}: segment is {segment_bytes} bytes, header says {HEADER_BYTES} + {capacity}"
        )
    if max_message != max_message_for(capacity):
        raise RingError(f"ring {name!r}: max_message {max_message} does not match capacity {capacity}")
    return HeaderInfo(
        capacity, max_message, flags, _read_name(buf, OFF_DATA_DOORBELL), _read_name(buf, OFF_SPACE_DOORBELL)
    )
