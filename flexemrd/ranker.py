"""The ranker host: shared resources, engine and inference entry points.

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
import threading
import time

from flexemr import naming
from flexemr.config import Config
from flexemr.logs import setup_logging
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable

from flexemrd.engine.main import engine_main  # noqa: F401  (hosts.py imports it from here)
from flexemrd.supervisor import ReadyPipe

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

        from flexemr.ring import Doorbell, Ring

        p = self.plan
        if not p.engines:
            return
        if p.shared:
            for cid in p.connections:
                self.locks.append(posix_ipc.Semaphore(p.lock_name(cid), posix_ipc.O_CREX, initial_value=1))
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


def inference_main(plan: RankerPlan, ready: ReadyPipe, hooks=None) -> None:
    setup_logging("inference", None, plan.cfg.daemon.log_level)
    import torch

    from flexemr.model.dense import load_dense
    from flexemr.ring import Doorbell, Ring

    from flexemrd.inference import InferenceService, bind_unix_socket

    r = plan.cfg.ranker
    if r.torch_threads:
        torch.set_num_threads(r.torch_threads)
    device = r.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("neural network on %s (%s)", device,
                torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} threads")
    model = load_dense(plan.cfg.daemon.model, plan.spec).to(device)
    subs = [Ring.attach(plan.ring_names(e)[0]) for e in range(plan.engines)]
    comps = [Ring.attach(plan.ring_names(e)[1]) for e in range(plan.engines)]
    doorbell = Doorbell.attach(plan.doorbell_name) if plan.engines else None
    local_pooler = None
    if not plan.servers:
        from flexemr.model.tables import open_tables

        from flexemrd.batching import LocalPooler

        local_pooler = LocalPooler(plan.spec, open_tables(plan.cfg.daemon.model, plan.spec))
        logger.info("no embedding servers: pooling %d tables in this process (monolithic layout)",
                    len(plan.spec.tables))
    cache = None
    if plan.servers:  # built even when "off", so emrctl can switch it on at runtime
        from flexemrd.cache_glue import RankerCache

        cache = RankerCache(plan.spec, plan.routing, plan.cfg.cache, device=device, max_batch=r.max_batch)
    svc = InferenceService(
        plan.spec, plan.routing, plan.connections, plan.owners, subs, comps, doorbell,
        dense_model=model, device=device, max_batch=r.max_batch, max_wait_s=r.max_wait_ms / 1e3,
        max_inflight=r.max_inflight_batches, max_request_bytes=r.max_request_bytes,
        inband_credits=r.credits == "inband", shared_mapping=plan.shared, local_pooler=local_pooler,
        cache=cache,
    )
    if hooks is not None:
        hooks(svc)
    from flexemrd.procutil import TermFlag

    term = TermFlag()
    listener = bind_unix_socket(plan.socket_path, r.socket_mode)
    svc.start(listener)
    logger.info("serving %s (max_batch=%d, max_wait=%.1f ms)", plan.socket_path, r.max_batch, r.max_wait_ms)
    ready.ready()
    term.wait(poll_s=0.1)
    logger.info("draining")
    t0 = time.monotonic()
    svc.drain_and_stop(plan.cfg.daemon.graceful_timeout_s)
    try:
        os.unlink(plan.socket_path)
    except FileNotFoundError:
        pass
    logger.info("drained in %.2f s", time.monotonic() - t0)
