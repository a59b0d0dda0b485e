"""Shared memory, semaphores and the inference socket get their mode explicitly, whatever the umask.

The inference socket is 0660 (the daemon's group runs clients).  The control
segment is 0640 (the group reads ``emrctl status``; only the daemon's uid and
root write, see test_hardening_mailbox.py) and its mailbox semaphores 0600.
Rings and their doorbells are 0600 (only the daemon's own processes map
them).  Each object is created under restrictive umasks (0o077 used to turn
0660 into 0600; 0o277 would leave even the owner unable to open a semaphore
for writing) and a permissive one (0, which must not widen anything), and its
mode is read back from the file system.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flexemr import naming
from flexemr.control.block import ControlBlock, mailbox_semaphore_names
from flexemr.ring.ring import Ring
from flexemrd.inference.frontend import bind_unix_socket

UMASKS = [0o077, 0o027, 0o277, 0o000]  # 0o277 would even take the owner's write bit


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _shm_mode(name: str) -> int:
    return stat.S_IMODE(os.stat(Path(naming.SHM_DIR) / name.lstrip("/")).st_mode)


def _sem_mode(name: str) -> int:
    return stat.S_IMODE(os.stat(Path(naming.SHM_DIR) / (naming.SEM_FILE_PREFIX + name.lstrip("/"))).st_mode)


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_control_segment_is_0640_and_mailbox_semaphores_0600(instance, mask):
    with umask(mask):
        block = ControlBlock.create(instance, 1, 1, ["t0"], {})
    try:
        assert oct(_shm_mode(naming.control_name(instance))) == oct(0o640)
        for sem in mailbox_semaphore_names(instance):
            assert oct(_sem_mode(sem)) == oct(0o600), sem
    finally:
        block.close()
        block.unlink()


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_rings_and_doorbells_are_owner_only(instance, mask):
    sub, _ = naming.ring_names(instance, 0)
    with umask(mask):
        ring = Ring.create(sub, 1 << 16, populate=False)
    try:
        assert oct(_shm_mode(sub)) == oct(0o600)
        for db in naming.ring_doorbell_names(sub):
            assert oct(_sem_mode(db)) == oct(0o600), db
    finally:
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_a_ring_created_for_the_group_is_0660(instance, mask):
    """The mode is a parameter, applied with fchmod: a umask can neither narrow nor widen it."""
    sub, _ = naming.ring_names(instance, 1)
    with umask(mask):
        ring = Ring.create(sub, 1 << 16, populate=False, mode=0o660)
    try:
        assert oct(_shm_mode(sub)) == oct(0o660)
        for db in naming.ring_doorbell_names(sub):
            assert oct(_sem_mode(db)) == oct(0o660), db
    finally:
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_inference_socket_is_0660(tmp_path, mask):
    path = str(tmp_path / "ranker.sock")
    with umask(mask):
        sock = bind_unix_socket(path)
    try:
        assert oct(stat.S_IMODE(os.stat(path).st_mode)) == oct(0o660)
    finally:
        sock.close()
        os.unlink(path)


def test_binding_the_socket_leaves_the_process_umask_alone(tmp_path):
    with umask(0o077):
        sock = bind_unix_socket(str(tmp_path / "s.sock"), 0o600)
        current = os.umask(0o077)
    sock.close()
    assert current == 0o077
    assert oct(stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode)) == oct(0o600)
