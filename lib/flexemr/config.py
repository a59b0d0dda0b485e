"""Daemon configuration: TOML parsed once into frozen, typed sections.

``load_config(path)`` reports every problem at once, each with its file and
TOML key (``flexemr.toml: [ranker].engines: must be >= 1, got 0``) and a
suggestion for a misspelt key.  Sizes accept ``"64MiB"``-style strings, and
a size larger than this host's memory is refused by its key
(``[cache].capacity = 1.0 PiB exceeds this host's memory (23.4 GiB)``).
Runtime-mutable state (cache size, connection owners) does not live here: it
lives in the control segment.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

from flexemr.errors import ConfigError
from flexemr.types import CacheMode, CreditMode, MappingMode

try:
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover
    import tomli as _toml  # type: ignore[no-redef]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(value: str | int) -> int:
    """``"64MiB"``, ``"2GiB"``, ``"1.5GB"`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if not str(value).strip():
        raise ValueError("empty size (examples: 4096, 64MiB, 2GiB, 1.5GB)")
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 4096, 64MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def format_size(n: int | float) -> str:
    """``23.4 GiB``, ``1.0 PiB``: binary units, one decimal, as error messages show sizes."""
    value = float(n)
    for unit in _BINARY_UNITS:
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def host_memory_bytes() -> int:
    """This host's physical memory (``psutil.virtual_memory().total``): no size may exceed it."""
    import psutil  # lazily: most importers of config never check a size

    return int(psutil.virtual_memory().total)


def exceeds_host_memory(what: str, size: int) -> str | None:
    """``"<what> = 1.0 PiB exceeds this host's memory (23.4 GiB)"``, or None if ``size`` fits.

    ``what`` names the setting as the message should (``"c.toml: [cache].capacity"``).
    """
    total = host_memory_bytes()
    if size <= total:
        return None
    return f"{what} = {format_size(size)} exceeds this host's memory ({format_size(total)})"


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonConfig:
    role: str = "ranker"             # "ranker" or "embedding"
    instance: str = "default"
    model: str = ""
    log_level: str = "info"
    graceful_timeout_s: float = 10.0
    heartbeat_timeout_s: float = 10.0  # a worker silent this long is killed and restarted; 0 = never
    boot_timeout_s: float = 300.0      # a worker not ready this long after its fork is a boot error
    secret_file: str = ""              # shared secret of rankers and embedding servers (mode 0600); "" = none


@dataclasses.dataclass(frozen=True, slots=True)
class RankerConfig:
    socket: str = ""                 # unix socket of the inference API ("" = runtime dir default)
    socket_mode: int = 0o660
    engines: int = 2
    cpus: tuple[int, ...] = ()       # engine i pinned to cpus[i % len]; () = spread over the host
    servers: tuple[str, ...] = ()    # "host:port" of embedding servers, index = routing server id
    routing: str = "rows"            # "rows" or "tables"
    connections_per_server: int = 1
    max_batch: int = 4096            # samples coalesced into one batch
    max_wait_ms: float = 1.0         # how long a lone request waits for company
    max_inflight_batches: int = 4
    ring_bytes: int = 64 << 20
    max_request_bytes: int = 256 << 20
    max_clients: int = 256           # unix-socket clients served at once; one more gets ERROR OVERLOADED
    max_inflight_request_bytes: int = 1 << 30  # request bytes buffered at once (all clients); over it: OVERLOADED
    client_idle_timeout_s: float = 30.0        # a client that leaves a frame unfinished this long is disconnected
    max_reply_region_bytes: int = 1 << 30      # clients' shared reply regions mapped at once (all clients); 0: off
    shm_requests: bool = True                  # same-host clients may send requests through their region too
    mapping: str = MappingMode.OWNED.value       # a MappingMode label: "owned" or "shared"
    credits: str = CreditMode.PRIORITY.value     # a CreditMode label: "priority", "inband" or "off"
    credits_per_connection: int = 4
    rebalance: bool = True
    rebalance_interval_s: float = 1.0
    metrics_port: int = 0            # 0 = no metrics endpoint
    metrics_addr: str = "127.0.0.1"
    device: str = "auto"             # "auto", "cpu" or "cuda"
    torch_threads: int = 0           # 0 = torch's default
    transport: str = "auto"          # "auto" (shm for shm: addresses, else rdma/tcp), "tcp", "shm" or "rdma"
    # How a connection moves to another engine: "handoff" passes the live socket (SCM_RIGHTS),
    # "reopen" has the new engine open its own while the old one drains and closes, "auto" hands
    # off where the transport can (tcp, shm) and reopens where it cannot (rdma).
    migration: str = "auto"
    replicas: int = 1                # servers holding each shard (placement: routing.table.RoutingTable.build)
    request_timeout_s: float = 30.0  # default deadline of a request whose client sets none
    hedging: bool = False            # with replicas: resend a slow subrequest to a second replica
    hedge_quantile: float = 0.95     # ... once it is older than this quantile of its server's recent latency
    hedge_min_ms: float = 2.0        # ... and at least this old
    max_ids_per_request: int = 0     # ids in one request, over all tables (0: no limit beyond max_request_bytes)
    allow_nonfinite: bool = False    # accept NaN/Inf dense features (refused by default, naming the field)
    partials: str = "fp32"           # precision of servers' partials on the wire: "fp32", "fp16" or "bf16"
    http_port: int = 0               # KServe v2 REST front (0 = off)
    grpc_port: int = 0               # KServe v2 gRPC front (0 = off)
    kserve_addr: str = "127.0.0.1"   # where the KServe fronts listen


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    listen: str = "127.0.0.1:7001"
    index: int = 0                   # this server's id in the routing table
    servers: int = 1                 # how many servers share the tables
    routing: str = "rows"
    replicas: int = 1                # must match the rankers' [ranker].replicas
    threads: int = 1                 # torch intra-op threads for pooling
    workers: int = 0                 # pooling workers per server; 0 = this host's cores over its servers (1..8)
    kernel: str = "torch"            # pooling kernel: "torch" or "numpy" (same answers; numpy never imports torch)
    max_payload: int = 1 << 30
    max_connections: int = 256       # ranker connections served at once; one more gets ERROR OVERLOADED
    insecure: bool = False           # allow listening beyond loopback without [daemon].secret_file
    transport: str = "tcp"           # "tcp" (listen = "host:port") or "shm" (same-host rankers only)


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    policy: str = CacheMode.OFF.label            # a CacheMode label: "adaptive", "fixed" or "off"
    capacity: int = 64 << 20         # fixed capacity, and the start of adaptive
    budget: int = 2 << 30            # CPU: memory the NN and the cache may share; GPU: device memory
    margin: int = 64 << 20
    window_s: float = 1.0
    admission: str = "lru"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = dataclasses.field(default_factory=DaemonConfig)
    ranker: RankerConfig = dataclasses.field(default_factory=RankerConfig)
    embedding: EmbeddingConfig = dataclasses.field(default_factory=EmbeddingConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    source: str = "<defaults>"


_SECTIONS = {"daemon": DaemonConfig, "ranker": RankerConfig, "embedding": EmbeddingConfig, "cache": CacheConfig}
_SIZE_KEYS = {"ring_bytes", "max_request_bytes", "max_inflight_request_bytes", "max_reply_region_bytes", "max_payload",
              "capacity", "budget", "margin"}
_CHOICES = {
    ("daemon", "role"): ("ranker", "embedding"),
    ("daemon", "log_level"): ("debug", "info", "warning", "error"),
    ("ranker", "routing"): ("rows", "tables"),
    ("embedding", "routing"): ("rows", "tables"),
    ("ranker", "mapping"): MappingMode.labels(),
    ("ranker", "credits"): CreditMode.labels(),
    ("ranker", "device"): ("auto", "cpu", "cuda"),
    ("ranker", "transport"): ("auto", "tcp", "shm", "rdma"),
    ("ranker", "migration"): ("auto", "handoff", "reopen"),
    ("ranker", "partials"): ("fp32", "fp16", "bf16"),
    ("embedding", "transport"): ("tcp", "shm"),
    ("embedding", "kernel"): ("torch", "numpy"),
    ("cache", "policy"): CacheMode.labels(),
    ("cache", "admission"): ("lru", "tinylfu"),
}
_POSITIVE = {"engines", "connections_per_server", "max_batch", "max_inflight_batches", "servers", "threads",
             "credits_per_connection", "replicas", "max_connections", "max_clients"}


def _coerce(section: str, key: str, default: Any, value: Any, where: str, problems: list[str]) -> Any:
    kind = type(default)
    if key in _SIZE_KEYS:
        try:
            size = parse_size(value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return default
        # Only sizes the operator wrote are checked: a default is not their mistake, and
        # a 1 PiB cache or ring would otherwise fail much later, in an allocation.
        too_big = exceeds_host_memory(where, size)
        if too_big:
            problems.append(too_big)
            return default
        return size
    if isinstance(default, bool):
        if not isinstance(value, bool):
            problems.append(f"{where}: must be true or false, got {value!r}")
            return default
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            problems.append(f"{where}: must be a list, got {value!r}")
            return default
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool):
        problems.append(f"{where}: must be {kind.__name__}, got {value!r}")
        return default
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        problems.append(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return default
    if key in _POSITIVE and value < 1:
        problems.append(f"{where}: must be >= 1, got {value!r}")
        return default
    return value


def parse_config(doc: dict, source: str = "<config>", overrides: dict | None = None) -> Config:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name in doc:
        if name not in _SECTIONS:
            hint = difflib.get_close_matches(name, list(_SECTIONS), n=1)
            problems.append(f"{source}: [{name}]: unknown section" + (f" (did you mean [{hint[0]}]?)" if hint else ""))
    for name, cls in _SECTIONS.items():
        raw = dict(doc.get(name, {}) or {})
        raw.update((overrides or {}).get(name, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            where = f"{source}: [{name}].{key}"
            if key not in fields:
                hint = difflib.get_close_matches(key, list(fields), n=1)
                problems.append(f"{where}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
                continue
            f = fields[key]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            values[key] = _coerce(name, key, default, value, where, problems)
        sections[name] = cls(**values)
    cfg = Config(**sections, source=source)
    problems += _cross_checks(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    src = cfg.source
    d = cfg.daemon
    for key in ("graceful_timeout_s", "boot_timeout_s"):
        if getattr(d, key) <= 0:
            problems.append(f"{src}: [daemon].{key}: must be > 0, got {getattr(d, key)!r}")
    if d.heartbeat_timeout_s < 0:
        problems.append(f"{src}: [daemon].heartbeat_timeout_s: must be >= 0 (0 = never), got {d.heartbeat_timeout_s!r}")
    if not re.match(r"^[A-Za-z0-9_-]{1,32}$", cfg.daemon.instance):
        problems.append(f"{src}: [daemon].instance: {cfg.daemon.instance!r} must match [A-Za-z0-9_-]{{1,32}}")
    if cfg.ranker.client_idle_timeout_s <= 0:
        problems.append(f"{src}: [ranker].client_idle_timeout_s: must be > 0, got {cfg.ranker.client_idle_timeout_s!r}")
    if cfg.daemon.role == "ranker":
        r = cfg.ranker
        rings = 2 * r.engines * r.ring_bytes  # a submission and a completion ring per engine, all in shm
        too_big = exceeds_host_memory(f"{src}: [ranker].ring_bytes x 2 rings x {r.engines} engines", rings)
        if too_big and r.ring_bytes <= host_memory_bytes():  # one oversized ring is reported by its key already
            problems.append(too_big)
        if r.transport == "rdma" and r.migration == "handoff":
            problems.append(f"{src}: [ranker].migration: 'handoff' cannot move an RDMA connection (a queue pair "
                            f"cannot change process) with [ranker].transport = 'rdma': use 'reopen' or 'auto'")
        if r.transport == "rdma" and r.mapping == MappingMode.SHARED.value:
            problems.append(f"{src}: [ranker].mapping: 'shared' gives every engine a copy of each connection, "
                            f"which an RDMA queue pair cannot be ([ranker].transport = 'rdma'): use 'owned'")
        for i, s in enumerate(cfg.ranker.servers):
            if isinstance(s, str) and s.startswith("shm:"):
                if cfg.ranker.transport == "tcp":
                    problems.append(f"{src}: [ranker].servers[{i}]: {s!r} is a shm address "
                                    f"but [ranker].transport = 'tcp'")
            elif not isinstance(s, str) or not re.match(r"^[^:\s]+:\d{1,5}$", s):
                problems.append(f"{src}: [ranker].servers[{i}]: {s!r} must be \"host:port\" "
                                f"(or \"shm:flexemr.<instance>.shm.sNN\")")
    if cfg.daemon.role == "embedding":
        e = cfg.embedding
        if e.transport == "tcp" and not re.match(r"^[^:\s]*:\d{1,5}$", e.listen):
            problems.append(f"{src}: [embedding].listen: {e.listen!r} must be \"host:port\"")
        elif not e.insecure and not cfg.daemon.secret_file and not is_loopback(split_hostport(e.listen)[0]):
            problems.append(f"{src}: [embedding].listen: {e.listen!r} is reachable from other hosts but no "
                            "[daemon].secret_file is set, so anyone who reaches it could read every row: set a "
                            "secret file (mode 0600, the same on the rankers), listen on 127.0.0.1, or set "
                            "[embedding].insecure = true")
        if not (0 <= e.index < e.servers):
            problems.append(f"{src}: [embedding].index: {e.index} must be in 0..{e.servers - 1} ([embedding].servers = {e.servers})")
    return problems


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read, parse and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        doc = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = parse_config(doc, str(p), overrides)
    if cfg.daemon.role and not cfg.daemon.model:
        raise ConfigError(f"{p}: [daemon].model: required (path of the model directory)")
    return cfg


def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach ("localhost", 127.0.0.0/8, ::1); names are not resolved."""
    import ipaddress

    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
