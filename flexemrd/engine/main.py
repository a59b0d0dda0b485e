"""Process entry of an engine worker: attach the rings, connect, say READY, serve.

Runs in the forked child (the supervisor's ChildSpec target).  The engine's
loop depends on nothing of the control path: the current connection owners
are read once at boot (best effort: a restarted engine takes what the
runtime map gives it after migrations), and stats go out through ``publish``
on the engine's own publisher thread.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol

from flexemr.logs import setup_logging

if TYPE_CHECKING:
    from flexemrd.engine.stats import EngineStatsView
    from flexemrd.plan import RankerPlan

logger = logging.getLogger(__name__)


class Ready(Protocol):
    """What the engine needs of the supervisor's ReadyPipe (``beat`` is optional)."""

    def ready(self) -> None: ...


def current_owners(plan: RankerPlan) -> dict[int, int]:
    """Connection -> engine now: the control block's runtime map, or the plan's initial one without it."""
    try:
        from flexemr.control.block import ControlBlock

        with ControlBlock.attach(plan.instance, wait_s=0.0) as block:
            owners = block.runtime.read().owners
        return {c: owners[c] for c in plan.connections}
    except Exception:
        return dict(plan.owners)


def expected_shards(plan: RankerPlan) -> dict[int, list[tuple[int, int, int, int]]]:
    """server -> (table id, dim, start, end) of every shard routing sends it."""
    spec = plan.spec
    return {srv: [(spec.table_index(sh.table), spec.table(sh.table).dim, sh.start, sh.end)
                  for sh in plan.routing.shards_of(srv)] for srv in range(len(plan.servers))}


def engine_main(plan: RankerPlan, engine_id: int, ready: Ready,
                publish: Callable[[EngineStatsView], None] | None = None) -> None:
    setup_logging("engine", engine_id, plan.cfg.daemon.log_level)
    from flexemr.ring import Ring
    from flexemr.transport import select_transport

    from flexemrd.engine.engine import Engine
    from flexemrd.process import TermFlag

    sub_name, comp_name = plan.ring_names(engine_id)
    sub, comp = Ring.attach(sub_name), Ring.attach(comp_name)
    transport = select_transport(plan.cfg.ranker.transport)
    if plan.cfg.ranker.transport == "rdma":
        from flexemr.transport import verbs
        from flexemr.transport.rdma.landing import landing_bytes_for, landing_prefix

        # Responses land in shm segments the inference process reads in place (no copy here), sized
        # for the largest answer a server can send (a full batch of float32 partials of its tables).
        dims = [sum({t: d for t, d, _s, _e in shards}.values()) for shards in expected_shards(plan).values()]
        largest = 4 * plan.cfg.ranker.max_batch * max(dims, default=0)
        verbs.land_responses_in_shm(landing_prefix(plan.instance, engine_id), landing_bytes_for(largest))
    owned = [c for c, e in current_owners(plan).items() if e == engine_id]
    locks: dict[int, Any] | None = None
    if plan.shared:
        import posix_ipc

        locks = {cid: posix_ipc.Semaphore(plan.lock_name(cid)) for cid in plan.connections}
    r = plan.cfg.ranker
    # The supervisor's liveness heartbeat, where its ReadyPipe has one.
    heartbeat = getattr(ready, "beat", None)
    engine = Engine(engine_id, plan.instance, transport, sub, comp, plan.connections, owned, publish=publish,
                    credits=r.credits, credits_per_connection=r.credits_per_connection, token=plan.token,
                    expected_shards=expected_shards(plan), shared_locks=locks, n_engines=plan.engines,
                    heartbeat=heartbeat, secret=_secret(plan))
    term = TermFlag()
    threading.Thread(target=lambda: (term.wait(), engine.stop.set()), name="term", daemon=True).start()
    logger.info("owning connections %s; transport %s (each connection logs its own)", owned, transport.name)
    ready.ready()
    engine.run()


def _secret(plan: RankerPlan) -> bytes | None:
    """The shared secret the engine proves to embedding servers ([daemon].secret_file), or None."""
    from flexemr.auth import load_secret

    path = plan.cfg.daemon.secret_file
    return load_secret(path) if path else None
