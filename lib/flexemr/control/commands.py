"""Control commands: small dataclasses that travel as JSON between emrctl and the supervisor.

Each command has a wire ``name`` (``{"cmd": name, ...fields}``) and is handled
by the supervisor's ``cmd_<name>`` method (see :mod:`flexemr.control.dispatch`)::

    command              wire                                             handler
    -------------------  -----------------------------------------------  ------------------
    Status()             {"cmd": "status"}                                cmd_status
    Migrate(3, 1)        {"cmd": "migrate", "conn": 3, "to_engine": 1}    cmd_migrate
    CacheResize(n)       {"cmd": "cache_resize", "size_bytes": n}         cmd_cache_resize
    CachePolicy("fixed") {"cmd": "cache_policy", "policy": "fixed"}       cmd_cache_policy
    Reload()             {"cmd": "reload"}                                cmd_reload
    Shutdown(True)       {"cmd": "shutdown", "graceful": true}            cmd_shutdown
    Rebalance(False)     {"cmd": "rebalance", "enabled": false}           cmd_rebalance
    ModelPush("/m2")     {"cmd": "model_push", "path": "/m2", ...}        cmd_model_push
    ModelDense(2, "")    {"cmd": "model_dense", "version": 2, "error": ""} cmd_model_dense (inference -> supervisor)

Signals map onto the same commands (:data:`SIGNAL_COMMANDS`), so a SIGHUP and
``emrctl`` take one code path.  Arguments are validated when a command is
built, so a handler only ever sees well-formed commands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from flexemr.config import exceeds_host_memory, parse_size  # one size grammar for config files and commands
from flexemr.types import CacheMode

CACHE_POLICIES = CacheMode.labels()  # derived: flexemr.types.CacheMode is the one home


class BadCommand(ValueError):
    """A command dict is malformed: unknown command, missing/unknown field, wrong type or range."""


@dataclasses.dataclass(frozen=True)
class Command:
    """Base of every control command; subclasses set ``name`` and declare typed fields."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"cmd": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Command:
        """Build the command ``data["cmd"]`` names; BadCommand says what is wrong."""
        if not isinstance(data, Mapping):
            raise BadCommand(f"a command must be a JSON object, got {type(data).__name__}")
        name = data.get("cmd")
        cls = COMMANDS.get(name) if isinstance(name, str) else None
        if cls is None:
            raise BadCommand(f"unknown command {name!r} (known: {', '.join(sorted(COMMANDS))})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        args = {k: v for k, v in data.items() if k != "cmd"}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise BadCommand(f"{name}: unknown argument(s) {', '.join(unknown)}")
        missing = [f for f, spec in fields.items() if f not in args
                   and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING]
        if missing:
            raise BadCommand(f"{name}: missing argument(s) {', '.join(missing)}")
        return cls(**args)

    def describe(self) -> str:
        """``migrate conn=3 to_engine=1``: how the command appears in log lines."""
        args = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{self.name} {args}".rstrip()


def _int(cmd: str, field: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadCommand(f"{cmd}: {field} must be an integer, got {value!r}")
    if value < minimum:
        raise BadCommand(f"{cmd}: {field} must be >= {minimum}, got {value}")


def _bool(cmd: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BadCommand(f"{cmd}: {field} must be true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Status(Command):
    """The supervisor's view of the instance (emrctl normally reads the segment directly)."""

    name: ClassVar[str] = "status"


@dataclasses.dataclass(frozen=True)
class Migrate(Command):
    """Move connection ``conn`` to engine ``to_engine``, live.

    ``wait`` (default): answer once the move is confirmed.  ``wait=False``:
    answer as soon as the move is started (its ``epoch`` is confirmed when
    the ranker's ``epoch_seen`` reaches it), so moves of other connections
    may start while this one's reopen is still under way.
    """

    name: ClassVar[str] = "migrate"
    conn: int
    to_engine: int
    wait: bool = True

    def __post_init__(self) -> None:
        _int(self.name, "conn", self.conn)
        _int(self.name, "to_engine", self.to_engine)
        _bool(self.name, "wait", self.wait)

    def to_dict(self) -> dict[str, Any]:
        # "wait" only when it is not the default: the waiting form stays the wire dict tools know.
        d = super().to_dict()
        if self.wait:
            del d["wait"]
        return d

    def describe(self) -> str:
        return super().describe().replace(" wait=True", "")


@dataclasses.dataclass(frozen=True)
class CacheResize(Command):
    """Set the embedding cache's capacity (the adaptive policy starts from it)."""

    name: ClassVar[str] = "cache_resize"
    size_bytes: int

    def __post_init__(self) -> None:
        _int(self.name, "size_bytes", self.size_bytes)
        # emrctl and the supervisor run on the same host: both refuse a size no cache here could reach
        too_big = exceeds_host_memory(f"{self.name}: size_bytes", self.size_bytes)
        if too_big:
            raise BadCommand(too_big)


@dataclasses.dataclass(frozen=True)
class CachePolicy(Command):
    """Switch the cache policy: adaptive, fixed or off."""

    name: ClassVar[str] = "cache_policy"
    policy: str

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise BadCommand(f"{self.name}: policy must be one of {', '.join(CACHE_POLICIES)}, got {self.policy!r}")


@dataclasses.dataclass(frozen=True)
class Reload(Command):
    """Re-read what can change without a restart (SIGHUP)."""

    name: ClassVar[str] = "reload"


@dataclasses.dataclass(frozen=True)
class Shutdown(Command):
    """Stop the daemon; ``graceful`` drains in-flight batches first (SIGTERM) or not (SIGINT/SIGQUIT)."""

    name: ClassVar[str] = "shutdown"
    graceful: bool = True

    def __post_init__(self) -> None:
        _bool(self.name, "graceful", self.graceful)


@dataclasses.dataclass(frozen=True)
class Rebalance(Command):
    """Turn the automatic connection rebalancer on or off."""

    name: ClassVar[str] = "rebalance"
    enabled: bool

    def __post_init__(self) -> None:
        _bool(self.name, "enabled", self.enabled)


@dataclasses.dataclass(frozen=True)
class ModelPush(Command):
    """Roll out a new model version: a full model directory, or a delta of changed rows (``delta``).

    ``version`` 0 picks the next number; ``base`` 0 means the active version.
    The path must be readable at the same place on every embedding host and
    on the ranker.  The answer comes when loading has started; the switch
    follows once every shard is live (``emrctl status`` shows it).
    """

    name: ClassVar[str] = "model_push"
    path: str
    delta: bool = False
    version: int = 0
    base: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise BadCommand(f"{self.name}: path must be a non-empty string, got {self.path!r}")
        _bool(self.name, "delta", self.delta)
        _int(self.name, "version", self.version)
        _int(self.name, "base", self.base)
        if self.version > 0xFFFF_FFFF or self.base > 0xFFFF_FFFF:
            raise BadCommand(f"{self.name}: versions are u32 (got version {self.version}, base {self.base})")


@dataclasses.dataclass(frozen=True)
class ModelDense(Command):
    """The inference process loaded (``error`` empty) or could not load a pushed version's dense NN.

    Sent by the inference process through the same mailbox as emrctl: the
    supervisor switches to a version only after its dense NN loaded.
    """

    name: ClassVar[str] = "model_dense"
    version: int
    error: str = ""

    def __post_init__(self) -> None:
        _int(self.name, "version", self.version, minimum=1)
        if not isinstance(self.error, str):
            raise BadCommand(f"{self.name}: error must be a string, got {self.error!r}")


# an explicit table, not a metaclass registry: adding a command is visible here
COMMANDS: dict[str, type[Command]] = {c.name: c for c in (Status, Migrate, CacheResize, CachePolicy, Reload,
                                                           Shutdown, Rebalance, ModelPush, ModelDense)}

# the supervisor routes these signals through the dispatcher, like emrctl's commands
SIGNAL_COMMANDS: dict[str, Command] = {
    "SIGHUP": Reload(),
    "SIGTERM": Shutdown(graceful=True),
    "SIGINT": Shutdown(graceful=False),
    "SIGQUIT": Shutdown(graceful=False),
}
