"""The finisher thread: global pooling result, the NN forward, replies.

It takes batches whose last part is in (from the completion thread, the
batcher or a failure), answers each request of the batch, and releases the
batch's in-flight slot.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.wire.frame import ErrorCode

from flexemrd.inference.admission import Work
from flexemrd.inference.batch import Batch
from flexemrd.inference.stats import ServiceStats
from flexemrd.inference.versions import ModelVersions

logger = logging.getLogger(__name__)


class Finisher:
    def __init__(self, spec: ModelSpec, model, device: str, stats: ServiceStats,
                 inflight: threading.BoundedSemaphore, versions: ModelVersions | None = None) -> None:
        self.spec = spec
        self.versions = versions if versions is not None else ModelVersions(model)
        self.device = device
        self.stats = stats
        self.inflight = inflight
        self.queue: queue.Queue[Batch | None] = queue.Queue()
        self._order = {t.name: i for i, t in enumerate(spec.tables)}

    def put(self, batch: Batch) -> None:
        self.queue.put(batch)

    def run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            try:
                if batch.error is not None:
                    self.fail(batch.works, batch.error_code or ErrorCode.UNAVAILABLE, batch.error)
                else:
                    self.answer(batch)
            except Exception as e:
                logger.exception("finishing batch %d failed", batch.seq)
                self.fail(batch.works, ErrorCode.INTERNAL, f"internal error: {e}")
            finally:
                self.versions.end(batch.version)
                self.inflight.release()

    def answer(self, batch: Batch) -> None:
        if batch.placed is not None:
            self._answer_placed(batch)
            return
        pooled = batch.pooled()
        scores = self.forward(batch, pooled) if any(w.predict for w in batch.works) else None
        off = 0
        done = time.perf_counter()
        for w in batch.works:
            sl = slice(off, off + w.batch)
            off += w.batch
            if w.predict:
                w.reply.scores(w.request_id, scores[sl], version=batch.version)
            else:
                w.reply.pooled(w.request_id, w.names, [pooled[self._order[n]][sl] for n in w.names],
                               version=batch.version)
            self.stats.latency.add(done - w.arrived, w.batch)
        self.stats.batch_done(batch, time.perf_counter())

    def _answer_placed(self, batch: Batch) -> None:
        """A lookup batch pooled into the clients' reply slots: send each descriptor (or frame, slotless)."""
        outs = batch.finish_placed()
        done = time.perf_counter()
        for w, placed, out in zip(batch.works, batch.placed, outs):
            if placed is not None:
                w.reply.send_placed(w.request_id, placed)
            else:
                w.reply.pooled(w.request_id, w.names, [out[self._order[n]] for n in w.names], version=batch.version)
            self.stats.latency.add(done - w.arrived, w.batch)
        self.stats.batch_done(batch, time.perf_counter())

    def forward(self, batch: Batch, pooled: dict[int, np.ndarray]) -> np.ndarray:
        """Scores for the batch's predict requests (lookup-only rows stay 0 and are not sent)."""
        import torch

        if all(w.predict for w in batch.works):
            rows = None
            dense = batch.works[0].dense if len(batch.works) == 1 else np.concatenate([w.dense for w in batch.works])
        else:
            starts = np.cumsum([0] + [w.batch for w in batch.works[:-1]])
            rows = np.concatenate([np.arange(o, o + w.batch) for o, w in zip(starts, batch.works) if w.predict])
            dense = np.concatenate([w.dense for w in batch.works if w.predict])
        with torch.inference_mode():
            d = torch.from_numpy(np.ascontiguousarray(dense)).to(self.device)
            emb = [torch.from_numpy(pooled[t] if rows is None else pooled[t][rows]).to(self.device)
                   for t in range(len(self.spec.tables))]
            out = self.versions.model(batch.version)(d, emb).float().cpu().numpy()
        if rows is None:
            return out
        full = np.zeros(batch.size, dtype=np.float32)
        full[rows] = out
        return full

    def fail(self, works: list[Work], code: int, message: str) -> None:
        self.stats.add_errors(len(works))
        for w in works:
            w.reply.error(w.request_id, code, message)
