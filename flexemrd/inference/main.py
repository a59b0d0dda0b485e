"""Inference process entry: build the service from the plan, attach the control side, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
import time

from flexemr.logs import setup_logging

from flexemrd.plan import RankerPlan

logger = logging.getLogger(__name__)


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _start_kserve(svc, r):
    """The KServe v2 fronts, in this process and through the same admission and batcher (None when off)."""
    if not (r.http_port or r.grpc_port):
        return None
    from flexemr.kserve.server import KServeServer

    from flexemrd.inference.inprocess import InProcessBackend

    server = KServeServer(InProcessBackend(svc), host=r.kserve_addr, http_port=r.http_port or None,
                          grpc_port=r.grpc_port or None, max_request_bytes=r.max_request_bytes)
    server.start()
    logger.info("KServe v2 front: http %s, grpc %s on %s", server.http_port or "off", server.grpc_port or "off",
                r.kserve_addr)
    return server


def inference_main(plan: RankerPlan, ready) -> None:
    setup_logging("inference", None, plan.cfg.daemon.log_level)
    from flexemr.malloc import retain_freed_memory

    retain_freed_memory()   # a batch's buffers are reused, not faulted back in (flexemr/malloc.py)
    import torch

    from flexemr.model.dense import load_dense
    from flexemr.ring import Doorbell, Ring

    from flexemrd.control.inference_side import InferenceControl
    from flexemrd.inference.frontend import bind_unix_socket
    from flexemrd.inference.service import EngineLinks, InferenceService, ServiceOptions
    from flexemrd.process import TermFlag

    r = plan.cfg.ranker
    if r.torch_threads:
        torch.set_num_threads(r.torch_threads)
    device = _device(r.device)
    logger.info("neural network on %s (%s)", device,
                torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} threads")
    model = load_dense(plan.cfg.daemon.model, plan.spec).to(device)
    links = local = cache = None
    if plan.servers:
        from flexemr.transport.registry import migrates_by_reopening

        from flexemrd.inference.cache import RankerCache

        links = EngineLinks(
            submission=[Ring.attach(plan.ring_names(e)[0]) for e in range(plan.engines)],
            completion=[Ring.attach(plan.ring_names(e)[1]) for e in range(plan.engines)],
            doorbell=Doorbell.attach(plan.doorbell_name), connections=plan.connections, owners=plan.owners,
            reopen=frozenset(c for c, (_server, address) in plan.connections.items()
                             if migrates_by_reopening(r.migration, r.transport, address)))
        # Built even when "off", so emrctl can switch it on at runtime.
        cache = RankerCache(plan.spec, plan.routing, plan.cfg.cache, device=device, max_batch=r.max_batch)
    else:
        from flexemr.model.tables import open_tables

        from flexemrd.inference.local import LocalPooler

        local = LocalPooler(plan.spec, open_tables(plan.cfg.daemon.model, plan.spec), resident=True)
        logger.info("no embedding servers: pooling %d tables in this process (monolithic layout)",
                    len(plan.spec.tables))
    control = InferenceControl(plan.instance)
    beat = getattr(ready, "beat", lambda: None)
    svc = InferenceService(plan.spec, plan.routing, model, ServiceOptions.from_config(r), links=links, device=device,
                           cache=cache, local=local, on_migrated=control, beat=beat)
    term = TermFlag()
    listener = bind_unix_socket(plan.socket_path, r.socket_mode)
    svc.start(listener)
    control.start(svc)
    kserve = _start_kserve(svc, r)
    logger.info("serving %s (max_batch=%d, max_wait=%.1f ms)", plan.socket_path, r.max_batch, r.max_wait_ms)
    ready.ready()
    try:
        term.wait(poll_s=0.1)
        logger.info("draining")
        t0 = time.monotonic()
        if kserve is not None:
            kserve.stop()
        svc.drain_and_stop(plan.cfg.daemon.graceful_timeout_s)
        logger.info("drained in %.2f s", time.monotonic() - t0)
    finally:
        control.stop()
        try:
            os.unlink(plan.socket_path)
        except FileNotFoundError:
            pass
