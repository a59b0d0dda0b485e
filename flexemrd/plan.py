"""The ranker host's plan: connections, owners, ring names, and the shared resources.

Resources (created and unlinked by the supervisor only):

    /flexemr.<inst>.ring.eNN.sub   submission ring of engine NN (inference -> engine)
    /flexemr.<inst>.ring.eNN.comp  completion ring of engine NN (engine -> inference)
    doorbell "completion"          one semaphore for all completion rings: the
                                   inference wakes once and scans every ring
    /flexemr.<inst>.ctl            control segment (status, command mailbox)

Connections: ``connections_per_server`` per embedding server, numbered in
server order; connection ``c`` starts in engine ``c % engines``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from flexemr import naming
from flexemr.config import Config
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RankerPlan:
    cfg: Config
    instance: str
    spec: ModelSpec
    routing: RoutingTable
    servers: list[str]                          # addresses, index = routing server id
    socket_path: str
    connections: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    owners: dict[int, int] = dataclasses.field(default_factory=dict)
    engine_cpus: list[int | None] = dataclasses.field(default_factory=list)
    token: str = ""                             # identifies this ranker run to the servers

    def __post_init__(self) -> None:
        self.token = self.token or f"{self.instance}.{os.getpid()}.{time.time_ns() & 0xFFFFFF:x}"
        r = self.cfg.ranker
        cid = 0
        for server, addr in enumerate(self.servers):
            for _ in range(r.connections_per_server):
                self.connections[cid] = (server, addr)
                self.owners[cid] = cid % r.engines
                cid += 1
        ncpu = os.cpu_count() or 1
        cpus = list(r.cpus) if r.cpus else list(range(ncpu))
        self.engine_cpus = [cpus[e % len(cpus)] for e in range(r.engines)]

    @property
    def engines(self) -> int:
        """Engine processes: none when the ranker holds the tables itself."""
        return self.cfg.ranker.engines if self.servers else 0

    def lock_name(self, cid: int) -> str:
        return naming.shm_name(self.instance, "lock", f"c{cid:03d}")

    @property
    def shared(self) -> bool:
        return self.cfg.ranker.mapping == "shared"

    def ring_names(self, engine: int) -> tuple[str, str]:
        return naming.ring_names(self.instance, engine)

    @property
    def doorbell_name(self) -> str:
        return naming.doorbell_name(self.instance, "completion")


class RankerResources:
    """Creates and unlinks the ranker's shared memory (supervisor only)."""

    def __init__(self, plan: RankerPlan) -> None:
        self.plan = plan
        self.rings: list = []
        self.doorbell = None
        self.locks: list = []

    def create(self) -> None:
        import posix_ipc

        from flexemr.control.block import semaphore_path
        from flexemr.ring import Doorbell, Ring
        from flexemr.ring.ring import RING_MODE

        p = self.plan
        if not p.engines:
            return
        if p.shared:
            for cid in p.connections:
                self.locks.append(posix_ipc.Semaphore(p.lock_name(cid), posix_ipc.O_CREX, mode=RING_MODE,
                                                      initial_value=1))
                os.chmod(semaphore_path(p.lock_name(cid)), RING_MODE)  # the mode we chose, not the umask's
        self.doorbell = Doorbell.create(p.doorbell_name)
        for e in range(p.engines):
            sub, comp = p.ring_names(e)
            self.rings.append(Ring.create(sub, p.cfg.ranker.ring_bytes))
            self.rings.append(Ring.create(comp, p.cfg.ranker.ring_bytes, doorbell=self.doorbell))

    def unlink(self) -> None:
        for r in self.rings:
            for fn in ("unlink", "close"):
                try:
                    getattr(r, fn)()
                except Exception:
                    pass
        self.rings = []
        for lock in self.locks:
            try:
                lock.unlink()
                lock.close()
            except Exception:
                pass
        self.locks = []
        if self.doorbell is not None:
            for fn in ("unlink", "close"):
                try:
                    getattr(self.doorbell, fn)()
                except Exception:
                    pass
            self.doorbell = None
        naming.unlink_instance_segments(self.plan.instance)
