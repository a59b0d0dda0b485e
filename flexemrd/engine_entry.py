"""Engine process entry (temporary home until flexemrd/engine/ lands)."""

from __future__ import annotations

import logging
import threading

from flexemr.logs import setup_logging

from flexemrd.plan import RankerPlan, current_owners

logger = logging.getLogger(__name__)


def engine_main(plan: RankerPlan, engine_id: int, ready, publish=None) -> None:
    setup_logging("engine", engine_id, plan.cfg.daemon.log_level)
    from flexemr.ring import Ring
    from flexemr.transport import select_transport

    from flexemrd.engine import Engine

    sub_name, comp_name = plan.ring_names(engine_id)
    sub, comp = Ring.attach(sub_name), Ring.attach(comp_name)
    transport = select_transport(plan.cfg.ranker.transport)
    owned = [c for c, e in current_owners(plan).items() if e == engine_id]
    locks = None
    if plan.shared:
        import posix_ipc

        locks = {cid: posix_ipc.Semaphore(plan.lock_name(cid)) for cid in plan.connections}
    expected = {srv: [(plan.spec.table_index(sh.table), plan.spec.table(sh.table).dim, sh.start, sh.end)
                      for sh in plan.routing.shards_of(srv)] for srv in range(len(plan.servers))}
    r = plan.cfg.ranker
    engine = Engine(engine_id, plan.instance, transport, sub, comp, plan.connections, owned, publish=publish,
                    credits=r.credits, credits_per_connection=r.credits_per_connection, token=plan.token,
                    expected_shards=expected, shared_locks=locks, n_engines=plan.engines,
                    heartbeat=ready.beat)
    from flexemrd.process import TermFlag

    term = TermFlag()
    threading.Thread(target=lambda: (term.wait(), engine.stop.set()), name="term", daemon=True).start()
    logger.info("owning connections %s over %s", owned, transport.name)
    ready.ready()
    engine.run()


