"""The on-disk record of one cluster: its hosts and a journal of what was made.

    /run/flexemr/cluster/NAME/          the cluster's directory (``$FLEXEMR_CLUSTER_DIR``/NAME)
        state.json                      this record, replaced atomically on every change
        e0.toml r0.toml ...             one config per host (configs.py)
        e0.log  r0.log  ...             each daemon's stdout and stderr
        r0.sock ...                     each ranker's inference socket

Every resource (namespace, veth, qdisc, cgroup, process, shared-memory
instance, directory) is appended to ``journal`` and saved *before* it is
created, so ``down`` can remove everything even after ``up`` was killed with
SIGKILL half-way: removing a resource that was never made is a no-op.  An
entry is marked ``removed`` once it is gone, so a ``down`` that was itself
interrupted can be run again.

Creating the cluster's directory (``os.mkdir``, atomic) is the lock that
makes a name usable by one ``up`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from emrctl.cluster.errors import EXIT_USAGE, ClusterError

VERSION = 1
DEFAULT_ROOT = "/run/flexemr/cluster"
STATE_FILE = "state.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,19}")


def root_dir() -> Path:
    """Where cluster records live: ``$FLEXEMR_CLUSTER_DIR`` or /run/flexemr/cluster."""
    return Path(os.environ.get("FLEXEMR_CLUSTER_DIR") or DEFAULT_ROOT)


def validate_name(name: str) -> str:
    """A cluster name becomes part of namespace and instance names: 1-20 of [A-Za-z0-9_-]."""
    if not _NAME_RE.fullmatch(name or ""):
        raise ClusterError(f"cluster name {name!r} must be 1-20 characters of [A-Za-z0-9_-], starting with a "
                           f"letter or digit", EXIT_USAGE)
    return name


def cluster_dir(name: str) -> Path:
    return root_dir() / validate_name(name)


@dataclasses.dataclass
class Host:
    """One simulated machine: a namespace, an address, a config and a daemon."""

    name: str               # "e0", "e1", ... embedding hosts; "r0", ... rankers
    role: str               # "embedding" or "ranker"
    index: int              # embedding: server id in routing; ranker: its number
    netns: str              # network namespace
    address: str            # its IPv4 address on the cluster's bridge
    link: str               # the bridge-side end of its veth pair (in the bridge namespace)
    instance: str           # flexemrd instance name (control segment, shm names)
    config: str             # TOML path
    log: str                # stdout + stderr of its daemon
    cgroup: str = ""        # cgroup v1 cpu directory ("" without one)
    port: int = 0           # embedding: listen port
    socket: str = ""        # ranker: inference socket (a unix socket reachable from the host)
    pid: int = 0            # the daemon's supervisor
    pid_start: float = 0.0  # its psutil create_time: a recycled pid is not ours
    state: str = "planned"  # planned, starting, running, stopped, failed


@dataclasses.dataclass
class ClusterState:
    """Everything ``status`` shows and ``down`` undoes, saved as JSON."""

    name: str
    subnet_index: int                      # the cluster owns 10.213.<subnet_index>.0/24
    model: str
    options: dict[str, Any]
    bridge_netns: str
    bridge: str
    hosts: list[Host] = dataclasses.field(default_factory=list)
    journal: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.time)
    phase: str = "creating"                # creating, up, stopping
    up_pid: int = 0                        # the `emrctl cluster up` creating it (down waits for no live one)
    up_pid_start: float = 0.0
    version: int = VERSION

    @property
    def dir(self) -> Path:
        return cluster_dir(self.name)

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def subnet(self) -> str:
        return f"10.213.{self.subnet_index}.0/24"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ClusterError(f"cluster {self.name!r} has no host {name!r} (hosts: "
                           f"{', '.join(h.name for h in self.hosts)})", EXIT_USAGE)

    def of_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    # ---------------------------------------------------------------- the journal

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append a resource about to be created and save: call this *before* creating it."""
        entry = {"kind": kind, "removed": False, **fields}
        self.journal.append(entry)
        self.save()
        return entry

    def pending(self, kind: str) -> list[dict[str, Any]]:
        """Entries of ``kind`` not yet removed, newest first (the order to undo them)."""
        return [e for e in reversed(self.journal) if e["kind"] == kind and not e["removed"]]

    def removed(self, entry: dict[str, Any]) -> None:
        entry["removed"] = True
        if self.dir.is_dir():
            self.save()

    # ---------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subnet"] = self.subnet
        return d

    def save(self) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old or the new record."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterState:
        fields = {f.name for f in dataclasses.fields(cls)}
        host_fields = {f.name for f in dataclasses.fields(Host)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["hosts"] = [Host(**{k: v for k, v in h.items() if k in host_fields}) for h in d.get("hosts", [])]
        return cls(**kw)

    @classmethod
    def load(cls, name: str) -> ClusterState:
        path = cluster_dir(name) / STATE_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster named {name!r} (no {path}); running: "
                               f"{', '.join(list_clusters()) or 'none'}") from None
        except (OSError, ValueError) as e:
            raise ClusterError(f"{path}: cannot read the cluster's state: {e}") from None
        if doc.get("version") != VERSION:
            raise ClusterError(f"{path}: state version {doc.get('version')!r}, this emrctl reads {VERSION}")
        return cls.from_dict(doc)


def list_clusters() -> list[str]:
    """Names of the clusters with a record on this machine."""
    root = root_dir()
    try:
        return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file())
    except FileNotFoundError:
        return []


def used_subnets() -> set[int]:
    out = set()
    for name in list_clusters():
        try:
            doc = json.loads((root_dir() / name / STATE_FILE).read_text())
            out.add(int(doc["subnet_index"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
