"""The only place flexemr builds names of shared-memory segments, semaphores and sockets.

Every POSIX IPC object of one daemon instance lives under the prefix
``/flexemr.<instance>.`` so that an instance can be listed, audited and cleaned
up by name alone (``emrctl``, tests, a supervisor recovering from a crash)::

    /flexemr.<instance>.ctl                    control segment (status + mailbox)
    /flexemr.<instance>.emb                    an embedding host's status (its servers' rankers)
    /flexemr.<instance>.ring.e03.sub           submission ring, inference -> engine 3
    /flexemr.<instance>.ring.e03.cmp           completion ring, engine 3 -> inference
    /flexemr.<instance>.ring.e03.sub.data      a ring's own data doorbell (semaphore)
    /flexemr.<instance>.ring.e03.sub.space     a ring's "space freed" doorbell (semaphore)
    /flexemr.<instance>.db.<what>              a doorbell shared by several rings

On Linux both kinds of object are files in /dev/shm: a segment ``/NAME`` is
``/dev/shm/NAME`` and a semaphore ``/NAME`` is ``/dev/shm/sem.NAME`` (glibc's
convention, which posix_ipc follows).  Segment and semaphore names therefore
never collide even when they are spelled the same.

Sockets live in :func:`runtime_dir`.
"""

from __future__ import annotations

import os
import re

import posix_ipc

PREFIX = "flexemr"
SHM_DIR = "/dev/shm"
SEM_FILE_PREFIX = "sem."  # glibc stores named semaphore "/x" as /dev/shm/sem.x
DEFAULT_INSTANCE = "default"
SYSTEM_RUNTIME_DIR = "/run/flexemr"

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PART_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# NAME_MAX is 255 in /dev/shm; keep room for the "sem." prefix and suffixes
# that ring_doorbell_names() appends to a ring's name.
_MAX_NAME = 200
# sizeof(sockaddr_un.sun_path) on Linux, including the terminating NUL.
_SUN_PATH_MAX = 108


def validate_instance(instance: str) -> str:
    """Return ``instance`` if it is a valid instance name, else raise ValueError saying why."""
    if not isinstance(instance, str):
        raise ValueError(f"instance name must be a str, got {type(instance).__name__}")
    if not instance:
        raise ValueError("instance name is empty (expected 1-32 characters of [A-Za-z0-9_-])")
    if len(instance) > 32:
        raise ValueError(f"instance name {instance!r} is {len(instance)} characters long (at most 32)")
    if not _INSTANCE_RE.fullmatch(instance):
        bad = sorted({c for c in instance if not re.fullmatch(r"[A-Za-z0-9_-]", c)})
        raise ValueError(
            f"instance name {instance!r} contains {''.join(bad)!r} (allowed: letters, digits, '_' and '-')"
        )
    return instance


def _validate_part(part: str) -> str:
    if not isinstance(part, str) or not _PART_RE.fullmatch(part):
        raise ValueError(f"name component {part!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return part


def shm_name(instance: str, *parts: str) -> str:
    """``/flexemr.<instance>.<part>.<part>...``: the POSIX name of a segment or semaphore."""
    validate_instance(instance)
    if not parts:
        raise ValueError("shm_name needs at least one component after the instance")
    name = "/" + ".".join((PREFIX, instance, *(_validate_part(p) for p in parts)))
    if len(name) > _MAX_NAME:
        raise ValueError(f"shared-memory name {name!r} is {len(name)} characters (at most {_MAX_NAME})")
    return name


def engine_tag(engine_id: int) -> str:
    """``e03``: the two-digit (or wider) tag of an engine in names."""
    if isinstance(engine_id, bool) or not isinstance(engine_id, int) or engine_id < 0:
        raise ValueError(f"engine id must be a non-negative int, got {engine_id!r}")
    return f"e{engine_id:02d}"


def ring_names(instance: str, engine_id: int) -> tuple[str, str]:
    """(submission, completion) ring names of one engine.

    Submission: inference -> engine (subrequests); completion: engine -> inference.
    """
    tag = engine_tag(engine_id)
    return shm_name(instance, "ring", tag, "sub"), shm_name(instance, "ring", tag, "cmp")


def ring_doorbell_names(ring_name: str) -> tuple[str, str]:
    """(data, space) semaphore names owned by the ring called ``ring_name``.

    ``data`` is rung by the producer when it publishes; ``space`` by the
    consumer when it frees room for a waiting producer.
    """
    if not ring_name.startswith("/" + PREFIX + "."):
        raise ValueError(f"ring name {ring_name!r} was not built by flexemr.naming")
    return ring_name + ".data", ring_name + ".space"


def doorbell_name(instance: str, what: str) -> str:
    """``/flexemr.<instance>.db.<what>``: a doorbell shared by several rings (e.g. ``cmp``)."""
    return shm_name(instance, "db", what)


def control_name(instance: str) -> str:
    """``/flexemr.<instance>.ctl``: the control segment."""
    return shm_name(instance, "ctl")


def embedding_status_name(instance: str) -> str:
    """``/flexemr.<instance>.emb``: an embedding host's status segment (which rankers each server serves)."""
    return shm_name(instance, "emb")


def runtime_dir() -> str:
    """Directory for sockets and pid files (not created here; see :func:`ensure_runtime_dir`).

    ``$FLEXEMR_RUNTIME_DIR`` if set; else ``/run/flexemr`` when it is (or could be
    created) writable, as under systemd's ``RuntimeDirectory=``; else
    ``$XDG_RUNTIME_DIR/flexemr``; else ``/tmp/flexemr-<uid>``.
    """
    env = os.environ.get("FLEXEMR_RUNTIME_DIR")
    if env:
        return env
    if os.path.isdir(SYSTEM_RUNTIME_DIR):
        if os.access(SYSTEM_RUNTIME_DIR, os.W_OK | os.X_OK):
            return SYSTEM_RUNTIME_DIR
    elif os.access(os.path.dirname(SYSTEM_RUNTIME_DIR), os.W_OK | os.X_OK):
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return os.path.join(xdg, PREFIX)
    return f"/tmp/{PREFIX}-{os.getuid()}"


def ensure_runtime_dir() -> str:
    """Create :func:`runtime_dir` (mode 0700 when we create it) and return it.

    A directory under /tmp is shared with other users, so refuse one that
    someone else owns instead of putting our sockets in it.
    """
    path = runtime_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if path.startswith("/tmp/") and st.st_uid != os.getuid():
        raise PermissionError(f"runtime directory {path} is owned by uid {st.st_uid}, not {os.getuid()}")
    return path


def local_secret_path(instance: str = DEFAULT_INSTANCE) -> str:
    """``<runtime_dir>/<instance>.secret``: the secret ``flexemrd local`` makes for its children."""
    validate_instance(instance)
    return os.path.join(runtime_dir(), f"{instance}.secret")


def default_socket(instance: str = DEFAULT_INSTANCE) -> str:
    """``<runtime_dir>/<instance>.sock``: the ranker's inference socket."""
    validate_instance(instance)
    path = os.path.join(runtime_dir(), f"{instance}.sock")
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise ValueError(
            f"socket path {path!r} is {len(os.fsencode(path))} bytes; unix sockets allow at most "
            f"{_SUN_PATH_MAX - 1} (set FLEXEMR_RUNTIME_DIR to a shorter directory)"
        )
    return path


def _instance_entries(instance: str) -> list[str]:
    validate_instance(instance)
    shm_prefix = f"{PREFIX}.{instance}."
    sem_prefix = SEM_FILE_PREFIX + shm_prefix
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(shm_prefix) or e.startswith(sem_prefix))


def list_instance_segments(instance: str) -> list[str]:
    """Entries of /dev/shm that belong to ``instance``, sorted.

    Segments appear as ``flexemr.<instance>.…`` and semaphores as
    ``sem.flexemr.<instance>.…``; the trailing dot keeps instance ``a`` from
    matching ``ab``.  Tests assert this is empty after cleanup.
    """
    return _instance_entries(instance)


def unlink_instance_segments(instance: str) -> list[str]:
    """Unlink every segment and semaphore of ``instance`` (stale ones after a crash).

    Only the supervisor (or a test) may call this: processes that still have
    the objects mapped keep them until they exit, but nobody can attach again.
    Returns the /dev/shm entries that were removed.
    """
    removed = []
    for entry in _instance_entries(instance):
        try:
            if entry.startswith(SEM_FILE_PREFIX):
                posix_ipc.unlink_semaphore("/" + entry[len(SEM_FILE_PREFIX):])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.ExistentialError:
            continue  # raced with another cleanup: already gone is what we want
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (EPERM means it exists but is not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
