"""The embedding server process: its plan (what the supervisor hands it) and its entry function.

``embedding_main`` sets up logging, maps the shards, wraps the listening
socket inherited from the supervisor in the transport's ``Listener`` (a unix
socket: shm, an inet one: TCP; see flexemr.transport.registry) and runs
the server's event loop until SIGTERM.  Heavy imports (torch) happen here,
after the fork, and only for the torch pooling kernel: with
``[embedding].kernel = "numpy"`` the process never imports torch (on an
emulated CPU that is most of its boot).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol

from flexemr.config import Config
from flexemr.logs import setup_logging
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable, Shard

if TYPE_CHECKING:
    from flexemrd.embedding.server import EmbeddingServer

__all__ = ["EmbeddingPlan", "embedding_main", "embedding_plans", "default_workers"]

logger = logging.getLogger(__name__)


class Ready(Protocol):
    """The child's end of its readiness pipe (flexemrd's ReadyPipe); ``beat()`` when it has one."""

    def ready(self) -> None: ...


@dataclasses.dataclass
class EmbeddingPlan:
    """What one embedding server process serves, and on which inherited listening socket."""

    index: int
    model_dir: str
    spec: ModelSpec
    shards: list[Shard]
    listener: socket.socket
    threads: int                 # torch intra-op threads per pooling call
    max_payload: int
    log_level: str = "info"
    max_connections: int = 256
    workers: int = 0             # pooling workers; 0 = default_workers() (set by embedding_plans)
    instance: str = ""           # with status_slot >= 0: publish this server's rankers in the host's
    status_slot: int = -1        # status segment (flexemr.control.embedding_status), slot status_slot
    secret_file: str = ""        # [daemon].secret_file: rankers must authenticate ("" = no authentication)
    kernel: str = "torch"        # [embedding].kernel: "torch" or "numpy" (flexemr.pooling.KERNELS)
    resident: bool = True        # tables held whole pool from huge-page copies while they fit (store.py)
    servers_here: int = 1        # servers started on this host: they share its copy budget


def default_workers(servers_here: int = 1) -> int:
    """Pooling workers per server when not configured: the cores of this host shared among the servers it
    runs, 1 to 8 each.  Pooling is CPU-bound (one torch thread per call): more workers than cores only make
    them take turns with each other and with the ranker (measured with ``flexemrd local``, 2 servers on 2
    cores: 1 worker each serves +11-14% predictions/s against 2 each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, servers_here)))


def embedding_main(plan: EmbeddingPlan, ready: Ready) -> None:
    setup_logging("embedding", plan.index, plan.log_level)
    from flexemr.malloc import retain_freed_memory

    # Pooling on the loop (one worker) allocates each answer's partials in the main arena, which glibc
    # trims after every free: 7% of a server's CPU went to faulting them back in (flexemr/malloc.py).
    retain_freed_memory()
    from flexemr.transport.registry import listener_from_socket
    from flexemrd.embedding.server import EmbeddingServer
    from flexemrd.embedding.store import EmbeddingStore

    if plan.kernel == "torch":
        import torch

        torch.set_num_threads(max(1, plan.threads))
    logger.info("pooling kernel: %s", plan.kernel)
    stop = _stop_event_on_term()
    from flexemr.auth import load_secret

    secret = load_secret(plan.secret_file) if plan.secret_file else None
    store = EmbeddingStore(plan.model_dir, plan.spec, plan.shards, kernel=plan.kernel,
                           resident=plan.resident, resident_share=plan.servers_here)
    if store.resident_tables:
        logger.info("%d tables pool from huge-page copies (%d MiB of copy budget left)", store.resident_tables,
                    store.resident_budget >> 20)
    listener = listener_from_socket(plan.listener, plan.max_payload)
    logger.info("listening on %s (transport %s)", listener.address,
                "shm" if plan.listener.family == socket.AF_UNIX else "tcp")
    beat = getattr(ready, "beat", None)
    if plan.status_slot >= 0:
        beat = _publishing_beat(lambda: server, plan, beat)   # called only once the server runs
    server = EmbeddingServer(
        store, listener, name=f"embedding[{plan.index}]", max_payload=plan.max_payload,
        max_connections=plan.max_connections, workers=plan.workers or default_workers(),
        beat=beat, secret=secret,
    )
    _stop_on(stop, server)
    if os.environ.get("FLEXEMR_RDMA_TEST_HOOKS") == "1":
        _break_qps_on_sigusr2()
    rows = sum(s.end - s.start for s in plan.shards)
    logger.info("holding %d shards (%d rows) of %d tables", len(plan.shards), rows, len({s.table for s in plan.shards}))
    server.serve_forever(on_ready=ready.ready)


def embedding_plans(cfg: Config, spec: ModelSpec, routing: RoutingTable, listeners: list[socket.socket],
                    indices: list[int]) -> list[EmbeddingPlan]:
    """One plan per (index, listening socket) pair of this host."""
    e = cfg.embedding
    workers = e.workers or default_workers(len(indices))
    return [
        EmbeddingPlan(i, cfg.daemon.model, spec, routing.shards_of(i), sock, e.threads, e.max_payload,
                      cfg.daemon.log_level, max_connections=e.max_connections, workers=workers,
                      secret_file=cfg.daemon.secret_file, kernel=e.kernel, servers_here=len(indices))
        for i, sock in zip(indices, listeners)
    ]


def _publishing_beat(get_server: Callable[[], EmbeddingServer], plan: EmbeddingPlan,
                     beat: Callable[[], None] | None) -> Callable[[], None]:
    """The loop's heartbeat, also publishing the server's rankers about once a second (on the loop thread,
    which owns the bookkeeping)."""
    from flexemrd.embedding.rankers import StatusPublisher

    def describe() -> dict[str, Any]:
        server = get_server()
        stats = server.stats
        return {"index": plan.index, "name": server.name, "address": str(server.address),
                "shards": len(plan.shards), "workers": server.workers, "lookups": stats["lookups"],
                "errors": stats["errors"], "bytes_in": stats["bytes_in"], "bytes_out": stats["bytes_out"],
                "pools": len(server.rankers.pools), "rankers": server.rankers.snapshot()}

    publisher = StatusPublisher(plan.instance, plan.status_slot, describe)

    def tick() -> None:
        if beat is not None:
            beat()
        publisher.maybe_publish()

    return tick


def _stop_event_on_term() -> threading.Event:
    from flexemrd.process import TermFlag

    return TermFlag().event()


def _break_qps_on_sigusr2() -> None:
    """TEST HOOK (FLEXEMR_RDMA_TEST_HOOKS=1, tests/rdma): SIGUSR2 forces this server's RDMA data QPs to ERR."""
    import signal

    from flexemr.transport.verbs import break_served_streams

    # On its own thread: the handler runs on the event loop's thread, between two
    # of its bytecodes, possibly inside a stream's critical section.
    signal.signal(signal.SIGUSR2, lambda *_: threading.Thread(target=break_served_streams, daemon=True,
                                                               name="break-qps").start())
    logger.warning("test hooks on: SIGUSR2 breaks this server's RDMA queue pairs")


def _stop_on(stop: threading.Event, server: EmbeddingServer) -> None:
    threading.Thread(target=lambda: (stop.wait(), server.stop()), daemon=True, name="stop-on-term").start()
