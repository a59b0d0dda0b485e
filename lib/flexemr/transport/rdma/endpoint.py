"""One verbs context, protection domain and completion queue per process.

An ``Endpoint`` is the NIC parallelism unit of one engine (or of one
embedding server): its own verbs context, so its own doorbell pages (UARs) on
the NIC; its own PD, so memory it registers is reachable only through its own
queue pairs; one CQ shared by all its queue pairs, whose completion channel fd
goes into the owner's selector.  It is never shared: not between engines, not
across fork (pyverbs objects do not survive one), which ``check_owner``
enforces.

Completions are polled in batches (``POLL_BATCH``) and the CQ is only armed
when a poll finds nothing, so a busy engine never pays for an event and an
idle one sleeps in select() instead of spinning::

    poll -> empty? -> arm (req_notify) -> poll again (closes the race) -> select(fd)
         -> readable: get_cq_event + ack -> poll

Completions are routed to the queue pair that owns them (``attach``), which
turns each into an event for its channel; events wait in a per-owner backlog
so one channel can wait for its own completions without losing another's.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import defaultdict
from typing import Any, Callable, Protocol

import numpy as np

from flexemr.transport.rdma.blob import RemoteRegion
from flexemr.transport.rdma.device import DeviceChoice, open_device
from flexemr.transport.rdma.errors import QueuePairError, RdmaUnavailable
from flexemr.transport.rdma.loader import load_pyverbs

logger = logging.getLogger(__name__)

POLL_BATCH = 64
DEFAULT_CQ_DEPTH = 4096
_EVENT_FD_LINK = "anon_inode:[infinibandevent]"
_CHANNEL_LOCK = threading.Lock()


class RegistrationError(RdmaUnavailable):
    """The device refused to register a buffer (the caller falls back to copying frames)."""


class CompletionOwner(Protocol):
    """What a queue pair's owner (a channel) does with the completions routed to it."""

    def handle(self, wc: Any) -> object | None: ...

    def replenish(self) -> None: ...


class Region:
    """Memory registered with one endpoint's PD: local keys for posting, remote ones for the peer.

    Holds a reference to the buffer, so the memory cannot be freed while the
    NIC may still access it; ``close`` deregisters.
    """

    def __init__(self, mr: Any, array: np.ndarray, access: int) -> None:
        self._mr = mr
        self.array = array  # uint8 view over the caller's buffer (keeps it alive)
        self.addr = int(array.ctypes.data)
        self.length = int(array.nbytes)
        self.lkey = int(mr.lkey)
        self.rkey = int(mr.rkey)
        self.access = access

    def remote(self) -> RemoteRegion:
        """This region as the peer sees it (for the connection blob)."""
        return RemoteRegion(self.addr, self.length, self.rkey)

    def address(self, offset: int, nbytes: int, what: str) -> int:
        """The virtual address of ``[offset, offset + nbytes)``; ValueError if it leaves the region."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise ValueError(f"{what}: bytes [{offset}, {offset + nbytes}) are outside the registered region "
                             f"of {self.length} bytes")
        return self.addr + offset

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A zero-copy view of part of the region."""
        self.address(offset, nbytes, "view")
        return memoryview(self.array)[offset:offset + nbytes]

    def close(self) -> None:
        """Deregister, then let go of the buffer (an mmap can be closed afterwards)."""
        if self._mr is not None:
            self._mr.close()
            self._mr = None
            self.array = np.empty(0, np.uint8)


class Endpoint:
    """This process's verbs resources (see the module docstring)."""

    def __init__(self, device: str | None = None, *, port: int | None = None, gid_index: int | None = None,
                 cq_depth: int = DEFAULT_CQ_DEPTH) -> None:
        pv = self.pv = load_pyverbs()
        self._pid = os.getpid()
        self.ctx, self.device = open_device(device, port, gid_index)
        caps = self.ctx.query_device()
        self.max_rd_atomic = int(caps.max_qp_rd_atom)
        self.max_qp_wr = int(caps.max_qp_wr)
        self.pd = pv.pd.PD(self.ctx)
        self.max_cqe = int(caps.max_cqe)
        self.cq, self.channel, self._fd = self.completion_queue(cq_depth)
        self._armed = False
        self._owners: dict[int, CompletionOwner] = {}
        self._backlog: dict[CompletionOwner, list[object]] = defaultdict(list)
        # Receive target for messages that carry only an immediate (WRITE WITH
        # IMM, credit grants): a receive WR needs one SGE, nothing lands there.
        self.scratch = self.register(np.zeros(64, dtype=np.uint8))
        self.closed = False

    def completion_queue(self, depth: int) -> tuple[Any, Any, int]:
        """A new CQ with its own completion channel on this context: (cq, channel, channel fd).

        pyverbs does not expose the channel's fd; it is the one event file
        that creating the channel added to this process (found under a lock,
        so two threads creating channels at once cannot confuse theirs).
        """
        self.check_owner()
        with _CHANNEL_LOCK:
            # The kernel gives a new fd the lowest free number: look there first, and walk
            # /proc/self/fd (tens to hundreds of ms on the guest's emulated CPU, per connection
            # set-up, both ends) only when another thread took that number meanwhile.
            probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            os.close(probe)
            channel = self.pv.cq.CompChannel(self.ctx)
            # Free a moment ago and an event file now: only a channel made under this lock can be.
            new = {probe} if _is_event_fd(probe) else set()
            if not new:
                channel.close()
                before = _event_fds()
                channel = self.pv.cq.CompChannel(self.ctx)
                new = _event_fds() - before
        if len(new) != 1:
            channel.close()
            raise RdmaUnavailable(f"cannot find the completion channel fd of {self.device.name} (new event fds {new})")
        cq = self.pv.cq.CQ(self.ctx, min(depth, self.max_cqe), None, channel, 0)
        return cq, channel, new.pop()

    # -- memory ---------------------------------------------------------------
    def register(self, buf: Any, *, remote_write: bool = False, remote_read: bool = False) -> Region:
        """Register existing memory (numpy array, mmap, shm ring) without copying it.

        The buffer must be C-contiguous.  A read-only buffer (a table mapped
        PROT_READ) can only be registered for remote reads.
        """
        self.check_owner()
        e = self.pv.enums
        mv = memoryview(buf)
        if not mv.c_contiguous:
            raise ValueError("register: the buffer is not C-contiguous")
        if mv.nbytes == 0:
            raise ValueError("register: the buffer is empty")
        if mv.readonly and remote_write:
            raise ValueError("register: a read-only buffer cannot be registered for remote writes")
        array = np.frombuffer(mv.cast("B"), dtype=np.uint8)
        access = 0 if mv.readonly else e.IBV_ACCESS_LOCAL_WRITE
        if remote_write:
            access |= e.IBV_ACCESS_REMOTE_WRITE
        if remote_read:
            access |= e.IBV_ACCESS_REMOTE_READ
        try:
            mr = self.pv.mr.MR(self.pd, array.nbytes, access, address=array.ctypes.data)
        except self.pv.pyverbs_error.PyverbsError as ex:
            raise RegistrationError(f"{self.device.name}: cannot register {array.nbytes} bytes "
                                    f"(access 0x{access:x}): {ex}") from ex
        return Region(mr, array, access)

    def register_for_reads(self, buf: Any, what: str, *, detail: str = "",
                           fallback: Callable[[], Any] | None = None) -> Region | None:
        """Register table memory for one-sided RDMA READs, or None when the device refuses.

        ``fallback`` (optional) makes another buffer with the same bytes to
        try when ``buf`` is refused.  Logs which way cache fills of ``what``
        will go (``detail`` says which rows).  Measured on Debian's 6.1
        kernel with soft-RoCE: a shared read-only file mapping
        (``np.load(mmap_mode="r")``) is refused with EFAULT, a private one
        (``mmap_mode="c"``, still sharing the page cache until written) is
        accepted, registered read-only too; see ``map_table``.
        """
        where = f"{detail}, " if detail else ""
        try:
            region = self.register(buf, remote_read=True)
        except RegistrationError as e:
            first = e
            region = None
            if fallback is not None:
                try:
                    region = self.register(fallback(), remote_read=True)
                except (RegistrationError, OSError, ValueError) as e2:
                    first = RegistrationError(f"{first}; a private mapping too: {e2}")
            if region is None:
                logger.info("cache fills of %s: FETCH frames (RDMA READ unavailable: %s%s)", what, where, first)
                return None
        logger.info("cache fills of %s: RDMA READ (%s%d bytes registered)", what, where, region.length)
        return region

    # -- completions ------------------------------------------------------------
    def fileno(self) -> int:
        """The completion channel fd: readable when the armed CQ has a completion."""
        return self._fd

    def attach(self, qpn: int, owner: CompletionOwner) -> None:
        """Route the completions of queue pair ``qpn`` to ``owner``."""
        self._owners[qpn] = owner

    def detach(self, qpn: int) -> None:
        self._owners.pop(qpn, None)

    def poll(self, max_entries: int = POLL_BATCH) -> list[Any]:
        """Up to ``max_entries`` work completions, without waiting."""
        n, wcs = self.cq.poll(max_entries)
        return wcs if n else []

    def wait(self, timeout_s: float | None, max_entries: int = POLL_BATCH) -> list[Any]:
        """A batch of completions, sleeping on the channel fd (not spinning) up to ``timeout_s``."""
        wcs = self.poll(max_entries)
        if wcs:
            return wcs
        if not self._armed:
            self.cq.req_notify()
            self._armed = True
            wcs = self.poll(max_entries)  # one may have landed before the CQ was armed
            if wcs:
                return wcs
        ready, _, _ = select.select([self._fd], [], [], timeout_s)
        if ready:
            self.channel.get_cq_event(self.cq)
            self.cq.ack_events(1)
            self._armed = False
        return self.poll(max_entries)

    def collect(self, timeout_s: float | None) -> int:
        """Wait for one batch of completions and route each to its owner's backlog; returns how many.

        A completion whose owner fails (``QueuePairError``) puts the error in
        that owner's backlog; the other owners' events are unaffected.
        """
        wcs = self.wait(timeout_s)
        touched = set()
        for wc in wcs:
            owner = self._owners.get(wc.qp_num)
            if owner is None:  # a flushed WR of a queue pair already closed
                continue
            try:
                event = owner.handle(wc)
            except QueuePairError as err:
                event = err
            if event is not None:
                self._backlog[owner].append(event)
            touched.add(owner)
        for owner in touched:
            try:
                owner.replenish()
            except QueuePairError as err:  # a refused repost: that owner's QP is broken, not ours
                self._backlog[owner].append(err)
        return len(wcs)

    def take(self, owner: CompletionOwner) -> list[object]:
        """The events routed to ``owner`` since the last take."""
        return self._backlog.pop(owner, [])

    def put_back(self, owner: CompletionOwner, events: list[object]) -> None:
        """Return events to the front of ``owner``'s backlog (they come out of the next take)."""
        self._backlog[owner][:0] = events

    def forget(self, owner: CompletionOwner) -> None:
        self._backlog.pop(owner, None)

    # -- lifetime -----------------------------------------------------------------
    def check_owner(self) -> None:
        if os.getpid() != self._pid:
            raise RdmaUnavailable(f"endpoint on {self.device.name} belongs to process {self._pid}; "
                                  "verbs resources cannot be used after fork: open an Endpoint per process")

    def close(self) -> None:
        """Release everything (queue pairs must be closed first)."""
        if self.closed:
            return
        self.closed = True
        self.scratch.close()
        self.cq.close()
        self.channel.close()
        self.pd.close()
        self.ctx.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        d: DeviceChoice = self.device
        return f"Endpoint({d.name} port {d.port} gid {d.gid_index}, pid {self._pid})"


def map_table(path: str) -> np.ndarray:
    """Map a table ``.npy`` the way RDMA READ can register it: private, copy-on-write.

    Pages stay shared with the page cache (and other processes mapping the
    file) as long as nobody writes them, which nobody does; unlike a shared
    read-only mapping, soft-RoCE on Debian's kernel accepts it for remote reads.
    """
    return np.load(path, mmap_mode="c")


def _is_event_fd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENT_FD_LINK
    except OSError:
        return False


def _event_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _EVENT_FD_LINK:
                out.add(int(name))
        except OSError:  # the fd listdir itself used, already closed
            pass
    return out
