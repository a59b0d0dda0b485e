"""The inference service: frontend, admission, batcher, completions and finisher, composed.

Components are wired by constructor arguments and small callbacks; nothing
is patched in after construction.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from typing import Any, Callable

from flexemr.config import RankerConfig
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable

from flexemrd.inference.admission import Admission, Work
from flexemrd.inference.batch import Batch
from flexemrd.inference.batcher import Batcher, ControlRequest, LocalPooling
from flexemrd.inference.completions import Completions, MigrationListener
from flexemrd.inference.finisher import Finisher
from flexemrd.inference.health import ServerHealth
from flexemrd.inference.frontend import FrontendLimits, SocketFrontend
from flexemrd.inference.lookups import LookupEncoder
from flexemrd.inference.pending import PendingTable
from flexemrd.inference.stats import ServiceStats
from flexemrd.inference.submission import Submitter
from flexemrd.inference.versions import ModelVersions

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceOptions:
    max_batch: int = 4096
    max_wait_s: float = 0.001
    max_inflight: int = 4
    max_request_bytes: int = 256 << 20
    request_timeout_s: float = 30.0
    inband_credits: bool = False
    shared_mapping: bool = False
    hedging: bool = False
    hedge_quantile: float = 0.95
    hedge_min_s: float = 0.002
    max_ids: int = 0                  # ids in one request (0: no limit)
    allow_nonfinite: bool = False     # NaN/Inf dense features
    partials: str = "fp32"            # precision the servers' partials travel in ([ranker].partials)
    max_clients: int = 256            # the socket front's limits (frontend.FrontendLimits)
    max_inflight_request_bytes: int = 1 << 30
    client_idle_timeout_s: float = 30.0
    max_reply_region_bytes: int = 1 << 30
    shm_requests: bool = True

    @classmethod
    def from_config(cls, r: RankerConfig) -> "ServiceOptions":
        return cls(max_batch=r.max_batch, max_wait_s=r.max_wait_ms / 1e3, max_inflight=r.max_inflight_batches,
                   max_request_bytes=r.max_request_bytes, request_timeout_s=r.request_timeout_s,
                   inband_credits=r.credits == "inband", shared_mapping=r.mapping == "shared",
                   hedging=r.hedging and r.replicas > 1, hedge_quantile=r.hedge_quantile,
                   hedge_min_s=r.hedge_min_ms / 1e3, max_ids=r.max_ids_per_request,
                   allow_nonfinite=r.allow_nonfinite, partials=r.partials, max_clients=r.max_clients,
                   max_inflight_request_bytes=r.max_inflight_request_bytes,
                   client_idle_timeout_s=r.client_idle_timeout_s,
                   max_reply_region_bytes=r.max_reply_region_bytes, shm_requests=r.shm_requests)


@dataclasses.dataclass(slots=True)
class EngineLinks:
    """The rings to the engines and the connections they own."""

    submission: list
    completion: list
    doorbell: Any
    connections: dict[int, tuple[int, str]]    # conn -> (server, address)
    owners: dict[int, int]                     # conn -> engine at start
    reopen: frozenset[int] = frozenset()       # conns that migrate by reopening (registry.migrates_by_reopening)


class InferenceService:
    def __init__(self, spec: ModelSpec, routing: RoutingTable, model, options: ServiceOptions = ServiceOptions(),
                 links: EngineLinks | None = None, device: str = "cpu", cache=None,
                 local: LocalPooling | None = None, on_migrated: MigrationListener | None = None,
                 beat: Callable[[], None] = lambda: None) -> None:
        if links is None and local is None:
            raise ValueError("an inference service needs engines or a local pooler")
        self.spec = spec
        self.options = options
        self.cache = cache
        self.stats = ServiceStats(len(spec.tables))
        self.pending = PendingTable()
        self.inflight = threading.BoundedSemaphore(options.max_inflight)
        self.stop = threading.Event()
        self.versions = ModelVersions(model)
        self.device = device
        self.finisher = Finisher(spec, model, device, self.stats, self.inflight, versions=self.versions)
        self.submitter = None
        self.completions = None
        self.health = None
        lookups = LookupEncoder(spec, options.partials, options.inband_credits)   # first sends and copies alike
        if links is not None:
            self.health = ServerHealth(routing, links.connections)
            self.submitter = Submitter(links.submission, links.connections, links.owners,
                                       shared_mapping=options.shared_mapping, timeout_s=options.request_timeout_s,
                                       reopen=links.reopen)
            self.completions = Completions(links.completion, links.doorbell, self.pending, self.finisher.put,
                                           self.health, self.submitter, self.stats.failover,
                                           options.request_timeout_s, lookups, cache=cache,
                                           on_migrated=on_migrated, hedging=options.hedging,
                                           hedge_quantile=options.hedge_quantile, hedge_min_s=options.hedge_min_s,
                                           beat=beat)
        self.batcher = Batcher(spec, routing, self.submitter, self.pending, self.finisher.put, self.finisher.fail,
                               self.stats, self.inflight, options.max_batch, options.max_wait_s, cache=cache,
                               local=local, inband_credits=options.inband_credits, health=self.health,
                               partials=options.partials, versions=self.versions, lookups=lookups,
                               beat=beat if links is None else (lambda: None))
        self.admission = Admission(spec, options.request_timeout_s, max_batch=options.max_batch,
                                   max_ids=options.max_ids or None, allow_nonfinite=options.allow_nonfinite)
        self.frontend = SocketFrontend(self.admission, self.submit, self.stats.add_errors, options.max_request_bytes,
                                       FrontendLimits(options.max_clients, options.max_inflight_request_bytes,
                                                      options.client_idle_timeout_s,
                                                      options.max_reply_region_bytes, options.shm_requests))
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self, listener: socket.socket | None) -> None:
        loops: list[tuple[str, Callable[[], None]]] = [("batcher", self.batcher.run), ("finisher", self.finisher.run)]
        if self.completions is not None:
            loops.append(("completion", lambda: self.completions.run(self.stop)))
        for name, fn in loops:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if listener is not None:
            self.frontend.start(listener)

    def drain_and_stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer everything already accepted, then stop."""
        self.frontend.stop_accepting()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pending and self.batcher.idle() and self.finisher.queue.empty() \
                    and self.inflight._value == self.inflight._initial_value:  # type: ignore[attr-defined]
                break
            time.sleep(0.005)
        self.stop.set()
        self.batcher.stop.set()
        self.batcher.queue.put(None)
        self.finisher.queue.put(None)
        for t in self._threads:
            t.join(2)
        self.frontend.close_sessions()

    # ---------------------------------------------------------------- data path entry

    def submit(self, work: Work) -> None:
        self.batcher.queue.put(work)

    # ---------------------------------------------------------------- control entry

    def post_control(self, request: ControlRequest) -> None:
        """Run ``request(batcher)`` on the batcher thread, between batches."""
        self.batcher.controls.put(request)

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot(self.pending.batches())
        f = self.stats.failover
        snap["failover"] = {"reissued": f.reissued, "hedges_sent": f.hedges_sent, "hedges_won": f.hedges_won,
                            "failovers": self.health.failovers if self.health else 0}
        snap["servers"] = self.health.snapshot() if self.health else []
        return snap


__all__ = ["Batch", "EngineLinks", "InferenceService", "ServiceOptions"]
