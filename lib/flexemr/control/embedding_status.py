"""The embedding host's status segment: one seqlocked JSON document per embedding server process.

An embedding host has no control segment (it takes no commands); what an
operator wants from it is which rankers each server serves.  The supervisor
creates ``/flexemr.<instance>.emb`` (:func:`flexemr.naming.embedding_status_name`)
before it forks and unlinks it when it stops; each embedding server writes its
own slot about once a second; ``emrctl status`` reads every slot::

    offset  size  field
    0       8     magic  b"FXEMBST\\x01" (stored last: an attacher that sees it sees a whole header)
    8       4     version (u32, little endian)
    12      4     n_slots (u32)
    16      8     slot_bytes (u64)
    24      8     supervisor pid (u64)
    32      8     created, unix ns (u64)
    64 + i * slot_bytes   slot i:
        +0  8     generation (u64): odd while its writer is rewriting the document
        +8  8     length of the JSON document (u64)
        +64 ...   compact JSON, at most slot_bytes - 64 bytes

One writer per slot (the server process of that index), so the generation
word is a seqlock: writer ``gen = g+1 ; store bytes, length ; gen = g+2``;
reader ``g1 = gen ; odd -> retry ; copy ; gen == g1 or retry``.  The same
x86-64 ordering argument as :mod:`flexemr.control.seqlock` applies.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import posix_ipc

from flexemr import naming
from flexemr.control.block import InstanceNotRunning, pid_alive
from flexemr.control.seqlock import load_blob, store_blob
from flexemr.errors import ControlError

__all__ = ["DEFAULT_SLOT_BYTES", "EmbeddingStatusArea", "unlink_embedding_status"]

MAGIC = b"FXEMBST\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")
HEADER_BYTES = 64
SLOT_DATA_OFF = 64
DEFAULT_SLOT_BYTES = 64 << 10   # ~200 rankers at ~300 bytes each
SEGMENT_MODE = 0o644            # like the control segment's status: readable by anyone on the host


class EmbeddingStatusArea:
    """The mapped segment: ``write(slot, doc)`` from a server, ``read_all()`` from emrctl."""

    def __init__(self, instance: str, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.instance, self.name, self.owner = instance, name, owner
        self._mm: mmap.mmap | None = mm
        _, _, self.n_slots, self.slot_bytes, self.supervisor_pid, self.created_ns = HEADER.unpack_from(mm, 0)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, instance: str, n_slots: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> EmbeddingStatusArea:
        """Supervisor side: create the segment (replacing one a dead supervisor left)."""
        if n_slots < 1 or slot_bytes < 4096:
            raise ValueError(f"need n_slots >= 1 and slot_bytes >= 4096, got {n_slots}, {slot_bytes}")
        name = naming.embedding_status_name(instance)
        _remove_stale(instance, name)
        total = HEADER_BYTES + n_slots * slot_bytes
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=SEGMENT_MODE, size=total)
        except posix_ipc.ExistentialError:
            raise ControlError(f"embedding status segment {name} appeared while creating it: another "
                               f"supervisor of instance {instance!r} is starting") from None
        try:
            os.fchmod(shm.fd, SEGMENT_MODE)   # exactly, whatever the umask
            mm = mmap.mmap(shm.fd, total)
        except BaseException:
            posix_ipc.unlink_shared_memory(name)
            raise
        finally:
            shm.close_fd()
        HEADER.pack_into(mm, 0, b"\0" * 8, VERSION, n_slots, slot_bytes, os.getpid(), time.time_ns())
        mm[0:8] = MAGIC
        return cls(instance, name, mm, owner=True)

    @classmethod
    def attach(cls, instance: str, writable: bool = False) -> EmbeddingStatusArea:
        """Map an existing segment; :class:`InstanceNotRunning` when there is none."""
        name = naming.embedding_status_name(instance)
        try:
            shm = posix_ipc.SharedMemory(name, read_only=not writable)
        except posix_ipc.ExistentialError:
            raise InstanceNotRunning(f"flexemr instance {instance!r} is not running "
                                     f"(no embedding status segment {name})") from None
        except posix_ipc.PermissionsError:
            raise ControlError(f"permission denied opening {name}: run as the daemon's user or root") from None
        try:
            if shm.size < HEADER_BYTES:
                raise ControlError(f"{name} is {shm.size} bytes: not a flexemr embedding status segment")
            mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            shm.close_fd()
        if mm[0:8] != MAGIC or struct.unpack_from("<I", mm, 8)[0] != VERSION:
            mm.close()
            raise ControlError(f"{name} is not an embedding status segment of version {VERSION} "
                               f"(use emrctl from the daemon's install)")
        area = cls(instance, name, mm, owner=False)
        if HEADER_BYTES + area.n_slots * area.slot_bytes > len(mm):
            area.close()
            raise ControlError(f"{name} is shorter than its header says")
        return area

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def unlink(self) -> None:
        unlink_embedding_status(self.instance)

    def __enter__(self) -> EmbeddingStatusArea:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def supervisor_alive(self) -> bool:
        return pid_alive(int(self.supervisor_pid))

    def uptime_s(self) -> float:
        return max(0.0, (time.time_ns() - int(self.created_ns)) / 1e9)

    # ------------------------------------------------------------------ slots

    def _words(self, slot: int) -> tuple[mmap.mmap, np.ndarray, int]:
        if self._mm is None:
            raise ControlError(f"{self.name} is closed")
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.n_slots - 1} of {self.name}")
        off = HEADER_BYTES + slot * self.slot_bytes
        return self._mm, np.ndarray((2,), dtype="<u8", buffer=self._mm, offset=off), off + SLOT_DATA_OFF

    def write(self, slot: int, doc: Mapping[str, Any]) -> None:
        """Replace slot ``slot``'s document (its one writer only); too big a document is an error."""
        data = json.dumps(dict(doc), separators=(",", ":")).encode()
        cap = self.slot_bytes - SLOT_DATA_OFF
        if len(data) > cap:
            raise ValueError(f"status document of {len(data)} bytes does not fit slot {slot} ({cap} bytes)")
        store_blob(*self._words(slot), data)

    def read(self, slot: int) -> dict[str, Any] | None:
        """Slot ``slot``'s document, None before its server first wrote it."""
        g1, data = load_blob(*self._words(slot), self.slot_bytes - SLOT_DATA_OFF, f"{self.name}: slot {slot}")
        if g1 == 0:
            return None
        return json.loads(data.decode())

    def read_all(self) -> list[dict[str, Any] | None]:
        return [self.read(i) for i in range(self.n_slots)]

    def snapshot(self) -> dict[str, Any]:
        """The embedding host's status JSON (``emrctl status --json``): its servers, each with its rankers.

        A server that has not published yet (booting, or restarting) is listed
        with ``state`` ``"starting"`` and no rankers; ``updated_age_s`` says how
        old each document is (a server publishes about once a second).
        """
        now = time.time()
        servers = []
        for slot, doc in enumerate(self.read_all()):
            if doc is None:
                servers.append({"slot": slot, "state": "starting", "rankers": []})
                continue
            doc = dict(doc, slot=slot)
            doc["updated_age_s"] = round(max(0.0, now - float(doc.get("updated_unix", now))), 3)
            doc["state"] = "serving" if doc["updated_age_s"] < 5.0 else "stale"
            servers.append(doc)
        return {"instance": self.instance, "role": "embedding", "supervisor_pid": int(self.supervisor_pid),
                "uptime_s": round(self.uptime_s(), 3), "servers": servers}


def unlink_embedding_status(instance: str) -> None:
    """Remove the segment of ``instance`` (a missing one is fine)."""
    try:
        posix_ipc.unlink_shared_memory(naming.embedding_status_name(instance))
    except posix_ipc.ExistentialError:
        pass


def _remove_stale(instance: str, name: str) -> None:
    """Unlink a segment left by a dead supervisor; refuse to replace a live one."""
    try:
        old = EmbeddingStatusArea.attach(instance)
    except InstanceNotRunning:
        return
    except ControlError:
        unlink_embedding_status(instance)   # unreadable: nobody can use it
        return
    try:
        pid = int(old.supervisor_pid)
        if pid != os.getpid() and pid_alive(pid):
            raise ControlError(f"flexemr instance {instance!r} is already running (supervisor pid {pid} owns {name})")
    finally:
        old.close()
    unlink_embedding_status(instance)
