"""Same-host shared-memory transport: ids and partials cross no socket.

Each connection is a pair of SPSC shared-memory rings (ranker -> server
requests, server -> ranker responses, see shm_stream.py for the stream over
a ring) and one unix stream socket in the abstract namespace that carries
nothing but the set-up, one doorbell byte per chunk, and EOF when a peer dies::

    engine (connect)                                  embedding server (Listener.accept)
    bind  \\0flexemr.<inst>.shm.s00.c<pid>x<n><d|k>
    connect \\0flexemr.<inst>.shm.s00      ───────▶   peer name -> ring names (checked: same
                                                      prefix, same uid); creates both rings
    attach <base>.req, <base>.rsp          ◀───────   b"A"
    frames: ring chunk + 1 byte ⇄ ring chunk + 1 byte

Names come from :mod:`flexemr.naming` (``/flexemr.<instance>.shm.…``) so the
supervisor's ``unlink_instance_segments`` sweeps whatever a killed process
left; the server creates and unlinks a connection's rings (when the
connection closes), and a restarted server unlinks what its previous life
left under its own prefix before it accepts.

Copies: a request is copied once into the request ring (the engine's send
gathers the submission-ring slot into it) and once out of it into the
server's frame buffer (the server reads with ``recv_nowait``, a copy by that
interface).  A small response (below enginemsg.REF_MIN_PAYLOAD) is copied
once into the response ring (the server's gathered outbox) and once out of it
into the completion-ring slot (``recv_payload_into``).  Loopback TCP makes the same two copies per
direction, through the kernel, plus segmentation and a wake-up per segment;
here a frame costs one ring slot and one doorbell byte.  A large response
is not copied out at all: the engine lends its payload to the inference
process (``lend_payload``, flexemr.ring.lend), which maps the response ring
and reads the partial where the server wrote it; the server's free space
stops at the oldest lend not yet returned.  Who unlinks: still the server
(on close, or its restarted self's sweep); a ranker mapping survives the
unlink, so a killed server's rings never vanish under a partial being read.

Migration: ``detach`` returns the socket; the adopting engine finds the ring
names from the socket's own bound name (``getsockname``), and where the
previous owner stopped inside a chunk from the ring's header page
(shm_stream.write_resume_offset).  A credit channel (``priority=True``) is a
second, small ring pair with its own socket, so credits never wait behind
bulk responses.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import struct
from typing import Sequence

import posix_ipc

from flexemr import naming
from flexemr.ring import Ring
from flexemr.transport.base import Connection, Lent, Listener, Transport, accept_nowait, close_socket
from flexemr.transport.shm_stream import RingReader, RingWriter, read_resume_offset, write_resume_offset
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, Header, unpack_header

logger = logging.getLogger(__name__)

__all__ = ["ADDRESS_PREFIX", "ShmConnection", "ShmListener", "ShmTransport", "is_shm_address",
           "listen_socket", "server_address"]

ADDRESS_PREFIX = "shm:"
DATA_REQUEST_RING = 16 << 20
DATA_RESPONSE_RING = 32 << 20
CREDIT_RING = 1 << 20
_ACK = b"A"
_CONNECT_TIMEOUT_S = 10.0
_UCRED = struct.Struct("3i")
_BASE_RE = re.compile(r"c\d+x\d+[dk]")
_counter = itertools.count(1)


def is_shm_address(address: str) -> bool:
    return address.startswith(ADDRESS_PREFIX)


def server_address(instance: str, index: int) -> str:
    """``shm:flexemr.<instance>.shm.s03``: where embedding server ``index`` of ``instance`` listens."""
    return ADDRESS_PREFIX + naming.shm_name(instance, "shm", f"s{index:02d}")[1:]


def _prefix_of(address: str) -> str:
    """"shm:flexemr.x.shm.s00" -> "/flexemr.x.shm.s00" (ValueError naming the address if malformed)."""
    if not is_shm_address(address):
        raise ValueError(f"address {address!r} is not a shm address (\"{ADDRESS_PREFIX}flexemr.<instance>.shm.sNN\")")
    name = address[len(ADDRESS_PREFIX):]
    if not name.startswith(naming.PREFIX + ".") or len(name) > 64:
        raise ValueError(f"address {address!r}: expected \"{ADDRESS_PREFIX}flexemr.<instance>.shm.sNN\"")
    return "/" + name


def _abstract(name: str) -> bytes:
    return b"\0" + name[1:].encode()


def _ring_names(base: str) -> tuple[str, str]:
    """(request, response) ring names of the connection whose socket is bound to ``base``."""
    return base + ".req", base + ".rsp"


def listen_socket(address: str) -> socket.socket:
    """A listening unix socket for ``address`` (the supervisor opens it; the server inherits it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_abstract(_prefix_of(address)))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {address} ({e.strerror}); is another server using it?") from None
    return sock


def _sweep(prefix: str) -> list[str]:
    """Unlink the rings (and their doorbells) a previous life of this server left under ``prefix``."""
    head = prefix[1:] + "."
    gone = []
    try:
        entries = os.listdir(naming.SHM_DIR)
    except FileNotFoundError:
        return gone
    for e in entries:
        try:
            if e.startswith(naming.SEM_FILE_PREFIX + head):
                posix_ipc.unlink_semaphore("/" + e[len(naming.SEM_FILE_PREFIX):])
            elif e.startswith(head):
                posix_ipc.unlink_shared_memory("/" + e)
            else:
                continue
        except posix_ipc.ExistentialError:
            continue
        gone.append(e)
    return gone


class ShmConnection(Connection):
    """One frame stream over a ring pair (either end); ``owner`` (the server) unlinks the rings on close."""

    def __init__(self, sock: socket.socket, tx: Ring, rx: Ring, conn_id: int, server: int, address: str,
                 peer: str, owner: bool, max_payload: int = DEFAULT_MAX_PAYLOAD, resume: int = 0) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.server = server
        self.address = address
        self.peer = peer
        self.max_payload = max_payload
        self._tx, self._rx = tx, rx
        self._owner = owner
        self._writer = RingWriter(tx, sock, peer)
        self._reader = RingReader(rx, sock, peer, resume)
        self._hdr = memoryview(bytearray(HEADER_SIZE))
        self._buf = memoryview(bytearray(0))
        self._closed = False

    @property
    def ring_names(self) -> tuple[str, str]:
        """(this end's send ring, receive ring): for tests and logs."""
        return self._tx.name, self._rx.name

    def send_frame(self, buffers: Sequence) -> int:
        return self._writer.write_all(buffers)

    def recv_header(self) -> Header:
        self._reader.read_into(self._hdr, block=True)
        return unpack_header(self._hdr, self.max_payload)

    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        if header.payload_len:
            self._reader.read_into(view[: header.payload_len], block=True)

    def lend_payload(self, header: Header) -> Lent | None:
        n = header.payload_len
        if n == 0:
            return None
        lent = self._reader.lend(n)
        if lent is None:
            return None
        rx = self._rx
        return Lent(rx.name, rx.ino, lent[0], lent[1], n)

    def recv_payload(self, header: Header) -> memoryview:
        n = header.payload_len
        if len(self._buf) < n:
            self._buf = memoryview(bytearray(max(n, 2 * len(self._buf))))
        view = self._buf[:n]
        if n:
            self._reader.read_into(view, block=True)
        return view

    def recv_nowait(self, view: memoryview) -> int:
        return self._reader.read_into(view, block=False)

    def send_nowait(self, views: Sequence[memoryview]) -> int:
        return self._writer.write_nowait(views)

    def fileno(self) -> int:
        return self.sock.fileno()

    def detach(self) -> int:
        """Give the connection to another engine: the socket moves, the rings stay (attached by name there)."""
        offset = self._reader.let_go()
        write_resume_offset(self._rx.name, offset)
        self._close_rings()
        self._closed = True
        return self.sock.detach()

    def interrupt(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # the reader watches the socket for the peer's death
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.let_go()
        if self._owner:
            self._tx.unlink()
            self._rx.unlink()
        self._close_rings()
        close_socket(self.sock)

    def _close_rings(self) -> None:
        for r in (self._tx, self._rx):
            try:
                r.close()
            except Exception:   # never raise from close (a view still exported is unmapped later)
                pass


class ShmListener(Listener):
    """Where a server accepts shm connections; creates each connection's rings in ``accept``."""

    def __init__(self, sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_payload = max_payload
        name = sock.getsockname()
        if not isinstance(name, bytes) or not name.startswith(b"\0"):
            raise ValueError(f"shm listener socket must be bound in the abstract namespace, got {name!r}")
        self.prefix = "/" + name[1:].decode()
        self.address = ADDRESS_PREFIX + self.prefix[1:]
        self._accepted = 0
        stale = _sweep(self.prefix)
        if stale:
            logger.info("unlinked %d shm objects a previous server on %s left", len(stale), self.address)

    def accept(self) -> Connection | None:
        accepted = accept_nowait(self.sock)
        if accepted is None:
            return None
        sock = accepted[0]
        try:
            return self._setup(sock)
        except (OSError, ValueError) as e:
            logger.warning("refusing shm connection on %s: %s", self.address, e)
            sock.close()
            return None

    def _setup(self, sock: socket.socket) -> ShmConnection:
        sock.setblocking(True)
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.getuid():
            raise PermissionError(f"peer pid {pid} runs as uid {uid}, not {os.getuid()}")
        peer = sock.getpeername()
        if not isinstance(peer, bytes) or not peer.startswith(_abstract(self.prefix) + b"."):
            raise ValueError(f"peer pid {pid} is bound to {peer!r}, not under {self.prefix}")
        base = "/" + peer[1:].decode()
        tail = base[len(self.prefix) + 1:]
        if not _BASE_RE.fullmatch(tail):
            raise ValueError(f"peer pid {pid}: connection name {base!r} is not one this transport makes")
        req_cap, rsp_cap = (CREDIT_RING, CREDIT_RING) if tail.endswith("k") else (DATA_REQUEST_RING, DATA_RESPONSE_RING)
        req_name, rsp_name = _ring_names(base)
        made: list[Ring] = []
        try:
            for name, cap in ((req_name, req_cap), (rsp_name, rsp_cap)):
                try:
                    made.append(Ring.create(name, cap))
                except FileExistsError:   # left by a dead connection with a recycled pid
                    _sweep(name)
                    made.append(Ring.create(name, cap))
            sock.send(_ACK)
        except BaseException:
            for r in made:
                r.unlink()
                r.close()
            raise
        self._accepted += 1
        conn = ShmConnection(sock, tx=made[1], rx=made[0], conn_id=self._accepted, server=-1,
                             address=self.address, peer=f"shm pid {pid} ({tail})", owner=True,
                             max_payload=self.max_payload)
        logger.info("accepted shm connection from pid %d (%s)", pid, base)
        return conn

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        close_socket(self.sock)


class ShmTransport(Transport):
    """Both ends of shm connections; addresses are ``shm:flexemr.<instance>.shm.sNN``."""

    name = "shm"

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, connect_timeout: float = _CONNECT_TIMEOUT_S) -> None:
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        prefix = _prefix_of(address)
        base = f"{prefix}.c{os.getpid()}x{next(_counter)}{'k' if priority else 'd'}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_abstract(base))
            sock.settimeout(self.connect_timeout)
            sock.connect(_abstract(prefix))
            # The listener's backlog takes us at once; the ACK comes when the server
            # accepts, which may be a whole boot later (it is still importing torch):
            # wait like TCP waits for the HELLO answer, without a timeout.
            sock.settimeout(None)
            ack = sock.recv(1)
            if ack != _ACK:
                raise ConnectionRefusedError(f"server {server} at {address} closed the shm set-up (see its log)")
            conn = self._attach(sock, base, conn_id, server, address, resume=False)
        except BaseException:
            sock.close()
            raise
        logger.debug("connection %d to server %d: shm rings %s.{req,rsp}", conn_id, server, base)
        return conn

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        sock = socket.socket(fileno=handle)
        try:
            name = sock.getsockname()
            if not isinstance(name, bytes) or not name.startswith(b"\0"):
                raise ValueError(f"connection {conn_id}: handed-over socket is not a shm connection ({name!r})")
            conn = self._attach(sock, "/" + name[1:].decode(), conn_id, server, address, resume=True)
        except BaseException:
            sock.close()
            raise
        return conn

    def _attach(self, sock: socket.socket, base: str, conn_id: int, server: int, address: str,
                resume: bool) -> ShmConnection:
        req_name, rsp_name = _ring_names(base)
        offset = read_resume_offset(rsp_name) if resume else 0
        tx = Ring.attach(req_name)
        try:
            rx = Ring.attach(rsp_name)
        except BaseException:
            tx.close()
            raise
        return ShmConnection(sock, tx=tx, rx=rx, conn_id=conn_id, server=server, address=address,
                             peer=f"server {server} ({address})", owner=False, max_payload=self.max_payload,
                             resume=offset)

    def listen(self, address: str) -> Listener:
        return ShmListener(listen_socket(address), self.max_payload)

    def listener_from_socket(self, sock: socket.socket) -> Listener:
        """Wrap a listening unix socket the supervisor opened (see :func:`listen_socket`)."""
        return ShmListener(sock, self.max_payload)
