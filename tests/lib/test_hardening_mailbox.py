"""Control commands only from the daemon's own uid (or root); the kernel enforces it, emrctl says so.

The mailbox cannot learn a sender's uid through shared memory, and anything a
client writes there (a pid, a uid) is a claim it could forge.  So the kernel
decides who may write: the control segment is 0640 (the daemon's group reads
status, only the owner writes the runtime area and the mailbox) and the
mailbox semaphores are 0600.  emrctl checks first and says why it refuses.

These tests run real processes as uid/gid 65534 (nobody/nogroup): forked from
this (root) process and switched with setgid/setuid, because the interpreter
under /root is not reachable by another uid after an exec.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from emrctl.cli import EXIT_FAILED, cli
from flexemr import naming
from flexemr.control.block import ControlBlock, mailbox_semaphore_names
from flexemr.control.mailbox import CommandRefused, MailboxClient, MailboxServer

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def run_as(uid: int, gid: int, fn: Callable[[], int]) -> tuple[int, str]:
    """Run ``fn`` in a forked child as ``uid``/``gid``; (its exit code, its stdout+stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 70
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            # pytest's capture replaced sys.stdout/err: point them back at the real fds
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = fn()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - report anything, then leave
            os.write(2, f"child raised {type(e).__name__}: {e}\n".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def emrctl(*args: str) -> Callable[[], int]:
    def main() -> int:
        cli.main(args=list(args), prog_name="emrctl", standalone_mode=True)
        return 0
    return main


@pytest.fixture
def served(instance) -> Iterator[tuple[ControlBlock, list[dict[str, Any]]]]:
    """A control block owned by root, group nogroup (the daemon's group here), and a server recording requests."""
    block = ControlBlock.create(instance, 1, 1, ["t0"], {"instance": instance})
    os.chown(Path(naming.SHM_DIR) / naming.control_name(instance).lstrip("/"), -1, NOBODY)
    seen: list[dict[str, Any]] = []
    server = MailboxServer(block)
    stop = threading.Event()

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {"status": "ok", "message": "done"}

    def loop() -> None:
        while not stop.is_set():
            server.serve_one(handler, 0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield block, seen
    stop.set()
    t.join(5)
    server.close()
    block.close()
    block.unlink()


def test_emrctl_as_another_uid_is_refused_and_says_why(served, instance):
    block, seen = served
    code, out = run_as(NOBODY, NOBODY, emrctl("--instance", instance, "shutdown"))
    assert code == EXIT_FAILED, out
    assert f"refused: emrctl runs as uid {NOBODY}, the daemon accepts commands from uid 0 only" in out
    assert seen == []
    # root (the daemon's own uid here) is still served
    code, out = run_as(0, 0, emrctl("--instance", instance, "reload"))
    assert code == 0, out
    assert seen == [{"cmd": "reload"}]


def test_the_group_still_reads_status(served, instance):
    code, out = run_as(NOBODY, NOBODY, emrctl("--instance", instance, "status", "--json"))
    assert code == 0, out
    assert json.loads(out)["engines"][0]["id"] == 0


def test_a_client_that_bypasses_emrctl_cannot_write_the_segment_or_the_semaphores(served, instance):
    """The refusal is the kernel's: a hand-written client gets EACCES, whatever it would claim."""
    block, seen = served

    def attack() -> int:
        refused = 0
        try:
            posix_ipc.SharedMemory(naming.control_name(instance))  # read-write
        except posix_ipc.PermissionsError:
            refused += 1
        for name in mailbox_semaphore_names(instance):
            try:
                posix_ipc.Semaphore(name)
            except posix_ipc.PermissionsError:
                refused += 1
        try:
            MailboxClient(ControlBlock.attach(instance))
        except CommandRefused:
            refused += 1
        return refused

    code, out = run_as(NOBODY, NOBODY, attack)
    assert code == 5, out
    assert seen == []


def test_a_uid_outside_the_group_cannot_even_read_status(served, instance):
    code, out = run_as(NOBODY, NOBODY - 1, emrctl("--instance", instance, "status"))
    assert code != 0
    assert "permission" in out.lower(), out


def test_the_daemons_own_uid_is_served_and_others_are_told_who_is(served, instance):
    """A daemon running as uid 65534 (its segment and semaphores are that uid's) serves that uid."""
    block, seen = served
    os.chown(Path(naming.SHM_DIR) / naming.control_name(instance).lstrip("/"), NOBODY, NOBODY)
    for sem in mailbox_semaphore_names(instance):
        os.chown(Path(naming.SHM_DIR) / (naming.SEM_FILE_PREFIX + sem.lstrip("/")), NOBODY, NOBODY)
    code, out = run_as(NOBODY, NOBODY, emrctl("--instance", instance, "rebalance", "off"))
    assert code == 0, out
    assert seen == [{"cmd": "rebalance", "enabled": False}]
    code, out = run_as(1001, NOBODY, emrctl("--instance", instance, "reload"))
    assert code == EXIT_FAILED, out
    assert ("refused: emrctl runs as uid 1001, the daemon accepts commands from uid 65534 and root (uid 0) only"
            in out)
    assert len(seen) == 1
