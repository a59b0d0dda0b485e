"""Command mailbox in the control segment: emrctl -> supervisor, one request at a time.

The mailbox area of the control segment (offset in the section table, see
:mod:`flexemr.control.block`) holds u64 words, then the request and response
buffers (length-prefixed by ``req_len`` / ``resp_len``, UTF-8 JSON)::

    area offset  word  field               written by  meaning
    -----------  ----  ------------------  ----------  -------------------------------------------
          0        0   holder_pid          client      pid holding the mutex (0 = none)
          8        1   holder_deadline_ns  client      CLOCK_MONOTONIC; the lease ends LEASE_GRACE_S after
         16        2   req_seq             client      sequence number of the last published request
         24        3   req_len             client      request bytes
         32        4   resp_seq            server      req_seq of the last answered request
         40        5   resp_len            server      response bytes
         48        6   served_total        server      requests answered
         56        7   broken_leases       server      mutexes taken back from dead/stuck clients
         64        8   req_capacity        creator     MAILBOX_REQUEST_BYTES
         72        9   resp_capacity       creator     MAILBOX_RESPONSE_BYTES
         80       10   server_pid          server      the process serving (0 = nobody yet)
       4096            request buffer      client
     4096+rq           response buffer     server

Three POSIX semaphores (``/flexemr.<inst>.ctl.{mutex,ready,done}``, created
with the segment): ``mutex`` (1) admits one client at a time, ``ready`` wakes
the server, ``done`` wakes the client.  One request::

    client                                            server (supervisor loop)
    acquire mutex (timeout) ; holder_pid, deadline
    wait until resp_seq == req_seq  (server idle, so the request buffer is ours)
    write request ; req_len ; req_seq = s+1  ──ready──▶ req_seq != resp_seq -> copy request
                                                        response = handler(request)
    wait on done until resp_seq == s+1       ◀──done─── write response ; resp_len ; resp_seq = req_seq
    copy response ; holder_pid = 0 ; release mutex

Failure modes this order handles:

* **A client killed mid-request** holds the mutex forever: the server takes it
  back (``broken_leases``) when the holder's pid is gone or its deadline plus
  LEASE_GRACE_S has passed, so the mailbox never wedges.
* **A client that timed out** leaves a request the server may still answer:
  the next client waits for that answer before writing (the server never reads
  a buffer being rewritten), and responses carry the request's sequence
  number, so a stale answer or a stale ``done`` post is skipped, never returned.
* **Lost or extra posts** on ``ready``: the server also looks for an
  unanswered ``req_seq`` whenever its wait times out, and ignores a wake-up
  with nothing pending.

Who may send commands: the daemon's own uid and root, and the kernel enforces
it.  Nothing a client writes here can prove who it is (a pid or uid in a word
is a claim anyone with write access could forge), so no sender is trusted by
what it writes: the control segment is 0640 and the three semaphores 0600
(:data:`~flexemr.control.layout.SEGMENT_MODE`), so only the segment's owner and
root can write a request or wake the server, while the daemon's group still
maps the segment read-only for ``emrctl status``.  :class:`MailboxClient`
checks first and raises :class:`CommandRefused` saying who is refused and who
is accepted.

The counters are written through numpy u64 views (one aligned store each) in
the order drawn above; x86-64 TSO keeps them in program order (see block.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import posix_ipc

from flexemr.control.block import (
    MAILBOX_HEADER_BYTES,
    ControlBlock,
    InstanceNotRunning,
    mailbox_semaphore_names,
    pid_alive,
)
from flexemr.errors import ControlError

logger = logging.getLogger(__name__)

HOLDER_PID, HOLDER_DEADLINE, REQ_SEQ, REQ_LEN, RESP_SEQ, RESP_LEN = 0, 1, 2, 3, 4, 5
SERVED_TOTAL, BROKEN_LEASES, REQ_CAPACITY, RESP_CAPACITY, SERVER_PID = 6, 7, 8, 9, 10
N_WORDS = 16

LEASE_GRACE_S = 2.0      # a live client past its own deadline + this is stuck (SIGSTOP, debugger)
ANON_HOLD_S = 10.0       # mutex held with no holder_pid recorded: died between acquire and store
DEFAULT_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Mapping[str, Any]]


class ControlTimeout(ControlError):
    """The daemon did not answer in time (or another client kept the mailbox busy)."""


class CommandRefused(ControlError):
    """This process may not send commands: only the daemon's own uid and root may."""


def refusal(owner_uid: int, euid: int | None = None) -> str:
    """``refused: emrctl runs as uid 1001, the daemon accepts commands from uid 0 only``."""
    me = os.geteuid() if euid is None else euid
    accepted = "uid 0 only" if owner_uid == 0 else f"uid {owner_uid} and root (uid 0) only"
    return f"refused: emrctl runs as uid {me}, the daemon accepts commands from {accepted}"


class _Area:
    """Views over the mailbox area of one control block."""

    def __init__(self, block: ControlBlock) -> None:
        self.block = block
        mm = block.mm
        off = block.mailbox_offset()
        self.mm = mm
        self.w = np.ndarray((N_WORDS,), dtype="<u8", buffer=mm, offset=off)
        self.req_cap = int(self.w[REQ_CAPACITY])
        self.resp_cap = int(self.w[RESP_CAPACITY])
        self.req_lo = off + MAILBOX_HEADER_BYTES
        self.resp_lo = self.req_lo + self.req_cap
        names = mailbox_semaphore_names(block.instance)
        try:
            self.mutex, self.ready, self.done = (posix_ipc.Semaphore(n) for n in names)
        except posix_ipc.ExistentialError:
            raise InstanceNotRunning(f"flexemr instance {block.instance!r} is not running "
                                     f"(mailbox semaphores {names[0]}... are gone)") from None
        except posix_ipc.PermissionsError:
            raise CommandRefused(refusal(block.owner_uid())) from None

    def close(self) -> None:
        for sem in (self.mutex, self.ready, self.done):
            try:
                sem.close()
            except posix_ipc.ExistentialError:
                pass
        del self.w


class MailboxServer:
    """Supervisor side: answers one request per :meth:`serve_one` call.

    Call it from the supervisor's main loop (``serve_one(dispatcher, 0.2)`` as
    the loop's sleep, or ``timeout=0`` from a tick) so handlers run on the
    supervisor's thread, never concurrently with its own state changes.
    """

    def __init__(self, block: ControlBlock) -> None:
        self._a = _Area(block)
        self._anon_since: int | None = None
        self._a.w[SERVER_PID] = os.getpid()

    def serve_one(self, handler: Handler, timeout: float | None = 0.0) -> bool:
        """Wait up to ``timeout`` s (None: forever) for a request, answer it; True if one was answered.

        ``handler`` gets the request dict and returns the response dict; an
        exception becomes ``{"status": "error", ...}``.  A signal interrupting
        the wait returns False at once so the caller's loop can handle it.
        """
        a = self._a
        try:
            a.ready.acquire(None if timeout is None else max(0.0, timeout))
        except posix_ipc.BusyError:
            pass  # still look for a request whose ready post was lost
        except posix_ipc.SignalError:
            return False
        self._recover_lease()
        w = a.w
        seq = int(w[REQ_SEQ])
        if seq == int(w[RESP_SEQ]):
            return False  # extra or stale wake-up: nothing pending
        length = int(w[REQ_LEN])
        response: Mapping[str, Any]
        if length > a.req_cap:
            response = {"status": "error", "error": f"request of {length} bytes exceeds {a.req_cap}"}
        else:
            raw = a.mm[a.req_lo:a.req_lo + length]
            try:
                request = json.loads(raw.decode())
                if not isinstance(request, dict):
                    raise ValueError(f"expected a JSON object, got {type(request).__name__}")
            except (UnicodeDecodeError, ValueError) as e:
                response = {"status": "error", "error": f"malformed request: {e}"}
            else:
                try:
                    response = handler(request)
                except Exception as e:  # the supervisor must survive any handler bug
                    logger.exception("mailbox handler failed on %r", request)
                    response = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        self._answer(seq, response)
        return True

    def _answer(self, seq: int, response: Mapping[str, Any]) -> None:
        a = self._a
        try:
            out = json.dumps(response, default=str).encode()
        except (TypeError, ValueError) as e:
            out = json.dumps({"status": "error", "error": f"response is not JSON: {e}"}).encode()
        if len(out) > a.resp_cap:
            out = json.dumps({"status": "error", "error": f"response of {len(out)} bytes exceeds the "
                                                          f"mailbox's {a.resp_cap}"}).encode()
        a.mm[a.resp_lo:a.resp_lo + len(out)] = out
        a.w[RESP_LEN] = len(out)
        a.w[SERVED_TOTAL] += 1
        a.w[RESP_SEQ] = seq  # publish last: the client reads the buffer only after this
        a.done.release()

    def _recover_lease(self) -> None:
        """Take the mutex back from a client that died or is stuck holding it."""
        a = self._a
        if a.mutex.value > 0:
            self._anon_since = None
            return
        w = a.w
        pid, deadline = int(w[HOLDER_PID]), int(w[HOLDER_DEADLINE])
        now = time.monotonic_ns()
        if pid:
            self._anon_since = None
            if pid_alive(pid) and now <= deadline + int(LEASE_GRACE_S * 1e9):
                return
            why = "exited" if not pid_alive(pid) else "overstayed its deadline"
        else:
            if self._anon_since is None:
                self._anon_since = now
                return
            if now - self._anon_since < ANON_HOLD_S * 1e9:
                return
            self._anon_since = None
            why = "never identified itself"
        logger.warning("control mailbox: taking the mutex back from client pid %d (%s)", pid, why)
        w[HOLDER_PID] = 0
        w[HOLDER_DEADLINE] = 0
        w[BROKEN_LEASES] += 1
        a.mutex.release()

    @property
    def served_total(self) -> int:
        return int(self._a.w[SERVED_TOTAL])

    def close(self) -> None:
        """Stop advertising this server and drop the semaphore handles."""
        if hasattr(self._a, "w"):
            if int(self._a.w[SERVER_PID]) == os.getpid():
                self._a.w[SERVER_PID] = 0
            self._a.close()


class MailboxClient:
    """emrctl side: :meth:`request` sends one command dict and returns the daemon's answer."""

    def __init__(self, block: ControlBlock) -> None:
        # Checked here, before touching the mailbox, so the refusal is a sentence rather than
        # EACCES; the kernel would refuse anyway (segment 0640, semaphores 0600).
        owner, me = block.owner_uid(), os.geteuid()
        if me not in (0, owner) or not block.writable:
            raise CommandRefused(refusal(owner, me))
        self._block = block
        self._a = _Area(block)

    def request(self, cmd: Mapping[str, Any] | Any, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Send ``cmd`` (a dict, or a command with ``to_dict()``) and wait for the response dict.

        Raises ControlTimeout (a ControlError) when the daemon does not answer
        within ``timeout`` seconds, InstanceNotRunning when its supervisor is gone.  Error results
        are returned, not raised: look at ``response["status"]``.
        """
        a, block = self._a, self._block
        if not block.supervisor_alive():
            raise InstanceNotRunning(
                f"flexemr instance {block.instance!r} is not running (supervisor pid {block.supervisor_pid} "
                f"is gone; stale control segment {block.name})")
        body = cmd.to_dict() if hasattr(cmd, "to_dict") else dict(cmd)
        payload = json.dumps(body).encode()
        if len(payload) > a.req_cap:
            raise ControlError(f"command of {len(payload)} bytes exceeds the mailbox's {a.req_cap}")
        start = time.monotonic()
        deadline = start + timeout
        me = os.getpid()
        if not _acquire(a.mutex, deadline):
            holder = int(a.w[HOLDER_PID])
            if holder and holder != me:
                raise ControlTimeout(f"the control mailbox of {block.instance!r} is busy (pid {holder} "
                                     f"is talking to the daemon); try again")
            raise ControlTimeout(self._no_answer(timeout))
        w = a.w
        w[HOLDER_DEADLINE] = int(deadline * 1e9)
        w[HOLDER_PID] = me
        try:
            # wait for the server to finish any earlier request: it may be reading the request buffer
            while int(w[RESP_SEQ]) != int(w[REQ_SEQ]):
                if time.monotonic() >= deadline:
                    raise ControlTimeout(self._no_answer(timeout))
                _acquire(a.done, min(deadline, time.monotonic() + 0.01))
            seq = int(w[REQ_SEQ]) + 1
            a.mm[a.req_lo:a.req_lo + len(payload)] = payload
            w[REQ_LEN] = len(payload)
            if int(w[HOLDER_PID]) != me:
                raise ControlError("the control mailbox was taken back from this client (it was stopped "
                                   "too long); try again")
            w[REQ_SEQ] = seq  # publish
            a.ready.release()
            while int(w[RESP_SEQ]) != seq:
                if not _acquire(a.done, deadline) and int(w[RESP_SEQ]) != seq:
                    raise ControlTimeout(self._no_answer(timeout))
                # woken by a stale post (an answer to an abandoned request): keep waiting for ours
            n = int(w[RESP_LEN])
            raw = a.mm[a.resp_lo:a.resp_lo + min(n, a.resp_cap)]
        finally:
            if int(w[HOLDER_PID]) == me:  # not if the server already took the lease back
                w[HOLDER_PID] = 0
                w[HOLDER_DEADLINE] = 0
                a.mutex.release()
        try:
            response = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise ControlError(f"the daemon sent a malformed response: {e}") from None
        if not isinstance(response, dict):
            raise ControlError(f"the daemon sent a {type(response).__name__}, not a JSON object")
        return response

    def _no_answer(self, timeout: float) -> str:
        msg = f"the daemon did not answer within {timeout:g} s"
        if int(self._a.w[SERVER_PID]) == 0:
            msg += " (it is not serving its command mailbox yet)"
        return msg

    def close(self) -> None:
        self._a.close()


def _acquire(sem: posix_ipc.Semaphore, deadline: float) -> bool:
    """Acquire ``sem`` before the monotonic ``deadline``; False on timeout (EINTR retried)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                sem.acquire(0)
                return True
            except posix_ipc.BusyError:
                return False
        try:
            sem.acquire(remaining)
            return True
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            continue  # a Python-level handler (SIGINT -> KeyboardInterrupt) has already run
