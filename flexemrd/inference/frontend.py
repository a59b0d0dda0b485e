"""The unix-socket front: accept clients, read their frames, hand them to admission.

One thread per client session reads frames (clients are few and long-lived:
one connection per client thread); replies come from the finisher through
the session's ``SocketReplies``.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from typing import Callable

from flexemr.errors import ProtocolError, RequestError
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType
from flexemr.wire.stream import FrameReader

from flexemrd.inference.admission import Admission, Work
from flexemrd.inference.replies import SocketReplies

logger = logging.getLogger(__name__)


class SocketFrontend:
    def __init__(self, admission: Admission, submit: Callable[[Work], None], count_errors: Callable[[int], None],
                 max_request_bytes: int) -> None:
        self.admission = admission
        self.submit = submit
        self.count_errors = count_errors
        self.max_request_bytes = max_request_bytes
        self.accepting = True
        self.stop = threading.Event()
        self.listener: socket.socket | None = None
        self._sessions: set[SocketReplies] = set()
        self._thread: threading.Thread | None = None

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
            except OSError:
                return
            sock.settimeout(None)
            s = SocketReplies(sock)
            self._sessions.add(s)
            threading.Thread(target=self._session_loop, args=(s,), daemon=True, name="session").start()

    def _session_loop(self, s: SocketReplies) -> None:
        reader = FrameReader(s.sock, self.max_request_bytes)
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
                    s.send(codec.encode_error(0, ErrorCode.BAD_FRAME, f"{e}; closing the connection"))
                    return
                # A fresh buffer per request: its arrays live on in the batch.
                payload = reader.read_payload_owned(h)
                if h.type == FrameType.PING:
                    s.send([codec.pack_header(FrameType.PONG, h.request_id, 0)])
                    continue
                if not self.accepting:
                    s.error(h.request_id, ErrorCode.UNAVAILABLE, "the ranker is shutting down")
                    continue
                try:
                    work = self.admission.admit_frame(s, h.type, h.request_id, payload, h.aux)
                except (RequestError, ProtocolError) as e:
                    self.count_errors(1)
                    s.error(h.request_id, ErrorCode.BAD_REQUEST, str(e))
                    continue
                if work is not None:
                    self.submit(work)
        except (ConnectionError, OSError):
            pass
        finally:
            s.alive = False
            self._sessions.discard(s)
            try:
                s.sock.close()
            except OSError:
                pass


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
