"""The unix-socket front: accept clients, read their frames, hand them to admission.

One thread per client session reads frames (clients are few and long-lived:
one connection per client thread); replies come from the finisher through
the session's ``SocketReplies``.

What a client can make this process hold is bounded:

- at most ``max_clients`` sessions; one more is answered ERROR OVERLOADED
  and closed;
- a payload buffer grows as its bytes arrive (``read_payload_growing``), so
  a header announcing 1 GiB and then stalling costs 64 KiB;
- every buffered request byte, from its arrival until its answer is sent,
  counts against one per-process ``RequestBudget``
  (``[ranker].max_inflight_request_bytes``): a request that would exceed it
  is answered ERROR OVERLOADED (its bytes discarded, the session kept);
- a client that leaves a frame unfinished for ``client_idle_timeout_s`` is
  disconnected (waiting between frames is free);
- the reply regions clients pass (shared-memory replies, one per session,
  ``reply_region.py``) count against one ``RegionBudget``
  (``max_reply_region_bytes``): a region over it is refused with an ERROR
  naming the limit, and that client is answered by frames; a session's
  region is unmapped when it disconnects.  Descriptors a client attaches to
  any other frame are closed at once;
- a request read from a client's region (flag REQUEST_SLOT,
  ``[ranker].shm_requests``) is copied out once, on arrival, into a buffer
  that counts against the same ``RequestBudget`` as a request read from
  the socket, and is held, and given back, the same way.

A peer's mistake (a bad header, a malformed payload, a stall) costs one
rate-limited warning line naming the client, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
import struct
import threading
from typing import Callable

import numpy as np

from flexemr.errors import ProtocolError, RequestError
from flexemr.wire import codec, replyslot, requestslot
from flexemr.wire.frame import ErrorCode, FrameType, pack_header
from flexemr.wire.replyslot import FdCatchingSocket
from flexemr.wire.stream import BudgetExceeded, FrameReader

from flexemrd.inference.budget import ByteBudget
from flexemrd.inference.admission import Admission, Work
from flexemrd.inference.replies import SocketReplies
from flexemrd.inference.reply_region import RegionBudget, RegionRefused, map_region
from flexemrd.peerlog import PeerWarnings

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")


@dataclasses.dataclass(frozen=True, slots=True)
class FrontendLimits:
    """What the socket front lets clients hold ([ranker] keys of the same names)."""

    max_clients: int = 256
    max_inflight_request_bytes: int = 1 << 30
    client_idle_timeout_s: float = 30.0
    max_reply_region_bytes: int = 1 << 30   # all clients' shared reply regions together; 0 turns them off
    shm_requests: bool = True               # clients may send requests through their region too


RequestBudget = ByteBudget   # bytes of client requests held, all sessions together


class _BudgetedReplies(SocketReplies):
    """A session's replies that give a request's bytes back to the budget once it is answered."""

    def __init__(self, sock: socket.socket, budget: RequestBudget, peer: str) -> None:
        super().__init__(sock)
        self.budget = budget
        self.peer = peer
        self._held: dict[int, int] = {}      # request id -> bytes it holds
        self._held_lock = threading.Lock()

    def hold(self, request_id: int, nbytes: int) -> None:
        with self._held_lock:
            prev = self._held.get(request_id, 0)   # a client reusing an id: both stay counted until answered
            self._held[request_id] = prev + nbytes

    def release(self, request_id: int) -> None:
        with self._held_lock:
            n = self._held.pop(request_id, 0)
        if n:
            self.budget.give(n)

    def release_all(self) -> None:
        with self._held_lock:
            n, self._held = sum(self._held.values()), {}
        if n:
            self.budget.give(n)

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None:
        try:
            super().scores(request_id, scores, version)
        finally:
            self.release(request_id)

    def pooled(self, request_id: int, names, pooled, version: int = 0) -> None:
        try:
            super().pooled(request_id, names, pooled, version)
        finally:
            self.release(request_id)

    def send_placed(self, request_id: int, placed) -> None:
        try:
            super().send_placed(request_id, placed)
        finally:
            self.release(request_id)

    def error(self, request_id: int, code: int, message: str) -> None:
        try:
            super().error(request_id, code, message)
        finally:
            self.release(request_id)


class SocketFrontend:
    def __init__(self, admission: Admission, submit: Callable[[Work], None], count_errors: Callable[[int], None],
                 max_request_bytes: int, limits: FrontendLimits = FrontendLimits()) -> None:
        self.admission = admission
        self.submit = submit
        self.count_errors = count_errors
        self.max_request_bytes = max_request_bytes
        self.limits = limits
        self.budget = RequestBudget(limits.max_inflight_request_bytes)
        self.regions = RegionBudget(limits.max_reply_region_bytes)
        self.accepting = True
        self.stop = threading.Event()
        self.listener: socket.socket | None = None
        self._sessions: set[SocketReplies] = set()
        self._thread: threading.Thread | None = None
        self._warn = PeerWarnings(logger)

    def start(self, listener: socket.socket) -> None:
        self.listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass

    def close_sessions(self) -> None:
        self.stop.set()
        for s in list(self._sessions):
            try:
                s.sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        assert self.listener is not None
        self.listener.settimeout(0.2)
        while not self.stop.is_set() and self.accepting:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.stop.is_set() or not self.accepting:
                    return
                # Out of descriptors: keep the sessions we have, try again shortly.
                logger.warning("cannot accept clients for now (%s)", e)
                self.stop.wait(0.5)
                continue
            sock.settimeout(None)
            peer = _peer_name(sock)
            if len(self._sessions) >= self.limits.max_clients:
                self._refuse(sock, peer)
                continue
            s = _BudgetedReplies(sock, self.budget, peer)
            self._sessions.add(s)
            threading.Thread(target=self._session_loop, args=(s,), daemon=True, name="session").start()

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        msg = (f"the ranker serves at most {self.limits.max_clients} clients at once ([ranker].max_clients); "
               "try again later")
        try:
            sock.setblocking(False)
            sock.send(b"".join(bytes(b) for b in codec.encode_error(0, ErrorCode.OVERLOADED, msg)))
            # Closing with unread bytes would reset the connection and could destroy the
            # ERROR frame before the client reads it: take what it already sent.
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
        self._warn.warn(peer, "too-many-clients", "refused: %s", msg)

    def _session_loop(self, s: _BudgetedReplies) -> None:
        # Reads keep the descriptors a client attaches (its reply region); see _serve_region.
        catcher = FdCatchingSocket(s.sock)
        reader = FrameReader(catcher, self.max_request_bytes,  # type: ignore[arg-type]
                             frame_timeout_s=self.limits.client_idle_timeout_s)
        try:
            while not self.stop.is_set():
                try:
                    h = reader.read_header()
                except ProtocolError as e:
                    fields = reader.raw_header_fields()
                    self.count_errors(1)
                    if fields[0] == b"FXMR" and fields[6] > self.max_request_bytes:
                        s.send(codec.encode_error(fields[5], ErrorCode.TOO_LARGE,
                                                  f"request of {fields[6]} bytes exceeds [ranker].max_request_bytes "
                                                  f"= {self.max_request_bytes}"))
                        reader.skip(fields[6])
                        continue
                    self._warn.warn(s.peer, "bad-header", "closing its connection: %s", e)
                    s.send(codec.encode_error(0, ErrorCode.BAD_FRAME, f"{e}; closing the connection"))
                    return
                # A fresh buffer per request (its arrays live on in the batch), grown as bytes arrive.
                try:
                    payload = reader.read_payload_growing(h, self.budget.take)
                except BudgetExceeded as e:
                    self.budget.give(e.reserved)
                    self.count_errors(1)
                    s.send(codec.encode_error(h.request_id, ErrorCode.OVERLOADED,
                                              f"the ranker holds {self.budget.limit} bytes of requests at most "
                                              f"([ranker].max_inflight_request_bytes) and is full: retry later"))
                    reader.skip(h.payload_len - e.got)
                    continue
                held = len(payload.obj)     # type: ignore[arg-type]
                s.hold(h.request_id, held)
                fds = catcher.take_fds() if catcher.fds else []
                if h.type == FrameType.REPLY_REGION:
                    self._serve_region(s, h, payload, fds)
                    continue
                _close_all(fds)   # attached to a frame that carries none: never kept
                self._serve(s, h, payload)
        except TimeoutError as e:
            self._warn.warn(s.peer, "slow-sender", "disconnected: %s ([ranker].client_idle_timeout_s)", e)
        except (ConnectionError, OSError):
            pass
        finally:
            s.alive = False
            _close_all(catcher.take_fds())
            if s.region is not None:
                s.region.close()
            s.release_all()
            self._sessions.discard(s)
            try:
                s.sock.close()
            except OSError:
                pass

    def _serve(self, s: _BudgetedReplies, h, payload: memoryview) -> None:
        """One whole frame: answer it here or hand it to the batcher (whose answer releases its bytes)."""
        if h.type == FrameType.PING:
            # A client offering a reply region (flag REPLY_SLOT) learns that this ranker maps them.
            accept = h.flags & replyslot.REPLY_SLOT and self.regions.limit > 0 and s.region is None
            flags = (replyslot.REPLY_SLOT | (requestslot.REQUEST_SLOT if self.limits.shm_requests else 0)) \
                if accept else 0
            s.send([pack_header(FrameType.PONG, h.request_id, 0, flags=flags)])
            s.release(h.request_id)
            return
        if not self.accepting:
            s.error(h.request_id, ErrorCode.UNAVAILABLE, "the ranker is shutting down")
            return
        try:
            slot = None
            if h.flags & replyslot.REPLY_SLOT:
                payload, slot = self._name_slot(s, h.request_id, payload)
            if h.flags & requestslot.REQUEST_SLOT:
                payload = self._from_region(s, h.request_id, payload, slot)
                if payload is None:
                    return
            work = self.admission.admit_frame(s, h.type, h.request_id, payload, h.aux)
        except (RequestError, ProtocolError) as e:
            self.count_errors(1)
            if isinstance(e, ProtocolError):
                self._warn.warn(s.peer, "bad-frame", "request %d refused: %s", h.request_id, e)
            s.error(h.request_id, ErrorCode.BAD_REQUEST, str(e))
            return
        if work is None:
            s.release(h.request_id)   # answered already (an empty batch)
        else:
            self.submit(work)

    @staticmethod
    def _name_slot(s: _BudgetedReplies, request_id: int,
                   payload: memoryview) -> tuple[memoryview, tuple[int, int] | None]:
        """Strip a request's reply-slot trailer and remember its slot (without a region: answer by frame)."""
        payload, offset, capacity = replyslot.split_slot_trailer(payload)
        if s.region is None:
            return payload, None
        replyslot.check_slot(offset, capacity, s.region.nbytes)
        s.name_slot(request_id, offset, capacity)
        return payload, (offset, capacity)

    def _from_region(self, s: _BudgetedReplies, request_id: int, descriptor: memoryview,
                     slot: tuple[int, int] | None) -> memoryview | None:
        """The request payload a REQUEST_SLOT descriptor points at, copied out of the client's region and
        held like a socket read; None when the request budget refused it (answered OVERLOADED here)."""
        region = s.region
        if region is None or not region.requests:
            raise ProtocolError("request flagged REQUEST_SLOT, but this connection has no shared region that "
                                "carries requests (send REPLY_REGION with flag REQUEST_SLOT first)")
        offset, nbytes = requestslot.decode_descriptor(descriptor)
        requestslot.check_span(offset, nbytes, region.nbytes, slot)
        if nbytes > self.max_request_bytes:
            raise ProtocolError(f"request of {nbytes} bytes in the shared region exceeds [ranker].max_request_bytes "
                                f"= {self.max_request_bytes}")
        if not self.budget.take(nbytes):
            self.count_errors(1)
            s.error(request_id, ErrorCode.OVERLOADED,
                    f"the ranker holds {self.budget.limit} bytes of requests at most "
                    f"([ranker].max_inflight_request_bytes) and is full: retry later")
            return None
        s.hold(request_id, nbytes)
        return region.read(offset, nbytes)

    def _serve_region(self, s: _BudgetedReplies, h, payload: memoryview, fds: list[int]) -> None:
        """A client's reply region: map it (bounded, checked) or answer an ERROR saying why; never fatal."""
        try:
            if s.region is not None:
                raise RegionRefused("this connection has a reply region already (one per connection)")
            try:
                declared = replyslot.decode_region(payload)
            except ProtocolError as e:
                raise RegionRefused(str(e)) from None
        except RegionRefused as e:
            _close_all(fds)
            self._refuse_region(s, h.request_id, e)
            return
        try:
            s.region = map_region(fds, declared, self.regions)   # closes fds, mapped or not
        except RegionRefused as e:
            self._refuse_region(s, h.request_id, e)
            return
        s.region.requests = bool(h.flags & requestslot.REQUEST_SLOT and self.limits.shm_requests)
        s.send(replyslot.encode_region(h.request_id, s.region.nbytes,
                                       requestslot.REQUEST_SLOT if s.region.requests else 0))
        s.release(h.request_id)

    def _refuse_region(self, s: _BudgetedReplies, request_id: int, e: RegionRefused) -> None:
        self.count_errors(1)
        if not e.overloaded:
            self._warn.warn(s.peer, "bad-region", "reply region refused: %s", e)
        s.error(request_id, ErrorCode.OVERLOADED if e.overloaded else ErrorCode.BAD_REQUEST, str(e))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _peer_name(sock: socket.socket) -> str:
    """``"pid P uid U"`` of a unix-socket client (what a log reader can look up)."""
    try:
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return f"client pid {pid} uid {uid}"
    except OSError:
        return "client"


def bind_unix_socket(path: str, mode: int = 0o660) -> socket.socket:
    """Bind the inference socket, replacing a stale socket left by a crash (never any other file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{path} exists and is not a socket: refusing to replace it "
                               "(remove it or set another [ranker].socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise RuntimeError(f"{path} is in use by a running ranker")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(256)
    return sock
