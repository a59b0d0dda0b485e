"""RDMA transport (pyverbs): daemon connections whose frames travel over verbs.

How a connection comes up: the ranker opens a TCP connection (it stays, as
the control channel: HELLO, and the peer's death shows there as EOF), its
HELLO carries this side's ``ConnectionBlob`` (versioned; flag
FRAME_STREAM), the embedding server answers HELLO with its own blob and
both switch: every later frame moves as RDMA WRITE WITH IMM into the other
side's registered receive ring (rdma/stream.py).  An embedding server needs
no transport setting: it listens on TCP and upgrades each ranker that asks
(``upgrade_server_connection``), so TCP and RDMA rankers can share it.

One ``Endpoint`` (verbs context, PD) per process, opened on first use in
that process (engines open theirs after fork): engines never share doorbell
pages.  It logs "RDMA on rxe0 port 1 gid 1 ...".

Cache fills: a v2 server's HELLO blob lists the table rows it registered
for RDMA READ (``ReadTable``); ``RdmaConnection.read_tables`` is that list
and ``stream`` posts the READs (flexemrd/engine/reads.py).  The server side
hands ``upgrade_server_connection`` a callable that registers and lists them
(flexemrd/embedding/reads.py); only a ranker whose blob accepts version 2 is
asked, and only on data connections.

Responses landing in place: an engine process that called
:func:`land_responses_in_shm` gives each data connection a shm landing
(rdma/landing.py) the server places its WRITEs in (blob version 3), and
``lend_payload`` passes a response's payload to the inference process where
it landed (a ``Lent``, as the shm transport does); against a server that
does not read version 3 the connection copies as before.

A QP cannot change process: ``detach`` / ``adopt`` raise, naming the
setting, and ``RdmaTransport.MIGRATES`` is False, so engines migrate RDMA
connections by reopening them (flexemrd/engine/reopen.py); the config refuses
``[ranker].mapping = "shared"`` and ``migration = "handoff"`` with rdma.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Sequence

from flexemr.errors import ProtocolError
from flexemr.transport.base import Connection, Lent, Listener, Transport
from flexemr.transport.tcp import TcpConnection, TcpTransport
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, FrameType, Header, unpack_header

__all__ = ["IMPLEMENTED", "RdmaConnection", "RdmaTransport", "break_served_streams", "land_responses_in_shm",
           "probe_devices", "process_endpoint", "upgrade_server_connection"]

if TYPE_CHECKING:
    from flexemr.transport.rdma.blob import ReadTable

logger = logging.getLogger(__name__)

# Embedding server: (the tables a ranker may READ, the boot model version), asked per data connection.
ReadTablesFn = Callable[[], "tuple[tuple[ReadTable, ...], int]"]

IMPLEMENTED = True
MIGRATES = False   # a queue pair cannot change process: no detach/adopt (engines migrate by reopening)

_ENDPOINT_LOCK = threading.Lock()
_ENDPOINTS: dict[tuple[int, str | None], object] = {}
_SERVED: weakref.WeakSet = weakref.WeakSet()   # this process's server-side data streams (test hook below)
_LANDING: dict = {"prefix": "", "next": 0, "bytes": 0}   # land_responses_in_shm: this process's landings


def land_responses_in_shm(prefix: str, capacity: int | None = None) -> None:
    """Engine process: data connections opened from now on receive into shm landings named ``prefix.pPID.*``.

    ``prefix`` comes from ``rdma.landing.landing_prefix(instance, engine)``;
    ``capacity`` (bytes, ``rdma.landing.landing_bytes_for``) defaults to the
    largest landing.  Landings a dead process of the same engine left behind
    are removed now.
    """
    from flexemr.transport.rdma.landing import LANDING_BYTES, sweep_stale

    sweep_stale(prefix)
    _LANDING["prefix"] = prefix
    _LANDING["bytes"] = capacity or LANDING_BYTES


def _landing_name(conn_id: int) -> str | None:
    prefix = _LANDING["prefix"]
    if not prefix:
        return None
    with _ENDPOINT_LOCK:
        n = _LANDING["next"]
        _LANDING["next"] = n + 1
    return f"{prefix}.p{os.getpid()}.c{conn_id}n{n}"


def probe_devices() -> tuple[list[str], str]:
    """Names of RDMA devices, and a sentence saying why the list is empty."""
    from flexemr.transport.rdma import device

    return device.probe()


def process_endpoint(device: str | None = None):
    """This process's Endpoint on ``device`` (opened once per process; never inherited across fork)."""
    from flexemr.transport.rdma.endpoint import Endpoint

    key = (os.getpid(), device)
    with _ENDPOINT_LOCK:
        ep = _ENDPOINTS.get(key)
        if ep is None:
            ep = _ENDPOINTS[key] = Endpoint(device)
        return ep


class RdmaConnection(Connection):
    """A daemon connection: TCP until the HELLO exchange, frames over verbs after it."""

    def __init__(self, tcp: TcpConnection, device: str | None, priority: bool, max_payload: int) -> None:
        self.tcp = tcp
        self.conn_id = tcp.conn_id
        self.server = tcp.server
        self.address = tcp.address
        self.peer = tcp.peer
        self.device = device
        self.priority = priority
        self.max_payload = max_payload
        self.stream = None          # FrameStream once the HELLO exchange switched us to verbs
        self._pending = None        # the ranker's stream between its HELLO and the answer
        self.advertised: tuple = ()  # server: the ReadTables our blob listed (flexemrd/embedding/reads.py)
        self._hdr = bytearray(HEADER_SIZE)
        self._buf = bytearray(0)
        # Set-up steps and what each took (ms), in order: TCP connect, the HELLO/auth
        # round trips, the stream's verbs resources (setup_report says them in one line).
        self.setup_steps: list[tuple[str, float]] = []
        self._sent_at = 0.0

    def setup_report(self) -> str:
        """What setting this connection up cost, step by step, e.g. ``tcp 2.0, stream 90.1 (cq 1.0 ...)``."""
        return ", ".join(f"{step} {ms:.1f}" for step, ms in self.setup_steps) + " ms"

    # -- the HELLO exchange -----------------------------------------------------------
    def hello_blob(self) -> bytes:
        """Ranker: create this connection's QP and rings; the blob goes into the HELLO."""
        from flexemr.transport.rdma.stream import FrameStream

        if self._pending is None:
            t = time.monotonic()
            self._pending = FrameStream(process_endpoint(self.device), self.peer, self.tcp.sock,
                                        priority=self.priority,
                                        landing=None if self.priority else _landing_name(self.conn_id),
                                        landing_bytes=_LANDING["bytes"])
            parts = " ".join(f"{k} {v:.1f}" for k, v in self._pending.setup_ms.items())
            self.setup_steps.append((f"stream ({parts})", (time.monotonic() - t) * 1e3))
        return self._pending.blob()

    def hello_done(self, blob: bytes) -> None:
        """Ranker: the server's HELLO answer carried ``blob``: connect and switch to verbs."""
        from flexemr.transport.rdma.blob import ConnectionBlob

        if self._pending is None:
            raise RuntimeError("hello_done before hello_blob")
        if not blob:
            raise ProtocolError(f"server at {self.address} answered HELLO without an RDMA connection blob: "
                                "it cannot do RDMA (see its log) or runs an older flexemr; use transport \"tcp\"")
        self._pending.connect(ConnectionBlob.unpack_padded(blob))
        self.setup_steps.append(("rts", self._pending.setup_ms["rts"]))
        self.stream, self._pending = self._pending, None
        logger.info("connection %d to %s over RDMA (%s QP 0x%06x)%s", self.conn_id, self.address,
                    "credit" if self.priority else "data", self.stream.qp.qpn,
                    f"; responses land in {self.stream.landing.name}" if self.stream.lands_in_place else
                    "; responses are copied (the server does not place them in a landing)"
                    if self.stream.landing is not None else "")

    # -- frames ---------------------------------------------------------------------------
    def send_frame(self, buffers: Sequence) -> int:
        if self.stream is None:
            self._sent_at = time.monotonic()
            return self.tcp.send_frame(buffers)
        return self.stream.send(buffers)

    def recv_header(self) -> Header:
        if self.stream is None:
            h = self.tcp.recv_header()   # only the HELLO exchange reads TCP: time its round trips
            try:
                name = FrameType(h.type).name
            except ValueError:
                name = str(h.type)
            self.setup_steps.append((f"->{name}", (time.monotonic() - self._sent_at) * 1e3))
            return h
        self.stream.recv_into(memoryview(self._hdr))
        return unpack_header(self._hdr, self.max_payload)

    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        if self.stream is None:
            return self.tcp.recv_payload_into(header, view)
        self.stream.recv_into(view[: header.payload_len])

    def lend_payload(self, header: Header) -> Lent | None:
        """Leave ``header``'s payload in the shm landing it was written to (the stream lands in place)."""
        if self.stream is None or header.payload_len == 0:
            return None
        lent = self.stream.lend(header.payload_len)
        if lent is None:
            return None
        landing, seq, pos = lent
        return Lent(landing.name, landing.ino, seq, pos, header.payload_len)

    def poll_returns(self) -> bool:
        """Engine receiver, between selects: pass the ranker's returns on as grants; True while lends are out."""
        return self.stream is not None and self.stream.poll_returns()

    def recv_payload(self, header: Header) -> memoryview:
        if self.stream is None:
            return self.tcp.recv_payload(header)
        n = header.payload_len
        if len(self._buf) < n:
            self._buf = bytearray(max(n, 2 * len(self._buf)))
        view = memoryview(self._buf)[:n]
        self.stream.recv_into(view)
        return view

    def recv_nowait(self, view: memoryview) -> int:
        if self.stream is None:
            return self.tcp.recv_nowait(view)
        return self.stream.recv_nowait(view)

    def send_nowait(self, views: Sequence[memoryview]) -> int:
        if self.stream is None:
            return self.tcp.send_nowait(views)
        return self.stream.send_nowait(views)

    def fileno(self) -> int:
        return self.tcp.fileno() if self.stream is None else self.stream.fileno()

    def send_backlogged(self) -> bool:
        """Bytes accepted by ``send_nowait`` wait inside the stream for the peer's grants (TCP: never)."""
        return self.stream is not None and self.stream.backlogged()

    def ready_to_read(self) -> bool:
        """After ``fileno()`` was readable: will a read find bytes (or EOF)?  Non-blocking.

        A TCP socket's readability means exactly that; a verbs stream's fd also
        wakes for its own send completions (``FrameStream.readable``).
        """
        return True if self.stream is None else self.stream.readable()

    def detach(self) -> int:
        raise NotImplementedError(
            f"connection {self.conn_id} to {self.address} is over RDMA: a queue pair cannot move to another "
            "engine process; migrate it by reopening ([ranker].migration = \"auto\" or \"reopen\")")

    def interrupt(self) -> None:
        # A reader blocked in the stream also watches the TCP control socket: its EOF wakes it.
        self.tcp.interrupt()

    def close(self) -> None:
        for s in (self.stream, self._pending):
            if s is not None:
                s.close()
        self.stream = self._pending = None
        self.tcp.close()

    @property
    def transport_name(self) -> str:
        return "rdma" if self.stream is not None else "tcp"

    @property
    def read_tables(self) -> tuple[ReadTable, ...]:
        """Ranker: the table rows the server registered for RDMA READ (empty: v1 server or none registered)."""
        blob = self.stream.peer_blob if self.stream is not None else None
        return blob.tables if blob is not None else ()

    @property
    def boot_version(self) -> int:
        """Ranker: the model version the server serves a FETCH naming none from (0: not advertised)."""
        blob = self.stream.peer_blob if self.stream is not None else None
        return blob.boot_version if blob is not None else 0


def upgrade_server_connection(conn: Connection, blob: bytes, priority: bool = False,
                              read_tables: ReadTablesFn | None = None) -> tuple[Connection, bytes]:
    """Embedding server: a ranker's HELLO carried ``blob``; returns (the verbs connection, our blob).

    ``read_tables`` (data connections of a ranker that reads blob version 2
    only) lists the rows it may RDMA READ for cache fills; they go into our blob.

    The returned connection is ready (QP at RTS, receives posted) before our
    blob is sent, so the ranker's first WRITE finds it.  Raises
    ``RdmaUnavailable`` (a FlexemrError) when this host cannot do RDMA and
    ``BlobError`` (a ProtocolError) for a malformed blob.
    """
    from flexemr.transport.rdma.blob import ConnectionBlob
    from flexemr.transport.rdma.landing import MIN_LANDING_BYTES
    from flexemr.transport.rdma.stream import MAX_LANDING_BYTES, FrameStream

    if not isinstance(conn, TcpConnection):
        raise ProtocolError(f"{conn.peer}: HELLO with an RDMA blob on a connection that is not TCP")
    remote = ConnectionBlob.unpack_padded(blob)
    up = RdmaConnection(conn, None, priority=priority, max_payload=DEFAULT_MAX_PAYLOAD)
    t0 = time.monotonic()
    # A ranker offering a landing (accepts 3) gets our WRITEs placed in it: it lends them, never copies.
    land = remote.regions[0].length if remote.regions else 0
    peer_landing = (land if not priority and remote.peer_reads >= 3 and MIN_LANDING_BYTES <= land <= MAX_LANDING_BYTES
                    and land % 64 == 0 else 0)
    stream = FrameStream(process_endpoint(None), conn.peer, conn.sock, priority=up.priority,
                         peer_landing=peer_landing)
    try:
        stream.connect(remote)
    except BaseException:
        stream.close()
        raise
    logger.info("RDMA %s stream for %s ready in %.1f ms (%s ms)", "credit" if priority else "data", conn.peer,
                (time.monotonic() - t0) * 1e3, " ".join(f"{k} {v:.1f}" for k, v in stream.setup_ms.items()))
    up.stream = stream
    tables: tuple = ()
    boot = 0
    if not priority and read_tables is not None and remote.peer_reads >= 2:
        tables, boot = read_tables()
    if not priority:
        _SERVED.add(stream)
    up.advertised = tuple(tables)
    return up, stream.blob(tables, boot)


def break_served_streams() -> int:
    """TEST HOOK: force the QP of every data connection this process serves to the error state.

    What a peer whose QP breaks looks like to the rankers (their writes fail,
    the server drops the connection); the embedding server calls it on
    SIGUSR2 only when FLEXEMR_RDMA_TEST_HOOKS=1.  Returns how many it broke.
    """
    broken = 0
    for stream in list(_SERVED):
        try:
            stream.to_error()
            broken += 1
        except ConnectionError:
            continue   # closed meanwhile
    logger.warning("test hook: forced %d served RDMA data QP%s to the error state", broken, "" if broken == 1 else "s")
    return broken


class RdmaTransport(Transport):
    """Ranker side: connections that switch to verbs in their HELLO; servers listen on TCP."""

    name = "rdma"
    MIGRATES = False   # engines migrate RDMA connections by reopening them (flexemrd/engine/reopen.py)

    def __init__(self, device: str | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 connect_timeout: float = 10.0) -> None:
        self.device = device
        self.max_payload = max_payload
        self._tcp = TcpTransport(max_payload, connect_timeout)

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        t = time.monotonic()
        tcp = self._tcp.connect(address, conn_id, server, priority)
        assert isinstance(tcp, TcpConnection)
        conn = RdmaConnection(tcp, self.device, priority, self.max_payload)
        conn.setup_steps.append(("tcp", (time.monotonic() - t) * 1e3))
        return conn

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        os.close(handle)
        raise NotImplementedError(f"cannot adopt connection {conn_id} over RDMA: a queue pair cannot change "
                                  "process (it migrates by reopening: [ranker].migration = \"auto\" or \"reopen\")")

    def listen(self, address: str) -> Listener:
        return self._tcp.listen(address)
