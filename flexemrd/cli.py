"""``flexemrd``: run this host's daemon (``run``) or a whole local cluster (``local``)."""

from __future__ import annotations

import logging
import os
import sys

import click

from flexemr.config import load_config, parse_config
from flexemr.errors import ConfigError, ModelError
from flexemr.logs import setup_logging
from flexemr.types import CacheMode, CreditMode, MappingMode


def _fail(message: str, code: int = 2):
    click.echo(f"flexemrd: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """flexemr daemon: disaggregated embedding serving (FlexEMR)."""


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="TOML config file.")
def run(config_path: str) -> None:
    """Run this host's daemon (role and instance from the config)."""
    from flexemrd.hosts import build_embedding, build_ranker

    try:
        cfg = load_config(config_path)
        setup_logging("supervisor", None, cfg.daemon.log_level)
        sup = build_ranker(cfg) if cfg.daemon.role == "ranker" else build_embedding(cfg)
    except (ConfigError, ModelError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot start: {e}")
    sys.exit(sup.run())


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model directory.")
@click.option("--embedding-servers", "n_servers", default=2, show_default=True, type=click.IntRange(0, 64),
              help="0: the ranker pools its own tables (the monolithic layout behind the same API).")
@click.option("--engines", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--connections-per-server", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Ranker connections to each embedding server ([ranker].connections_per_server).")
@click.option("--socket", "socket_path", required=True, help="Unix socket of the inference API.")
@click.option("--instance", default="default", show_default=True, envvar="FLEXEMR_INSTANCE")
@click.option("--routing", type=click.Choice(["rows", "tables"]), default="rows", show_default=True)
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Embedding servers holding each shard: with 2 or more, losing one server fails no request.")
@click.option("--hedging/--no-hedging", default=False, show_default=True,
              help="With replicas: resend a subrequest slower than its server's recent p95 to another replica.")
@click.option("--request-timeout", "request_timeout_s", default=30.0, show_default=True, type=float,
              help="Deadline of a request whose client sets none (seconds).")
@click.option("--max-batch", default=4096, show_default=True, type=click.IntRange(1))
@click.option("--max-wait-ms", default=1.0, show_default=True, type=float)
@click.option("--cache-policy", type=click.Choice(CacheMode.labels()), default="off", show_default=True)
@click.option("--cache-size", default="64MiB", show_default=True)
@click.option("--cache-budget", default="2GiB", show_default=True,
              help="Memory the NN and the cache share (CPU); on a GPU the device memory is used.")
@click.option("--cache-margin", default="64MiB", show_default=True, help="Headroom the adaptive policy keeps free.")
@click.option("--mapping", type=click.Choice(MappingMode.labels()), default="owned", show_default=True)
@click.option("--credits", type=click.Choice(CreditMode.labels()), default="priority", show_default=True)
@click.option("--transport", type=click.Choice(["tcp", "shm", "rdma", "auto"]), default="shm", show_default=True,
              help="Between engines and the local embedding servers: shm = shared-memory rings (no socket "
                   "carries ids or partials); auto = shm for these same-host servers.")
@click.option("--rebalance/--no-rebalance", default=True, show_default=True)
@click.option("--migration", type=click.Choice(["auto", "handoff", "reopen"]), default="auto", show_default=True,
              help="How a connection moves between engines: handoff = pass the live socket; reopen = the new "
                   "engine opens its own, the old one drains and closes (what RDMA needs); auto = handoff where "
                   "the transport allows it.")
@click.option("--http-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="KServe v2 (Triton) REST front on 127.0.0.1 (0: off).")
@click.option("--grpc-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="KServe v2 (Triton) gRPC front on 127.0.0.1 (0: off).")
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535))
@click.option("--server-threads", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--torch-threads", default=None, type=click.IntRange(0, 256),
              help="Ranker NN threads (torch intra-op). Default 1: on one host the NN shares the cores with the "
                   "pooling (embedding servers, or the monolithic layout's pool threads), and an OpenMP team "
                   "stalls whenever another thread takes one of its cores (measured on 2 cores, monolithic: "
                   "+26% predict, +8% lookup throughput against all cores). Raise it where cores sit idle.")
@click.option("--heartbeat-timeout", "heartbeat_timeout_s", default=10.0, show_default=True,
              type=click.FloatRange(min=0.0), help="Seconds a worker may miss its heartbeat before it is killed "
                                                   "and restarted; 0 = never.")
@click.option("--max-clients", default=256, show_default=True, type=click.IntRange(1),
              help="Unix-socket clients served at once; one more is answered OVERLOADED.")
@click.option("--client-idle-timeout", "client_idle_timeout_s", default=30.0, show_default=True,
              type=click.FloatRange(min=0.0, min_open=True),
              help="Seconds a client may leave a frame half-sent before it is disconnected.")
@click.option("--boot-timeout", "boot_timeout_s", default=300.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Seconds a worker may take to become ready (an emulated guest needs more).")
@click.option("--embedding-kernel", type=click.Choice(["torch", "numpy"]), default="torch", show_default=True,
              envvar="FLEXEMR_EMBEDDING_KERNEL",
              help="[embedding].kernel: numpy pools without importing torch (same answers; faster boot).")
@click.option("--log-level", default="info", show_default=True)
def local(model_dir, n_servers, engines, connections_per_server, socket_path, instance, routing, replicas, hedging, request_timeout_s, max_batch, max_wait_ms, cache_policy,
          cache_size, cache_budget, cache_margin, mapping, credits, transport, rebalance, migration, http_port, grpc_port,
          metrics_port, server_threads, torch_threads, heartbeat_timeout_s, max_clients, client_idle_timeout_s,
          boot_timeout_s, embedding_kernel, log_level) -> None:
    """Run a whole cluster on this host: N embedding servers and one ranker (shm rings by default)."""
    from flexemrd.hosts import build_local, with_local_secret

    try:
        cfg = parse_config(
            {
                "daemon": {"role": "ranker", "instance": instance, "model": model_dir, "log_level": log_level,
                           "heartbeat_timeout_s": heartbeat_timeout_s, "boot_timeout_s": boot_timeout_s},
                "ranker": {"socket": socket_path, "engines": engines, "routing": routing, "max_batch": max_batch,
                           "connections_per_server": connections_per_server,
                           "replicas": replicas, "hedging": hedging, "request_timeout_s": request_timeout_s,
                           "max_wait_ms": max_wait_ms, "mapping": mapping, "credits": credits,
                           "rebalance": rebalance, "migration": migration, "metrics_port": metrics_port, "max_clients": max_clients,
                           "client_idle_timeout_s": client_idle_timeout_s, "transport": transport,
                           "http_port": http_port, "grpc_port": grpc_port,
                           "torch_threads": 1 if torch_threads is None else torch_threads},
                "embedding": {"threads": server_threads, "servers": max(1, n_servers), "replicas": replicas,
                              "kernel": embedding_kernel,
                              "transport": "shm" if transport in ("shm", "auto") else "tcp"},
                "cache": {"policy": cache_policy, "capacity": cache_size, "budget": cache_budget, "margin": cache_margin},
            },
            source="flexemrd local",
        )
        setup_logging("supervisor", None, log_level)
        from flexemr.model.loader import validate_model_dir

        problems = validate_model_dir(model_dir)
        if problems:
            raise ModelError(problems)
        # A fresh secret per instance: other users of this host reach loopback too.
        cfg, secret_path = with_local_secret(cfg)
    except (ConfigError, ModelError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot start: {e}")
    try:
        try:
            sup = build_local(cfg, n_servers)
        except (ConfigError, ModelError) as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"cannot start: {e}")
        logging.getLogger("flexemrd").info("starting local cluster: %d embedding servers, %d engines, transport %s",
                                           n_servers, engines, transport)
        code = sup.run()
    finally:
        _remove(secret_path)
    sys.exit(code)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main() -> None:
    cli(prog_name="flexemrd")


if __name__ == "__main__":
    main()
