"""Drive fuzz frames through real connections and classify what comes back.

A fuzz connection sends keep-alive frames in pipelined batches (unique
``request_id`` each) and waits until every one is answered; now and then it
ends with a closing frame and checks the documented close.  Outcomes per
frame (docs/PROTOCOL.md, *Errors*):

- **answered**: a frame echoing its ``request_id`` arrived (an ERROR or a
  valid answer); for a closing frame: an ERROR then EOF (bad header,
  oversized), or EOF (a frame cut short by its sender);
- **unanswered**: the connection ended while the frame was waiting for its
  answer, with no ERROR explaining why;
- **hang**: nothing answered it within ``timeout_s``.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Callable

import psutil

from flexemr.wire.frame import HEADER, HEADER_SIZE, MAGIC, FrameType

from tests.fuzz.frames import FrameFactory


@dataclasses.dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    hangs: int = 0
    closes: int = 0
    connections: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)


class _Answers:
    """Reads answer frames from one socket into request ids (and whether an ERROR came)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def read(self, deadline: float) -> list[tuple[int, int]]:
        """(type, request_id) of the answers that arrived by ``deadline``; sets ``eof``."""
        out: list[tuple[int, int]] = []
        while not out and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                break
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
            while len(self.buf) >= HEADER_SIZE:
                magic, _v, ftype, _f, _a, rid, plen = HEADER.unpack_from(self.buf, 0)
                if magic != MAGIC:
                    raise AssertionError(f"answer with bad magic {bytes(magic)!r}")
                if len(self.buf) < HEADER_SIZE + plen:
                    break
                del self.buf[: HEADER_SIZE + plen]
                out.append((ftype, rid))
        return out


class Fuzzer:
    """``n_frames`` hostile frames over connections made by ``connect`` (which may authenticate)."""

    BATCH = 48
    CLOSE_EVERY = 12        # about one batch in this many ends with a closing frame

    def __init__(self, connect: Callable[[], socket.socket], factory: FrameFactory, tally: Tally,
                 timeout_s: float = 10.0) -> None:
        self.connect = connect
        self.factory = factory
        self.tally = tally
        self.timeout_s = timeout_s

    def run(self, n_frames: int) -> None:
        sent = 0
        rid = 1
        sock: socket.socket | None = None
        answers: _Answers | None = None
        while sent < n_frames:
            if sock is None:
                sock = self.connect()
                answers = _Answers(sock)
                self.tally.add(connections=1)
            assert answers is not None
            batch = min(self.BATCH, n_frames - sent)
            frames = []
            want = set()
            for _ in range(batch):
                frames.append(self.factory.keep_alive(rid))
                want.add(rid)
                rid += 1
            try:
                sock.sendall(b"".join(frames))
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent += batch
            self.tally.add(sent=batch)
            self._collect(answers, want, "keep-alive")
            if answers.eof or want:
                sock.close()
                sock = None
                continue
            if self.factory.rng.integers(self.CLOSE_EVERY) == 0 and sent < n_frames:
                kind, frame = self.factory.closing(rid)
                rid += 1
                sent += 1
                self.tally.add(sent=1, closes=1)
                self._close_with(sock, answers, kind, frame)
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def _collect(self, answers: _Answers, want: set[int], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while want and not answers.eof and time.monotonic() < deadline:
            for _ftype, rid in answers.read(deadline):
                if rid in want:
                    want.discard(rid)
                    self.tally.add(answered=1)
        if want and answers.eof:
            self.tally.add(unanswered=len(want))
            self.tally.problem(f"{what}: connection closed with {len(want)} frames unanswered")
        elif want:
            self.tally.add(hangs=len(want))
            self.tally.problem(f"{what}: {len(want)} frames not answered within {self.timeout_s} s")

    def _close_with(self, sock: socket.socket, answers: _Answers, kind: str, frame: bytes) -> None:
        try:
            sock.sendall(frame)
            if kind == "truncated":
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + self.timeout_s
        got_error = False
        while not answers.eof and time.monotonic() < deadline:
            for ftype, _rid in answers.read(deadline):
                got_error |= ftype == FrameType.ERROR
            if kind == "oversized" and got_error:
                break   # refused; the receiver would discard a payload we never send: hang up
        if kind == "truncated":
            ok = answers.eof   # any ERROR before it is fine too (the cut may have left a valid frame)
        elif kind == "oversized":
            ok = got_error
        else:
            ok = got_error and answers.eof
        if ok:
            self.tally.add(answered=1)
        elif answers.eof:
            self.tally.add(unanswered=1)
            self.tally.problem(f"{kind}: closed without the documented ERROR")
        else:
            self.tally.add(hangs=1)
            self.tally.problem(f"{kind}: no documented answer within {self.timeout_s} s")


def process_snapshot(root_pid: int) -> dict[int, tuple[str, int, int]]:
    """pid -> (name, RSS bytes, open fds) of ``root_pid`` and every descendant."""
    root = psutil.Process(root_pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[p.pid] = (p.name(), p.memory_info().rss, p.num_fds())
        except psutil.NoSuchProcess:
            pass
    return out


def growth_report(before: dict, after: dict) -> tuple[bool, int, int, list[str]]:
    """(pids unchanged, max RSS growth, max fd growth, one line per process)."""
    same = set(before) == set(after)
    lines, rss_max, fd_max = [], 0, 0
    for pid, (name, rss, fds) in sorted(before.items()):
        if pid not in after:
            lines.append(f"  {name} pid {pid}: GONE")
            continue
        _n, rss2, fds2 = after[pid]
        rss_max, fd_max = max(rss_max, rss2 - rss), max(fd_max, fds2 - fds)
        lines.append(f"  {name} pid {pid}: RSS {rss >> 20} -> {rss2 >> 20} MiB ({(rss2 - rss) / 2**20:+.1f}), "
                     f"fds {fds} -> {fds2} ({fds2 - fds:+d})")
    return same, rss_max, fd_max, lines


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """(type, aux, payload) of the next frame (blocking helper for handshakes and good clients)."""
    hdr = _exact(sock, HEADER_SIZE)
    _m, _v, ftype, _f, aux, _rid, plen = HEADER.unpack_from(hdr, 0)
    return ftype, aux, _exact(sock, plen)


def _exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


__all__ = ["Fuzzer", "Tally", "growth_report", "process_snapshot", "read_frame"]
