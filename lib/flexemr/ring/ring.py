"""Single-producer single-consumer variable-size message ring over POSIX shared memory.

The rings carry whole batches between the ranker's inference process and its
engine workers (submission: inference -> engine, completion: engine ->
inference).  The memory layout, slot format and publication order are drawn in
:mod:`flexemr.ring.layout`; this module is the behaviour::

    producer                            shared memory                     consumer
    --------------------------------    ------------------------------    ------------------------------
    slot = reserve(n, timeout)   ─────▶ [hdr|payload ........|pad]
    slot[:] = batch | sock.recv_into                 ▲ written in place
    commit(n' <= n, kind)        ─────▶ slot header; head += slot
                                        data doorbell.ring()  ─────────▶ msg = read(timeout)
                                                                         arr = np.frombuffer(msg.data)
    (sleeps while full)          ◀───── space doorbell.ring() ◀───────── msg.release(): tail += slot
                                        only if the producer waits

Messages are contiguous, so ``Message.data`` is a zero-copy memoryview that
``np.frombuffer`` can wrap, and a producer can ``recv_into`` a socket straight
into its reserved slot.  Reserve/commit/peek/release are O(1) Python work and
make no system call except the doorbell ring.

Doorbells are POSIX semaphores: ringing with nobody asleep is a userspace
atomic (~0.1 µs); waking a sleeping process costs tens of µs (measured 15-25 µs
one way on a 2-core dev box, 30-50 µs ping-pong).  The producer rings the data
doorbell once per message (a message is a whole batch).
Several rings may share one data doorbell: the inference process waits on it
once for N completion rings and then scans them (:func:`wait_any`).  Each ring
stores its doorbells' names in its header, so ``Ring.attach(name)`` needs only
the ring's name.

Sleeping on "space" is the one place where a store must be ordered before a
later load (Dekker's pattern, which x86 TSO does not order by itself)::

    producer: space_wait_seq += 1 ; FENCE ; load tail ; still full -> sleep on space
    consumer: tail = new          ; FENCE ; load space_wait_seq ; changed -> ring space

With both fences at least one side sees the other's store, so a sleeping
producer is always rung.  The producer also re-checks every ``_SPACE_SLICE_S``
in case the consumer died between its two steps.  Idle rings never spin: every
wait is a semaphore wait with a timeout chosen by the caller.

Not thread-safe: each end is used by one thread.  Lifecycle: the supervisor
``create``s and ``unlink``s; the processes it forks ``attach`` by name (or use
the inherited object) and ``close``.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import posix_ipc

from flexemr import naming
from flexemr.copying import copy_bytes
from flexemr.ring.layout import (
    BYTES_READ,
    BYTES_WRITTEN,
    FLAG_OWNS_DATA_DOORBELL,
    HEAD,
    HEADER_BYTES,
    LENT_BYTES,
    LENT_END,
    LENT_SEQ,
    MAX_KIND,
    MSG_HEADER_BYTES,
    MSGS_READ,
    MSGS_WRITTEN,
    RETURNED_END,
    RETURNED_SEQ,
    SLOT_ALIGN,
    SPACE_WAIT_SEQ,
    SPACE_WOKEN_SEQ,
    TAIL,
    WRAP,
    RingError,
    check_capacity,
    read_header,
    write_header,
)

# Rings and doorbells carry requests and results between the daemon's own
# processes (one uid); nobody else, not even emrctl's group, needs them.  The
# mode is set with fchmod/chmod after creation, so the umask never changes it.
RING_MODE = 0o600

_LEN_MASK = 0xFFFF_FFFF
_SLOT_MASK = ~(SLOT_ALIGN - 1)
# A blocked producer re-checks this often even without a ring (see docstring).
_SPACE_SLICE_S = 0.1


def _map_flags(populate: bool) -> int:
    return mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)


def _make_fence() -> Callable[[], None]:
    """A full memory barrier, as a function.

    Acquiring an uncontended lock executes a LOCK-prefixed atomic (glibc's
    sem_trywait/sem_post under CPython's lock), which is a full fence on x86,
    so the store before the call is visible before the load after it.  One
    lock per ring end: never contended, never held across a fork.
    """
    lock = threading.Lock()
    acquire, release = lock.acquire, lock.release

    def fence() -> None:
        acquire()
        release()

    return fence


class Doorbell:
    """A named POSIX semaphore used as a wake-up signal between processes.

    ``ring()`` posts once; ``wait(timeout)`` consumes one post or times out.
    Posts are counted, so a ring that happens before the wait is not lost; a
    waiter must re-check its rings after waking because a post can be stale.
    """

    __slots__ = ("name", "_sem")

    def __init__(self, name: str, sem: posix_ipc.Semaphore) -> None:
        self.name = name
        self._sem = sem

    @classmethod
    def create(cls, name: str, mode: int = RING_MODE) -> Doorbell:
        """Create a new doorbell (fails if ``name`` exists: stale objects are the supervisor's to clean).

        ``mode`` is applied exactly (chmod of the semaphore's file), whatever the umask.
        """
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=0)
        except posix_ipc.ExistentialError:
            raise FileExistsError(
                f"doorbell {name!r} already exists (stale? see naming.unlink_instance_segments)"
            ) from None
        try:
            os.chmod(os.path.join(naming.SHM_DIR, naming.SEM_FILE_PREFIX + name.lstrip("/")), mode)
        except BaseException:
            sem.close()
            posix_ipc.unlink_semaphore(name)
            raise
        return cls(name, sem)

    @classmethod
    def attach(cls, name: str) -> Doorbell:
        """Open an existing doorbell by name."""
        try:
            return cls(name, posix_ipc.Semaphore(name))
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"doorbell {name!r} does not exist") from None

    def ring(self) -> None:
        """Wake one waiter (or the next one to wait)."""
        self._sem.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until rung or ``timeout`` seconds pass (None: forever; 0: just poll).

        Returns True when a ring was consumed, False on timeout or when a signal
        interrupted the wait (so the caller's loop can look at its stop flag).
        """
        try:
            self._sem.acquire(None if timeout is None else max(0.0, timeout))
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False
        return True

    def drain(self) -> int:
        """Consume every pending ring without sleeping; returns how many there were."""
        n = 0
        while True:
            try:
                self._sem.acquire(0)
            except posix_ipc.BusyError:
                return n
            n += 1

    @property
    def pending(self) -> int:
        """Rings posted and not yet consumed."""
        return int(self._sem.value)

    def close(self) -> None:
        """Drop this process's handle (the semaphore itself stays)."""
        try:
            self._sem.close()
        except posix_ipc.ExistentialError:
            pass

    def unlink(self) -> None:
        """Remove the name (creator only); a missing name is not an error."""
        try:
            posix_ipc.unlink_semaphore(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __repr__(self) -> str:
        return f"Doorbell({self.name!r})"


class Message:
    """One message handed out by :meth:`Ring.peek`: ``kind``, ``data`` and ``release()``.

    ``data`` is a memoryview of exactly the payload, inside the ring.  It (and
    any numpy array over it) must not be used after ``release()``: the producer
    may overwrite the bytes.  Messages must be released in the order they were
    handed out.
    """

    __slots__ = ("kind", "data", "nbytes", "_ring", "_start", "_end", "_released")

    def __init__(self, ring: Ring, kind: int, data: memoryview, start: int, end: int) -> None:
        self.kind = kind
        self.data = data
        self.nbytes = data.nbytes
        self._ring = ring
        self._start = start
        self._end = end
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the message's space back to the producer."""
        self._ring._release(self)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Message(kind={self.kind}, nbytes={self.nbytes}, {state})"


@dataclass(frozen=True, slots=True)
class RingStats:
    """A snapshot of a ring's counters (byte counts are payload bytes)."""

    name: str
    capacity: int
    head: int
    tail: int
    msgs_written: int
    msgs_read: int
    bytes_written: int
    bytes_read: int

    @property
    def depth(self) -> int:
        """Messages published and not yet released."""
        return max(0, self.msgs_written - self.msgs_read)

    @property
    def used_bytes(self) -> int:
        """Ring bytes in use (slots, padding and wrap gaps)."""
        return max(0, self.head - self.tail)


class Ring:
    """An SPSC message ring in a POSIX shared-memory segment (see module docstring).

    Build one with :meth:`create` (supervisor) or :meth:`attach` (children).
    Producer side: ``try_reserve``/``reserve`` + ``commit``, ``acquire_write``,
    ``write``.  Consumer side: ``peek``/``read`` + ``Message.release``,
    ``acquire_read``.
    """

    def __init__(
        self, name: str, mm: mmap.mmap, data_doorbell: Doorbell, space_doorbell: Doorbell, owns_data_doorbell: bool,
        ino: int = 0,
    ) -> None:
        self.name = name
        # The segment's inode: a name can be unlinked and made again, the inode
        # tells a borrower (lend.py) whether the ring it mapped is still the one.
        self.ino = ino
        self._mm: mmap.mmap | None = mm
        self._buf = memoryview(mm)
        info = read_header(self._buf, len(mm), name)
        self.capacity = info.capacity
        self.max_message = info.max_message
        self.data_doorbell = data_doorbell
        self.space_doorbell = space_doorbell
        self._owns_data_doorbell = owns_data_doorbell
        # Counters and slot headers go through uint64 views: one aligned
        # 8-byte store per update, never a byte-wise pack.
        self._ctr = np.frombuffer(self._buf[:HEADER_BYTES], dtype=np.uint64)
        self._data = self._buf[HEADER_BYTES:HEADER_BYTES + self.capacity]
        self._words = np.frombuffer(self._data, dtype=np.uint64)
        ctr = self._ctr
        # Producer-side cache of its own counters (it is their only writer).
        self._head = int(ctr[HEAD])
        self._msgs_w = int(ctr[MSGS_WRITTEN])
        self._bytes_w = int(ctr[BYTES_WRITTEN])
        self._wait_seq = int(ctr[SPACE_WAIT_SEQ])
        self._res_view: memoryview | None = None
        self._res_start = 0  # position of the reserved slot in the data area
        self._res_skip = 0  # wrap gap before it (0 when no wrap)
        self._res_len = 0
        # Consumer side: _tail = released, _next = next message to hand out.
        self._tail = int(ctr[TAIL])
        self._next = self._tail
        self._msgs_r = int(ctr[MSGS_READ])
        self._bytes_r = int(ctr[BYTES_READ])
        self._woken_seq = int(ctr[SPACE_WOKEN_SEQ])
        # Consumer side, lending (layout docstring): its own counters, cached.
        self._lent_seq = int(ctr[LENT_SEQ])
        self._lent_bytes = int(ctr[LENT_BYTES])
        self._fence = _make_fence()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, name: str, capacity: int, doorbell: Doorbell | None = None, populate: bool = True,
               mode: int = RING_MODE) -> Ring:
        """Create ring ``name`` with a data area of ``capacity`` bytes (supervisor only).

        ``doorbell``: a shared data doorbell (several rings, one waiter); the ring
        then does not own it and ``unlink()`` leaves it alone.  Without it the
        ring creates its own.  The space doorbell is always the ring's own.
        ``populate`` pre-faults the pages (MAP_POPULATE) so the first batches
        do not pay for page faults.  ``mode`` (the segment's and its own
        doorbells') is set with fchmod, not left to the umask.  On failure
        nothing is left behind.
        """
        check_capacity(capacity)
        data_name, space_name = naming.ring_doorbell_names(name)
        size = HEADER_BYTES + capacity
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise FileExistsError(
                f"ring {name!r} already exists (stale? see naming.unlink_instance_segments)"
            ) from None
        mm: mmap.mmap | None = None
        opened: list[tuple[Doorbell, bool]] = []  # (doorbell, created by us)
        try:
            try:
                os.fchmod(shm.fd, mode)
                ino = os.fstat(shm.fd).st_ino
                mm = mmap.mmap(shm.fd, size, flags=_map_flags(populate))
            finally:
                shm.close_fd()
            space = Doorbell.create(space_name, mode)
            opened.append((space, True))
            if doorbell is None:
                data = Doorbell.create(data_name, mode)
            else:
                # our own handle, so that ring.close() leaves the caller's open
                data = Doorbell.attach(doorbell.name)
            opened.append((data, doorbell is None))
            flags = FLAG_OWNS_DATA_DOORBELL if doorbell is None else 0
            with memoryview(mm) as buf:
                write_header(buf, capacity, data.name, space.name, flags)
            return cls(name, mm, data, space, doorbell is None, ino)
        except BaseException:
            shm.unlink()
            if mm is not None:
                mm.close()
            for db, ours in opened:
                if ours:
                    db.unlink()
                db.close()
            raise

    @classmethod
    def attach(cls, name: str, populate: bool = True) -> Ring:
        """Map an existing ring and open the doorbells named in its header.

        Raises FileNotFoundError if there is no such segment and RingError if
        the segment is not a ring of this layout version.  Readers of stats
        only (emrctl) pass ``populate=False`` to skip pre-faulting the data.
        """
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"ring {name!r} does not exist") from None
        try:
            if shm.size < HEADER_BYTES:
                raise RingError(f"ring {name!r}: segment is {shm.size} bytes, smaller than a ring header")
            ino = os.fstat(shm.fd).st_ino
            mm = mmap.mmap(shm.fd, shm.size, flags=_map_flags(populate))
        finally:
            shm.close_fd()
        opened: list[Doorbell] = []
        try:
            with memoryview(mm) as buf:
                info = read_header(buf, len(mm), name)
            opened.append(Doorbell.attach(info.data_doorbell))
            opened.append(Doorbell.attach(info.space_doorbell))
        except BaseException:
            mm.close()
            for db in opened:
                db.close()
            raise
        return cls(name, mm, opened[0], opened[1], bool(info.flags & FLAG_OWNS_DATA_DOORBELL), ino)

    def close(self) -> None:
        """Unmap and drop the doorbell handles; idempotent.

        If the caller still holds numpy arrays over message data, the mapping
        stays alive until they are gone (mmap refuses to close under exports).
        """
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        self._res_view = None
        del self._ctr, self._words
        self._data.release()
        self._buf.release()
        try:
            mm.close()
        except BufferError:
            pass  # unmapped when the last exported view dies
        self.data_doorbell.close()
        self.space_doorbell.close()

    def unlink(self) -> None:
        """Remove the ring's names: segment, space doorbell, and data doorbell if owned.

        Only the creator (supervisor) calls this.  Mapped views stay valid.
        """
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
        self.space_doorbell.unlink()
        if self._owns_data_doorbell:
            self.data_doorbell.unlink()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, capacity={self.capacity})"

    # ------------------------------------------------------------------ producer

    def try_reserve(self, nbytes: int) -> memoryview | None:
        """Reserve a contiguous slot for an ``nbytes`` payload; None if the ring is full.

        The returned memoryview is writable ring memory (copy into it, or
        ``sock.recv_into`` it); nothing is visible to the consumer until
        :meth:`commit`.  One reservation at a time.
        """
        if self._res_view is not None:
            raise RuntimeError(f"ring {self.name}: a reservation is pending; commit() or cancel() it first")
        if nbytes > self.max_message or nbytes < 0:
            raise ValueError(
                f"ring {self.name}: message of {nbytes} bytes; this ring carries 0..{self.max_message} "
                f"bytes (capacity {self.capacity} / 2 minus the {MSG_HEADER_BYTES}-byte header)"
            )
        cap = self.capacity
        need = (MSG_HEADER_BYTES + nbytes + SLOT_ALIGN - 1) & _SLOT_MASK
        head = self._head
        pos = head % cap
        skip = cap - pos if need > cap - pos else 0
        if head + skip + need - self.reclaim_tail() > cap:
            return None
        start = 0 if skip else pos
        self._res_start = start
        self._res_skip = skip
        self._res_len = nbytes
        view = self._data[start + MSG_HEADER_BYTES:start + MSG_HEADER_BYTES + nbytes]
        self._res_view = view
        return view

    def reserve(self, nbytes: int, timeout: float | None = None) -> memoryview | None:
        """Like :meth:`try_reserve` but sleeps on the space doorbell while full.

        ``timeout`` in seconds (None: until there is room); None on timeout.
        """
        view = self.try_reserve(nbytes)
        if view is not None or timeout == 0:
            return view
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Announce the wait, fence, re-check: the consumer's release()
            # does the mirror image, so one of us sees the other (docstring).
            self._wait_seq += 1
            self._ctr[SPACE_WAIT_SEQ] = self._wait_seq
            self._fence()
            view = self.try_reserve(nbytes)
            if view is not None:
                return view
            if deadline is None:
                slice_s = _SPACE_SLICE_S
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                slice_s = min(remaining, _SPACE_SLICE_S)
            self.space_doorbell.wait(slice_s)
            # Re-check before announcing again, so a consumer that rang us
            # is not asked to ring once more for a wait that never happens.
            view = self.try_reserve(nbytes)
            if view is not None:
                return view

    def commit(self, nbytes: int | None = None, kind: int = 0, notify: bool = True) -> None:
        """Publish the reserved slot, possibly shrunk to ``nbytes`` (<= reserved).

        ``kind`` (0..0xFFFFFFFE) travels in the slot header.  ``notify=False``
        skips the doorbell, for a producer that publishes several messages and
        rings once (call ``data_doorbell.ring()`` itself).
        """
        view = self._res_view
        if view is None:
            raise RuntimeError(f"ring {self.name}: commit() without a reservation")
        n = self._res_len if nbytes is None else nbytes
        if not 0 <= n <= self._res_len:
            raise ValueError(f"ring {self.name}: commit of {n} bytes, but {self._res_len} were reserved")
        if not 0 <= kind <= MAX_KIND:
            raise ValueError(f"ring {self.name}: message kind {kind} outside 0..{MAX_KIND}")
        head = self._head
        start = self._res_start
        words = self._words
        # Publication order: payload (already written) -> wrap marker and slot
        # header (one u64 store each) -> stats -> head.
        if self._res_skip:
            words[(head % self.capacity) >> 3] = WRAP << 32
        words[start >> 3] = n | (kind << 32)
        self._msgs_w += 1
        self._bytes_w += n
        ctr = self._ctr
        ctr[MSGS_WRITTEN] = self._msgs_w
        ctr[BYTES_WRITTEN] = self._bytes_w
        head += self._res_skip + ((MSG_HEADER_BYTES + n + SLOT_ALIGN - 1) & _SLOT_MASK)
        ctr[HEAD] = head
        self._head = head
        self._res_view = None
        self._release_view(view)
        if notify:
            self.data_doorbell.ring()

    def cancel(self) -> None:
        """Drop the pending reservation without publishing anything."""
        view = self._res_view
        self._res_view = None
        if view is not None:
            self._release_view(view)

    @contextmanager
    def acquire_write(self, nbytes: int, timeout: float | None = None, kind: int = 0) -> Iterator[memoryview | None]:
        """``with ring.acquire_write(n, timeout) as slot:`` fill ``slot``; committed on exit.

        Yields None on timeout.  An exception inside the block cancels the
        reservation.  Calling ``commit(smaller)`` inside the block is allowed.
        """
        view = self.reserve(nbytes, timeout)
        if view is None:
            yield None
            return
        try:
            yield view
        except BaseException:
            if self._res_view is view:
                self.cancel()
            raise
        if self._res_view is view:
            self.commit(kind=kind)

    def write(self, *buffers: object, kind: int = 0, timeout: float | None = None) -> bool:
        """Gather ``buffers`` (bytes-like, C-contiguous) into one message.

        Returns False if there was no room within ``timeout`` (None: wait).
        """
        views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
        total = sum(v.nbytes for v in views)
        slot = self.reserve(total, timeout)
        if slot is None:
            return False
        off = 0
        for v in views:
            end = off + v.nbytes
            copy_bytes(slot[off:end], v)
            off = end
        self.commit(kind=kind)
        return True

    def reclaim_tail(self) -> int:
        """Where the producer's free space starts: ``tail``, held back by lends not returned yet.

        Loads in the order the layout docstring gives (tail, lent_end,
        returned_end); all three are zero-cost when nothing was ever lent.
        """
        ctr = self._ctr
        tail = int(ctr[TAIL])
        lent = int(ctr[LENT_END])
        returned = int(ctr[RETURNED_END])
        if returned < lent and returned < tail:
            return returned
        return tail

    # ------------------------------------------------------------------ consumer

    def has_message(self) -> bool:
        """True if :meth:`peek` would return a message now."""
        return int(self._ctr[HEAD]) != self._next

    def peek(self) -> Message | None:
        """The next message not yet handed out, or None; never blocks.

        The message keeps its space until ``release()``; the consumer may hold
        several and must release them in order.
        """
        nxt = self._next
        head = int(self._ctr[HEAD])  # load head first, then the slot behind it
        if nxt == head:
            return None
        cap = self.capacity
        start = nxt
        pos = nxt % cap
        word = int(self._words[pos >> 3])
        if word >> 32 == WRAP:
            nxt += cap - pos
            pos = 0
            word = int(self._words[0])
        length = word & _LEN_MASK
        end = nxt + ((MSG_HEADER_BYTES + length + SLOT_ALIGN - 1) & _SLOT_MASK)
        if length > self.max_message or end > head or word >> 32 == WRAP:
            raise RingError(
                f"ring {self.name}: corrupt slot header {word:#018x} at position {pos} "
                f"(next={nxt}, head={head})"
            )
        self._next = end
        data = self._data[pos + MSG_HEADER_BYTES:pos + MSG_HEADER_BYTES + length]
        return Message(self, word >> 32, data, start, end)

    def read(self, timeout: float | None = None) -> Message | None:
        """Next message, sleeping on the data doorbell while empty.

        ``timeout`` in seconds (None: forever, 0: poll).  Returns None on timeout
        and may return None early if a signal interrupts the wait.  With a
        doorbell shared by several rings use :func:`wait_any` instead: this
        call would consume rings meant for the other rings.
        """
        msg = self.peek()
        if msg is not None or timeout == 0:
            return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            woke = self.data_doorbell.wait(remaining)
            msg = self.peek()
            if msg is not None or not woke:
                return msg

    @contextmanager
    def acquire_read(self, timeout: float | None = None) -> Iterator[Message | None]:
        """``with ring.acquire_read(t) as msg:`` msg is None on timeout; released on exit."""
        msg = self.read(timeout)
        try:
            yield msg
        finally:
            if msg is not None and not msg._released:
                msg.release()

    def lend(self, msg: Message, offset: int, nbytes: int) -> tuple[int, int]:
        """Lend ``nbytes`` of held ``msg``'s payload from ``offset`` to a borrower; returns (seq, position).

        After this the message may be released as usual: the producer will
        not reuse the range until a :class:`flexemr.ring.lend.Borrower`
        returns lend ``seq``.  ``position`` is the range's stream position
        (the borrower finds the bytes at ``position % capacity``).  Lends are
        numbered in the order they are made and must not overlap.
        """
        if msg._ring is not self or msg._released:
            raise RuntimeError(f"ring {self.name}: can only lend from a message of this ring that is still held")
        if offset < 0 or nbytes <= 0 or offset + nbytes > msg.nbytes:
            raise ValueError(f"ring {self.name}: lend of {nbytes} bytes at {offset} outside a {msg.nbytes}-byte message")
        payload = msg._end - ((MSG_HEADER_BYTES + msg.nbytes + SLOT_ALIGN - 1) & _SLOT_MASK) + MSG_HEADER_BYTES
        pos = payload + offset
        seq = self._lent_seq
        self._lent_seq = seq + 1
        self._lent_bytes += nbytes
        ctr = self._ctr
        # lent_end before the release that moves tail past these bytes (layout docstring)
        ctr[LENT_END] = pos + nbytes
        ctr[LENT_SEQ] = self._lent_seq
        ctr[LENT_BYTES] = self._lent_bytes
        return seq, pos

    def lends_outstanding(self) -> int:
        """Lends made and not returned yet (readable from any process)."""
        returned = int(self._ctr[RETURNED_SEQ])
        return max(0, int(self._ctr[LENT_SEQ]) - returned)

    def lent_bytes(self) -> int:
        """Payload bytes ever lent out of this ring (readable from any process)."""
        return int(self._ctr[LENT_BYTES])

    def _release(self, msg: Message) -> None:
        if msg._ring is not self:
            raise RuntimeError(f"ring {self.name}: message belongs to ring {msg._ring.name}")
        if msg._released:
            raise RuntimeError(f"ring {self.name}: message released twice")
        if msg._start != self._tail:
            raise RuntimeError(
                f"ring {self.name}: messages must be released in the order they were read "
                f"(this one starts at byte {msg._start}, the oldest held starts at {self._tail})"
            )
        msg._released = True
        self._release_view(msg.data)
        self._msgs_r += 1
        self._bytes_r += msg.nbytes
        ctr = self._ctr
        ctr[MSGS_READ] = self._msgs_r
        ctr[BYTES_READ] = self._bytes_r
        ctr[TAIL] = msg._end  # after the payload reads: the bytes are the producer's again
        self._tail = msg._end
        # Mirror of reserve(): store tail, fence, then look for a sleeper.
        self._fence()
        seq = int(ctr[SPACE_WAIT_SEQ])
        if seq != self._woken_seq:
            self._woken_seq = seq
            ctr[SPACE_WOKEN_SEQ] = seq
            self.space_doorbell.ring()

    @staticmethod
    def _release_view(view: memoryview) -> None:
        # Best effort: makes later use of the slot's own view fail loudly; if
        # the caller exported it (numpy), the export keeps it alive instead.
        try:
            view.release()
        except BufferError:
            pass

    # ------------------------------------------------------------------ stats

    def depth(self) -> int:
        """Messages published and not yet released (readable from any process)."""
        read = int(self._ctr[MSGS_READ])  # read first: it never passes msgs_written
        return max(0, int(self._ctr[MSGS_WRITTEN]) - read)

    def used_bytes(self) -> int:
        """Bytes of the data area in use, wrap gaps and padding included."""
        tail = int(self._ctr[TAIL])
        return max(0, int(self._ctr[HEAD]) - tail)

    def stats(self) -> RingStats:
        """Snapshot of all counters (consumer side read first, so depth >= 0)."""
        ctr = self._ctr
        msgs_read, bytes_read, tail = int(ctr[MSGS_READ]), int(ctr[BYTES_READ]), int(ctr[TAIL])
        return RingStats(
            name=self.name,
            capacity=self.capacity,
            head=int(ctr[HEAD]),
            tail=tail,
            msgs_written=int(ctr[MSGS_WRITTEN]),
            msgs_read=msgs_read,
            bytes_written=int(ctr[BYTES_WRITTEN]),
            bytes_read=bytes_read,
        )


def wait_any(rings: Sequence[Ring], timeout: float | None = None) -> list[Ring]:
    """Rings that have a message, sleeping on their shared data doorbell while none has.

    All ``rings`` must share one data doorbell (``Ring.create(..., doorbell=db)``).
    Returns [] on timeout or signal.  Stale rings (posts for messages already
    taken by peek) cost one extra wake each, never a missed message: the rings
    are scanned after every wake.
    """
    if not rings:
        raise ValueError("wait_any needs at least one ring")
    bell = rings[0].data_doorbell
    for r in rings:
        if r.data_doorbell.name != bell.name:
            raise ValueError(
                f"wait_any: ring {r.name} rings {r.data_doorbell.name}, not the shared {bell.name}"
            )
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready = [r for r in rings if r.has_message()]
        if ready:
            return ready
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return []
        if not bell.wait(remaining):
            return [r for r in rings if r.has_message()]
