"""Build the supervisor of a host from a config: ranker, embedding, or the whole local cluster."""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from functools import partial

from flexemr import auth
from flexemr.config import Config, split_hostport
from flexemr.model.spec import load_spec
from flexemr.routing.table import RoutingTable

from flexemrd.embedding.main import embedding_main, embedding_plans
from flexemrd.engine.main import engine_main
from flexemrd.inference.main import inference_main
from flexemrd.plan import RankerPlan, RankerResources
from flexemrd.supervisor import ChildSpec, Supervisor

logger = logging.getLogger(__name__)


def _listen(address: str) -> socket.socket:
    host, port = split_hostport(address)
    return socket.create_server((host, port), backlog=128)


def local_uses_shm(cfg: Config) -> bool:
    """Whether ``flexemrd local`` puts its servers on shm listeners: "shm", and "auto" (they are on this host)."""
    return cfg.ranker.transport in ("shm", "auto")


def _local_listeners(cfg: Config, n_servers: int) -> tuple[list[socket.socket], list[str]]:
    """One listening socket per local server (the supervisor keeps them open across server restarts)."""
    if local_uses_shm(cfg):
        from flexemr.transport.shm import listen_socket, server_address

        addresses = [server_address(cfg.daemon.instance, i) for i in range(n_servers)]
        listeners = []
        try:
            for a in addresses:
                listeners.append(listen_socket(a))
        except OSError:
            for s in listeners:
                s.close()
            raise
        return listeners, addresses
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=128) for _ in range(n_servers)]
    return listeners, [f"127.0.0.1:{s.getsockname()[1]}" for s in listeners]


def _embedding_children(cfg: Config, routing: RoutingTable, listeners: list[socket.socket], indices: list[int],
                        status_instance: str = "") -> list[ChildSpec]:
    """One child per embedding server; with ``status_instance``, server k publishes into slot k of that
    instance's embedding status segment."""
    spec = routing.spec
    plans = embedding_plans(cfg, spec, routing, listeners, indices)
    if status_instance:
        plans = [dataclasses.replace(p, instance=status_instance, status_slot=k) for k, p in enumerate(plans)]
    return [
        ChildSpec(f"embedding[{p.index}]", partial(embedding_main, p), stop_order=2, keep_fds=(p.listener.fileno(),))
        for p in plans
    ]


def _ranker_children(plan: RankerPlan) -> list[ChildSpec]:
    """Engines (none without servers) and the inference process."""
    from flexemrd.control.publishers import engine_publisher

    children = [
        ChildSpec(f"engine[{e}]", partial(engine_main, plan, e, publish=engine_publisher(plan, e)),
                  cpu=plan.engine_cpus[e], stop_order=1)
        for e in range(plan.engines)
    ]
    children.append(ChildSpec("inference", partial(inference_main, plan), stop_order=0))
    return children


def _check_secret(cfg: Config) -> None:
    """Refuse to start (ConfigError naming the file and its mode) on a secret file children could not use."""
    if cfg.daemon.secret_file:
        auth.load_secret(cfg.daemon.secret_file)


def with_local_secret(cfg: Config) -> tuple[Config, str]:
    """``cfg`` with a fresh secret for this ``local`` instance (mode 0600, in the runtime dir) and its path."""
    from flexemr import naming

    naming.ensure_runtime_dir()
    path = naming.local_secret_path(cfg.daemon.instance)
    auth.write_secret(path)
    return dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, secret_file=path)), path


def build_ranker(cfg: Config) -> Supervisor:
    _check_secret(cfg)
    spec = load_spec(cfg.daemon.model)
    servers = list(cfg.ranker.servers)
    routing = RoutingTable.build(spec, len(servers), cfg.ranker.routing, cfg.ranker.replicas)
    plan = RankerPlan(cfg, cfg.daemon.instance, spec, routing, servers, cfg.ranker.socket or _default_socket(cfg))
    return _supervisor(cfg, plan, _ranker_children(plan), [])


def build_embedding(cfg: Config) -> Supervisor:
    _check_secret(cfg)
    spec = load_spec(cfg.daemon.model)
    routing = RoutingTable.build(spec, cfg.embedding.servers, cfg.embedding.routing, cfg.embedding.replicas)
    if cfg.embedding.transport == "shm":
        from flexemr.transport.shm import is_shm_address, listen_socket, server_address

        listen = cfg.embedding.listen
        address = listen if is_shm_address(listen) else server_address(cfg.daemon.instance, cfg.embedding.index)
        listener = listen_socket(address)
    else:
        address = cfg.embedding.listen
        listener = _listen(address)
    instance = cfg.daemon.instance
    children = _embedding_children(cfg, routing, [listener], [cfg.embedding.index], status_instance=instance)
    status = _EmbeddingStatus(instance, len(children))
    return Supervisor(children, graceful_timeout_s=cfg.daemon.graceful_timeout_s,
                      create_resources=status.create, unlink_resources=status.unlink,
                      heartbeat_timeout_s=cfg.daemon.heartbeat_timeout_s, boot_timeout_s=cfg.daemon.boot_timeout_s,
                      shared_fds=(listener.fileno(),), on_ready=_print_ready(f"embedding server {cfg.embedding.index} "
                                                                              f"on {address}"))


class _EmbeddingStatus:
    """The embedding host's status segment (its servers' rankers, for emrctl status): the supervisor
    creates it before forking the servers and unlinks it when it stops."""

    def __init__(self, instance: str, n_servers: int) -> None:
        self.instance, self.n_servers = instance, n_servers

    def create(self) -> None:
        from flexemr.control.embedding_status import EmbeddingStatusArea

        EmbeddingStatusArea.create(self.instance, self.n_servers).close()   # servers attach by name

    def unlink(self) -> None:
        from flexemr.control.embedding_status import unlink_embedding_status

        unlink_embedding_status(self.instance)


def build_local(cfg: Config, n_servers: int) -> Supervisor:
    """The whole cluster on this host: N embedding servers on loopback + one ranker.

    ``cfg`` should name a secret (``with_local_secret``): loopback is reachable
    by every user of this host, and the secret keeps them from reading rows.
    """
    _check_secret(cfg)
    spec = load_spec(cfg.daemon.model)
    listeners, servers = _local_listeners(cfg, n_servers)
    logger.info("local embedding servers on %s", ", ".join(servers) or "(none: the ranker pools)")
    # No servers: the ranker pools its own tables (the monolithic layout, same front end).
    routing = RoutingTable.build(spec, max(1, n_servers), cfg.ranker.routing,
                                 cfg.ranker.replicas if n_servers else 1)
    plan = RankerPlan(cfg, cfg.daemon.instance, spec, routing, servers, cfg.ranker.socket or _default_socket(cfg))
    children = _embedding_children(cfg, routing, listeners, list(range(n_servers))) + _ranker_children(plan)
    return _supervisor(cfg, plan, children, listeners)


def _default_socket(cfg: Config) -> str:
    from flexemr import naming

    return naming.default_socket(cfg.daemon.instance)


def _print_ready(what: str):
    def on_ready(_sup: Supervisor) -> None:
        print(f"flexemrd ready: {what}", flush=True)

    return on_ready


def _supervisor(cfg: Config, plan: RankerPlan, children: list[ChildSpec], listeners: list[socket.socket]) -> Supervisor:
    from flexemrd.control.supervisor_side import SupervisorControl

    res = RankerResources(plan)
    control = SupervisorControl(plan, res)
    n_srv = len(plan.servers)
    what = (f"socket {plan.socket_path}, {plan.engines} engines, {n_srv} embedding servers, "
            f"{len(plan.connections)} connections, instance {plan.instance!r}")
    sup = Supervisor(
        children,
        create_resources=control.create,
        unlink_resources=control.unlink,
        graceful_timeout_s=cfg.daemon.graceful_timeout_s,
        heartbeat_timeout_s=cfg.daemon.heartbeat_timeout_s,
        boot_timeout_s=cfg.daemon.boot_timeout_s,
        on_ready=lambda s: (control.on_ready(s), _print_ready(what)(s)),
        on_tick=control.tick,
        on_child_exit=control.on_child_exit,
        on_signal=control.on_signal,
        shared_fds=tuple(s.fileno() for s in listeners),
    )
    return sup


def fail(message: str, code: int = 2) -> None:
    print(f"flexemrd: {message}", file=sys.stderr)
    sys.exit(code)
