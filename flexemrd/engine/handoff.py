"""Hand-off of live connections between engine processes (SCM_RIGHTS over a unix datagram socket).

Each engine binds an abstract-namespace address (nothing to clean up in the
filesystem) and receives datagrams carrying the descriptors of one
connection and a fixed description of it::

    offset size field      meaning
    ------ ---- ---------- -------------------------------------------------
       0    4   conn_id
       4    4   server     routing server id
       8    4   kind       OWN (migration: the receiver becomes the owner)
                           or SHARE ("shared" mapping: a send-only copy)
      12    8   inflight   subrequests sent and not yet answered (OWN)
      20   64   address    utf-8, NUL padded
    ancillary: SCM_RIGHTS, data socket [, credit socket]

The socket itself moves, so nothing reconnects and bytes the server sends
meanwhile wait in it for the new owner.  A connection whose transport cannot
move (``Transport.MIGRATES`` False: an RDMA queue pair) migrates by reopening
instead (reopen.py); ``[ranker].migration`` chooses per connection.
"""

from __future__ import annotations

import array
import dataclasses
import socket
import struct
import time

HANDOFF = struct.Struct("<IIIQ64s")
HANDOFF_OWN = 0
HANDOFF_SHARE = 1
HANDOFF_RECONNECT = 2   # a connection that is down moves without a socket: the receiver reconnects it
MAX_FDS = 4


def handoff_address(instance: str, engine_id: int) -> bytes:
    """Abstract-namespace unix address of engine ``engine_id``'s hand-off socket."""
    return f"\0flexemr.{instance}.engine{engine_id}.handoff".encode()


@dataclasses.dataclass(frozen=True)
class Handoff:
    """One connection received from another engine; ``fds`` are now ours to adopt or close."""

    conn_id: int
    server: int
    kind: int
    inflight: int
    address: str
    fds: tuple[int, ...]


def send_connection(instance: str, to_engine: int, conn_id: int, server: int, address: str, kind: int,
                    fds: list[int], inflight: int = 0, timeout: float = 30.0) -> None:
    """Pass ``fds`` (still ours to close afterwards) to engine ``to_engine``.

    Retries while the other engine's socket is not bound yet (it is booting),
    for up to ``timeout`` seconds.
    """
    raw = address.encode()
    if len(raw) > 64:
        raise ValueError(f"server address {address!r} is longer than the 64 bytes a hand-off carries")
    if not (1 if kind != HANDOFF_RECONNECT else 0) <= len(fds) <= MAX_FDS:
        raise ValueError(f"a hand-off carries 1-{MAX_FDS} descriptors, got {len(fds)}")
    msg = HANDOFF.pack(conn_id, server, kind, inflight, raw)
    dest = handoff_address(instance, to_engine)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        while True:
            try:
                # socket.send_fds ignores its address argument on Python 3.11: sendmsg directly.
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                s.sendmsg([msg], anc, 0, dest)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ConnectionRefusedError(
                        f"engine {to_engine} of instance {instance!r} did not take connection {conn_id} "
                        f"within {timeout:g} s (is it running?)") from None
                time.sleep(0.05)


class HandoffReceiver:
    """Engine ``engine_id``'s end: bound at construction, so senders can reach it before it reads."""

    def __init__(self, instance: str, engine_id: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(handoff_address(instance, engine_id))
        except OSError as e:
            self._sock.close()
            raise OSError(e.errno, f"engine {engine_id} of instance {instance!r}: cannot bind its hand-off "
                                   f"socket ({e.strerror}); is another engine {engine_id} running?") from None

    def receive(self, timeout: float) -> Handoff | None:
        """The next hand-off, or None after ``timeout`` seconds; OSError once closed."""
        self._sock.settimeout(timeout)
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self._sock, HANDOFF.size, MAX_FDS)
            except TimeoutError:
                return None
            if len(msg) != HANDOFF.size:
                for fd in fds:
                    socket.close(fd)
                continue
            cid, server, kind, inflight, address = HANDOFF.unpack(msg)
            if not fds and kind != HANDOFF_RECONNECT:
                continue  # a datagram without descriptors is not a hand-off
            return Handoff(cid, server, kind, inflight, address.rstrip(b"\0").decode(), tuple(fds))

    def close(self) -> None:
        self._sock.close()
