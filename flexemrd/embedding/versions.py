"""An embedding server's MODEL frames: load a version beside the others, retire one, list them.

The event loop answers every MODEL frame at once with a MODEL_RESP listing
the versions this server holds; a load runs on its own thread (mapping and
copy-on-write delta rows must not stall the loop or the pooling workers) and
shows as ``loading`` until it is ``live`` or ``failed`` (the message says
why).  The requester polls with LIST.  Memory figures are the process's
resident set and its peak (VmHWM); the peak is reset when a load starts, so
it is the peak *during* the last switch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flexemr.errors import FlexemrError
from flexemr.wire import codec
from flexemr.wire.codec import ModelOp, VersionState
from flexemr.wire.frame import ErrorCode

from flexemrd.embedding.store import EmbeddingStore, RequestRejected

__all__ = ["ServerVersions", "memory_bytes"]

logger = logging.getLogger(__name__)


def memory_bytes() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc/self/status."""
    rss = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, peak


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


class ServerVersions:
    """Serves MODEL frames for one store; thread-safe (loop thread + one loader thread per load)."""

    def __init__(self, store: EmbeddingStore, name: str, on_retire: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.name = name
        self._on_retire = on_retire   # the server's READ registrations of the version may go (embedding/reads.py)
        self._lock = threading.Lock()
        self._loading: dict[int, int] = {}          # version -> base (0: full)
        self._failed: dict[int, tuple[int, str]] = {}

    def answer(self, request_id: int, payload) -> list:
        """The MODEL_RESP (or ERROR) for one MODEL frame."""
        req = codec.decode_model(payload)
        if req.op in (ModelOp.LOAD, ModelOp.LOAD_DELTA):
            self._start_load(req)
        elif req.op == ModelOp.RETIRE:
            self._retire(req.version)
        elif req.op != ModelOp.LIST:
            raise RequestRejected(ErrorCode.UNSUPPORTED, f"MODEL: unknown op {req.op}")
        return codec.encode_model_status(request_id, self.status())

    def status(self) -> codec.ModelStatus:
        versions: dict[int, tuple[int, int, float]] = {
            v: (VersionState.LIVE, h.base, h.load_s) for v, h in self.store.versions.items()}
        with self._lock:
            for v, base in self._loading.items():
                versions[v] = (VersionState.LOADING, base, 0.0)
            for v, (base, _msg) in self._failed.items():
                versions.setdefault(v, (VersionState.FAILED, base, 0.0))
            message = "\n".join(f"version {v}: {msg}" for v, (_b, msg) in sorted(self._failed.items()))
        rss, peak = memory_bytes()
        return codec.ModelStatus(versions, rss, peak, message)

    def _start_load(self, req: codec.ModelRequest) -> None:
        if req.version == 0:
            raise RequestRejected(ErrorCode.BAD_REQUEST, "MODEL: version 0 is reserved (\"not named\")")
        if not req.path:
            raise RequestRejected(ErrorCode.BAD_REQUEST, f"MODEL: load of version {req.version} names no directory")
        base = req.base if req.op == ModelOp.LOAD_DELTA else 0
        with self._lock:
            if req.version in self.store.versions or req.version in self._loading:
                return   # idempotent: a requester may repeat a load it is not sure arrived
            if req.op == ModelOp.LOAD_DELTA and base not in self.store.versions:
                raise RequestRejected(ErrorCode.UNKNOWN_VERSION,
                                      f"MODEL: delta version {req.version} is based on version {base}, which "
                                      f"this server does not hold")
            self._failed.pop(req.version, None)
            self._loading[req.version] = base
        _reset_peak()
        threading.Thread(target=self._load, args=(req, base), name=f"load-v{req.version}", daemon=True).start()

    def _load(self, req: codec.ModelRequest, base: int) -> None:
        t0 = time.perf_counter()
        try:
            if req.op == ModelOp.LOAD_DELTA:
                self.store.load_delta(req.version, base, req.path)
            else:
                self.store.load_full(req.version, req.path)
        except (FlexemrError, RequestRejected, OSError, ValueError) as e:
            logger.error("%s: loading model version %d from %s failed: %s", self.name, req.version, req.path, e)
            with self._lock:
                self._failed[req.version] = (base, str(e))
        except Exception as e:  # a bug must not take the server down
            logger.exception("%s: loading model version %d failed", self.name, req.version)
            with self._lock:
                self._failed[req.version] = (base, f"internal error: {e}")
        else:
            rss, peak = memory_bytes()
            logger.info("%s: model version %d live in %.2f s (%s, from %s); rss %.1f MiB, peak %.1f MiB", self.name,
                        req.version, time.perf_counter() - t0, f"delta on {base}" if base else "full", req.path,
                        rss / 2**20, peak / 2**20)
        finally:
            with self._lock:
                self._loading.pop(req.version, None)

    def _retire(self, version: int) -> None:
        if self.store.retire(version):
            logger.info("%s: model version %d retired", self.name, version)
            if self._on_retire is not None:
                self._on_retire(version)
