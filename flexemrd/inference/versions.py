"""Which model version the ranker serves, and which older ones still have batches in flight.

The batcher stamps each new batch with ``active`` (``begin``); the finisher
runs the batch's own version's dense NN and answers with that version, then
calls ``end``.  A switch (``switch``, on the batcher thread, between
batches) changes what new batches get; batches already in flight finish on
the version they started with, so no answer ever mixes two versions.  An
old version's dense NN is dropped once its last batch has ended.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flexemr.model.versions import BOOT_VERSION

__all__ = ["ModelVersions"]

logger = logging.getLogger(__name__)


class ModelVersions:
    """Active version, dense models per version and batches in flight per version (thread-safe)."""

    def __init__(self, model: Any, version: int = BOOT_VERSION) -> None:
        self.active = version
        self._models: dict[int, Any] = {version: model}
        self._inflight: dict[int, int] = {}
        self._lock = threading.Lock()

    def add_model(self, version: int, model: Any) -> None:
        """Register ``version``'s dense NN before switching to it (control thread)."""
        with self._lock:
            self._models[version] = model

    def has_model(self, version: int) -> bool:
        with self._lock:
            return version in self._models

    def model(self, version: int) -> Any:
        with self._lock:
            return self._models[version]

    def switch(self, version: int) -> int:
        """Batcher thread, between batches: new batches get ``version``; returns the previous one."""
        with self._lock:
            if version not in self._models:
                raise ValueError(f"model version {version} has no dense NN loaded")
            old, self.active = self.active, version
            self._release_locked()
        logger.info("model version %d active (was %d)", version, old)
        return old

    def begin(self) -> int:
        """A new batch: the version it is served with."""
        with self._lock:
            v = self.active
            self._inflight[v] = self._inflight.get(v, 0) + 1
            return v

    def end(self, version: int) -> None:
        with self._lock:
            n = self._inflight.get(version, 0) - 1
            if n > 0:
                self._inflight[version] = n
            else:
                self._inflight.pop(version, None)
                self._release_locked()

    def draining(self) -> list[int]:
        """Older versions that still have batches in flight."""
        with self._lock:
            return sorted(v for v in self._inflight if v != self.active)

    def _release_locked(self) -> None:
        # Versions only grow (the supervisor refuses a push that is not newer), so a model
        # above the active one is loaded for the next switch and must stay.
        for v in [v for v in self._models if v < self.active and v not in self._inflight]:
            del self._models[v]
            logger.info("model version %d released (its last batch is answered)", v)
