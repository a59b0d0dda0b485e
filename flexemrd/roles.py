"""What each worker process runs: the entry functions the supervisor forks into.

Each entry sets up logging for its role, builds its part, calls ``ready()``
once it serves, and returns when SIGTERM asks it to stop (after draining).
Heavy imports (torch) happen here, after the fork.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

from flexemr.config import Config
from flexemr.logs import setup_logging
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable, Shard

from flexemrd.process import ReadyPipe

logger = logging.getLogger(__name__)


def _stop_event_on_term() -> threading.Event:
    from flexemrd.process import TermFlag

    return TermFlag().event()


# ---------------------------------------------------------------- embedding server


@dataclasses.dataclass
class EmbeddingPlan:
    index: int
    model_dir: str
    spec: ModelSpec
    shards: list[Shard]
    listener: socket.socket
    threads: int
    max_payload: int
    log_level: str = "info"


def embedding_main(plan: EmbeddingPlan, ready: ReadyPipe) -> None:
    setup_logging("embedding", plan.index, plan.log_level)
    import torch

    from flexemrd.embedding import EmbeddingServer, EmbeddingStore

    torch.set_num_threads(max(1, plan.threads))
    stop = _stop_event_on_term()
    store = EmbeddingStore(plan.model_dir, plan.spec, plan.shards)
    server = EmbeddingServer(store, name=f"embedding[{plan.index}]", max_payload=plan.max_payload, sock=plan.listener)
    threading.Thread(target=lambda: (stop.wait(), server.stop()), daemon=True).start()
    rows = sum(s.end - s.start for s in plan.shards)
    logger.info("holding %d shards (%d rows) of %d tables", len(plan.shards), rows, len({s.table for s in plan.shards}))
    server.serve_forever(on_ready=ready.ready, heartbeat=ready.beat)


def embedding_plans(cfg: Config, spec: ModelSpec, routing: RoutingTable, listeners: list[socket.socket],
                    indices: list[int]) -> list[EmbeddingPlan]:
    return [
        EmbeddingPlan(i, cfg.daemon.model, spec, routing.shards_of(i), sock, cfg.embedding.threads,
                      cfg.embedding.max_payload, cfg.daemon.log_level)
        for i, sock in zip(indices, listeners)
    ]
