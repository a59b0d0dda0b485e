"""emrctl: the admin CLI of a flexemr instance.

``status`` reads the control segment directly (no round trip through the
supervisor, so it answers in a few milliseconds plus interpreter start-up);
every other command goes through the control mailbox and prints the
supervisor's answer.  Every command takes ``--json``.  emrctl never imports
torch: subcommand groups that may need it (``model``, ``bench``) are loaded
only when invoked (:data:`LAZY_COMMANDS`).

Exit codes: 0 ok, 1 the command failed (unknown id, daemon said error),
2 the instance is not running (also click's usage errors), 3 the daemon did not
answer in time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from emrctl.client import CommandFailed, DaemonClient
from emrctl.render import render_embedding_status, render_status
from flexemr import naming
from flexemr.control.block import InstanceNotRunning
from flexemr.control.commands import (
    CACHE_POLICIES,
    CachePolicy,
    CacheResize,
    Migrate,
    Rebalance,
    Reload,
    Shutdown,
    parse_size,
)
from flexemr.control.mailbox import ControlTimeout
from flexemr.errors import ControlError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 2
EXIT_NO_ANSWER = 3

# Subcommand groups that live in other modules, imported only when invoked so that
# `emrctl status` stays fast and torch-free.  name -> ("module:attribute", short help).
# Add an entry here (or call cli.add_command(group) for a group that is cheap to import).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("emrctl.model_cmd:model", "Create and inspect model directories."),
    "bench": ("emrctl.bench_cmd:bench", "Run the benchmarks side by side with their baselines."),
    "cluster": ("emrctl.cluster.cli:cluster", "A multi-host cluster on this machine in network namespaces."),
}

F = TypeVar("F", bound=Callable[..., Any])


class LazyGroup(click.Group):
    """A click group that imports the groups named in ``lazy`` on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the module-level dict itself, so entries added after import are seen
        self.lazy = lazy if lazy is not None else {}

    def _available(self) -> list[str]:
        out = []
        for name, (target, _) in self.lazy.items():
            module = target.partition(":")[0]
            try:
                if importlib.util.find_spec(module) is not None:
                    out.append(name)
            except ModuleNotFoundError:
                continue
        return out

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = self.lazy[cmd_name][0].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                return None  # not installed in this build: "No such command"
            raise
        cmd = getattr(module, attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{module_name}:{attr} is not a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # short help of lazy groups comes from LAZY_COMMANDS: `emrctl --help` imports nothing heavy
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                rows.append((name, self.lazy[name][1]))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _validate_instance(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return naming.validate_instance(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--instance", "-i", envvar="FLEXEMR_INSTANCE", default=naming.DEFAULT_INSTANCE, show_default=True,
              callback=_validate_instance, help="Daemon instance (env FLEXEMR_INSTANCE).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the daemon to answer a command.")
@click.pass_context
def cli(ctx: click.Context, instance: str, timeout: float) -> None:
    """Administer a running flexemr instance: status, migrations, cache."""
    client = DaemonClient(instance, timeout=timeout)
    ctx.obj = client
    ctx.call_on_close(client.close)


def _fail(message: str, code: int) -> None:
    click.echo(f"emrctl: {message}", err=True)
    raise click.exceptions.Exit(code)


def with_client(fn: F) -> F:
    """Pass the DaemonClient and turn control errors into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        client = click.get_current_context().find_object(DaemonClient)
        assert client is not None  # set by cli(); a missing one is a programming error
        try:
            return fn(client, *args, **kwargs)
        except InstanceNotRunning as e:
            _fail(str(e), EXIT_NOT_RUNNING)
        except ControlTimeout as e:
            _fail(str(e), EXIT_NO_ANSWER)
        except CommandFailed as e:
            if kwargs.get("as_json"):
                click.echo(json.dumps(e.result, indent=2))
            _fail(str(e), EXIT_FAILED)
        except ControlError as e:
            _fail(str(e), EXIT_FAILED)
        return None

    return wrapper  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def _report(result: dict[str, Any], as_json: bool, default: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(result.get("message") or default)


def _id_ranges(ids: Iterable[int]) -> str:
    """``0-3, 5``: how valid ids are listed in error messages."""
    out: list[str] = []
    for i in sorted(ids):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


# ---------------------------------------------------------------------- status


@cli.command()
@json_option
@click.option("--watch", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Redraw every SECONDS until Ctrl-C, with rates over each interval.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch: stop after N refreshes.")
@with_client
def status(client: DaemonClient, as_json: bool, watch: float | None, count: int | None) -> None:
    """Engines, connections, embedding servers and shard replicas, queues, credits and cache, read straight
    from shared memory."""
    if watch is None:
        snap, render = _host_snapshot(client, None)
        click.echo(json.dumps(snap, indent=2) if as_json else render(snap))
        return
    tty = sys.stdout.isatty()
    previous: dict[str, Any] | None = None
    shown = 0
    try:
        while True:
            snap, render = _host_snapshot(client, previous)
            if as_json:
                click.echo(json.dumps(snap, separators=(",", ":")))  # one JSON document per line
            else:
                if tty:
                    click.clear()
                elif shown:
                    click.echo()
                click.echo(render(snap))
            shown += 1
            if count is not None and shown >= count:
                return
            previous = snap
            time.sleep(watch)
    except KeyboardInterrupt:
        return


def _host_snapshot(client: DaemonClient, previous: dict[str, Any] | None
                   ) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    """A ranker's status from its control segment; on an embedding host (no control segment) the servers
    it runs and their rankers, from its embedding status segment."""
    try:
        return client.snapshot(previous), render_status
    except InstanceNotRunning as not_running:
        from flexemr.control.embedding_status import EmbeddingStatusArea

        try:
            area = EmbeddingStatusArea.attach(client.instance)
        except InstanceNotRunning:
            raise not_running from None   # neither a ranker nor an embedding host: the ranker's message
        with area:
            if not area.supervisor_alive():
                raise InstanceNotRunning(f"flexemr instance {client.instance!r} is not running (supervisor pid "
                                         f"{area.supervisor_pid} is gone; stale segment {area.name})") from None
            return area.snapshot(), render_embedding_status


# ---------------------------------------------------------------------- migrate


@cli.command()
@click.argument("conn", type=int)
@click.option("--to", "to_engine", type=int, required=True, metavar="ENGINE", help="Engine to move it to.")
@click.option("--no-wait", "no_wait", is_flag=True,
              help="Return once the move has started; the daemon logs when the ranker confirms it, and "
                   "`emrctl status` shows the owner epoch it reached. Lets moves of several connections overlap "
                   "(a reopen over RDMA takes seconds).")
@json_option
@with_client
def migrate(client: DaemonClient, conn: int, to_engine: int, no_wait: bool, as_json: bool) -> None:
    """Move connection CONN to engine ENGINE, live."""
    snap = client.snapshot()
    conns = {c["id"]: c for c in snap["connections"]}
    engines = {e["id"]: e for e in snap["engines"]}
    inst = client.instance
    if conn not in conns:
        _fail(f"instance {inst!r} has no connection {conn} (connections: {_id_ranges(conns)})", EXIT_FAILED)
    if to_engine not in engines:
        _fail(f"instance {inst!r} has no engine {to_engine} (engines: {_id_ranges(engines)})", EXIT_FAILED)
    current = conns[conn]["engine"]
    if current == to_engine:
        _report({"status": "ok", "cmd": "migrate", "conn": conn, "from_engine": current, "to_engine": to_engine,
                 "changed": False}, as_json, f"connection {conn} is already on engine {to_engine}")
        return
    result = client.send(Migrate(conn=conn, to_engine=to_engine, wait=not no_wait))
    if no_wait:
        _report(result, as_json, f"connection {conn}: engine {current} -> {to_engine} started (owner epoch "
                                 f"{result.get('epoch', '?')}; the daemon logs when it is confirmed)")
    else:
        _report(result, as_json, f"connection {conn}: engine {current} -> {to_engine}")


# ---------------------------------------------------------------------- cache


@cli.group()
def cache() -> None:
    """Resize the embedding cache or change its policy."""


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
        CacheResize(size_bytes=size)  # the command's own checks (this host's memory), before any round trip
    except ValueError as e:  # BadCommand is a ValueError
        raise click.BadParameter(str(e)) from None
    return size


@cache.command("resize")
@click.argument("size", callback=_size)
@json_option
@with_client
def cache_resize(client: DaemonClient, size: int, as_json: bool) -> None:
    """Set the cache capacity: SIZE is bytes or 64MiB, 2GiB, 1.5GB."""
    result = client.send(CacheResize(size_bytes=size))
    _report(result, as_json, f"cache capacity -> {size} bytes")


@cache.command("policy")
@click.argument("policy", type=click.Choice(CACHE_POLICIES))
@json_option
@with_client
def cache_policy(client: DaemonClient, policy: str, as_json: bool) -> None:
    """Switch the cache policy: adaptive, fixed or off."""
    result = client.send(CachePolicy(policy=policy))
    _report(result, as_json, f"cache policy -> {policy}")


# ---------------------------------------------------------------------- daemon-wide


@cli.command()
@click.argument("state", type=click.Choice(["on", "off"]))
@json_option
@with_client
def rebalance(client: DaemonClient, state: str, as_json: bool) -> None:
    """Turn automatic connection rebalancing on or off."""
    result = client.send(Rebalance(enabled=state == "on"))
    _report(result, as_json, f"rebalance {state}")


@cli.command()
@json_option
@with_client
def reload(client: DaemonClient, as_json: bool) -> None:
    """Re-read the reloadable settings (same as SIGHUP)."""
    result = client.send(Reload())
    _report(result, as_json, "reloaded")


@cli.command()
@click.option("--now", is_flag=True, help="Do not drain in-flight batches (same as SIGINT).")
@json_option
@with_client
def shutdown(client: DaemonClient, now: bool, as_json: bool) -> None:
    """Stop the daemon (same as SIGTERM, or SIGINT with --now)."""
    result = client.send(Shutdown(graceful=not now))
    _report(result, as_json, "shutting down" + (" now" if now else " gracefully"))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``emrctl``)."""
    cli.main(args=argv, prog_name="emrctl")
