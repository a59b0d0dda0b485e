"""Publishers: data-path counters into the control block, on the control path's own threads.

``engine_publisher`` returns the callback an engine's publisher thread calls
about ten times a second; it reads the engine's counters (single-writer
fields, a stale read is fine) and writes the engine's rows of the control
block.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flexemrd.engine.stats import EngineStatsView

logger = logging.getLogger(__name__)


def engine_publisher(plan, engine_id: int):
    """A ``publish(engine)`` callback for engine ``engine_id`` (called ~10x/s between batches)."""
    state: dict[str, Any] = {}

    def publish(engine: EngineStatsView) -> None:
        block = state.get("block")
        if block is None:
            from flexemr.control.block import ControlBlock

            try:
                block = state["block"] = ControlBlock.attach(plan.instance)
            except Exception as e:
                logger.warning("no control block: %s", e)
                state["block"] = False
                return
        if block is False:
            return
        slot = block.engines[engine_id]
        now = time.monotonic_ns()
        snap = engine.snapshot()
        inflight = 0
        bsent = brecv = 0
        for cid, st in snap.connections.items():
            inflight += st.inflight
            bsent += st.bytes_sent
            brecv += st.bytes_received
            rtt = st.rtt_ns[-256:]
            p50, p99 = (np.percentile(rtt, [50, 99]) / 1e3) if rtt else (0.0, 0.0)
            slot.conn(cid).update(queued=st.inflight, inflight=st.inflight,
                                  credits=max(0, snap.initial_credits + st.granted - st.received),
                                  subrequests_total=st.sent, bytes_sent=st.bytes_sent,
                                  bytes_received=st.bytes_received, rtt_p50_us=float(p50), rtt_p99_us=float(p99),
                                  updated_ns=now)
        slot.update(active_connections=len(snap.connections), queue_depth=snap.queue_depth, inflight=inflight,
                    subrequests_total=snap.subrequests, requests_total=snap.subrequests,
                    bytes_sent=bsent, bytes_received=brecv, busy_ns=snap.busy_ns, heartbeat_ns=now,
                    bytes_lent=snap.bytes_lent, bytes_copied=snap.bytes_copied,
                    large_bytes_copied=snap.large_bytes_copied, fills_read=snap.fills_read,
                    rows_read=snap.rows_read)

    return publish
