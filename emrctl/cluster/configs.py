"""One TOML config per host, written from the daemon's own keys (flexemr.config).

Each document is checked with ``flexemr.config.parse_config`` before it is
written, so a cluster never starts a daemon that would refuse its config.
An embedding host listens on its namespace address; a ranker lists every
embedding host's address in ``[ranker].servers`` (index = routing server
id) and serves its inference API on a unix socket in the cluster directory,
which the root namespace reaches because unix sockets live in the filesystem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexemr.config import parse_config
from flexemr.errors import ConfigError

from emrctl.cluster.errors import ClusterError
from emrctl.cluster.state import Host

EMBEDDING_PORT = 7001


def embedding_doc(host: Host, model: str, n_servers: int, replicas: int, quota: bool,
                  routing: str = "rows") -> dict[str, Any]:
    return {
        "daemon": {"role": "embedding", "instance": host.instance, "model": model, "log_level": "info",
                   # a throttled host can miss a 10 s beat under load: that is slowness, not a hang
                   "heartbeat_timeout_s": 60.0 if quota else 10.0},
        "embedding": {"listen": f"{host.address}:{host.port}", "index": host.index, "servers": n_servers,
                      "routing": routing, "replicas": replicas, "threads": 1},
    }


def ranker_doc(host: Host, model: str, servers: list[str], replicas: int, engines: int, hedging: bool,
               quota: bool, routing: str = "rows") -> dict[str, Any]:
    return {
        "daemon": {"role": "ranker", "instance": host.instance, "model": model, "log_level": "info",
                   "heartbeat_timeout_s": 60.0 if quota else 10.0},
        "ranker": {"socket": host.socket, "engines": engines, "servers": servers, "routing": routing,
                   "replicas": replicas, "hedging": hedging, "transport": "tcp", "metrics_port": 0,
                   # one NN thread: an OpenMP team stalls when another host takes its core
                   "torch_threads": 1, "rebalance": False},
        "cache": {"policy": "off"},
    }


def write_config(path: str | Path, doc: dict[str, Any]) -> None:
    try:
        parse_config(doc, source=str(path))
    except ConfigError as e:
        raise ClusterError(f"the config written for this host would be refused: {e}") from None
    Path(path).write_text(to_toml(doc))


def to_toml(doc: dict[str, Any]) -> str:
    """TOML for a document of sections holding strings, numbers, booleans and lists of those."""
    lines = ["# written by emrctl cluster up; the daemon reads it with flexemrd run --config"]
    for section, values in doc.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")
