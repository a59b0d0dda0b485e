"""``emrctl model push``: roll out a new model version to a running instance, live.

    emrctl model push DIR [--delta] [--version N] [--base N] [--no-wait] [--wait-s S] [--json]

The daemon answers once loading has started; by default this command then
polls ``emrctl status``'s ``model`` section until the version is active (or
the push failed) and prints how long it took to go live and to switch.
Exit codes as for every emrctl command: 0 ok, 1 failed, 2 not running, 3 no answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from emrctl.client import CommandFailed, DaemonClient
from flexemr.control.block import InstanceNotRunning
from flexemr.control.commands import ModelPush
from flexemr.control.mailbox import ControlTimeout
from flexemr.errors import ControlError

EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_NO_ANSWER = 1, 2, 3


def _fail(message: str, code: int) -> None:
    click.echo(f"emrctl: {message}", err=True)
    raise click.exceptions.Exit(code)


def wait_for_version(client: DaemonClient, version: int, timeout_s: float) -> dict[str, Any]:
    """Poll the status until ``version`` is active (its history entry) or the rollout failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = client.snapshot()["model"]
        if m.get("active") == version and m.get("loading") is None:
            done = [h for h in m.get("history", []) if h.get("version") == version]
            return {"status": "ok", "version": version, "active": version, **(done[-1] if done else {}),
                    "servers": m.get("servers", {})}
        if m.get("loading") is None and m.get("last_error"):
            return {"status": "error", "version": version, "active": m.get("active"), "error": m["last_error"]}
        time.sleep(0.05)
    return {"status": "error", "version": version, "error": f"version {version} was not active within {timeout_s:g} s"}


@click.command("push")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--delta", is_flag=True, help="DIR holds changed rows only (delta/NAME.ids.npy + NAME.rows.npy).")
@click.option("--version", "version", type=click.IntRange(min=0, max=0xFFFF_FFFF), default=0,
              help="Version id (default: the next one).")
@click.option("--base", type=click.IntRange(min=0, max=0xFFFF_FFFF), default=0,
              help="A delta's base version (default: the active one).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the version is active.")
@click.option("--wait-s", type=float, default=600.0, show_default=True, help="How long --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(model_dir: Path, delta: bool, version: int, base: int, wait: bool, wait_s: float, as_json: bool) -> None:
    """Serve MODEL_DIR (a model directory, or a delta) as a new version, without stopping."""
    client = click.get_current_context().find_object(DaemonClient)
    if client is None:
        _fail("model push needs a running instance (run it as `emrctl model push`)", EXIT_FAILED)
    try:
        started = client.send(ModelPush(path=str(model_dir.resolve()), delta=delta, version=version, base=base))
        result = wait_for_version(client, started["version"], wait_s) if wait else started
    except InstanceNotRunning as e:
        _fail(str(e), EXIT_NOT_RUNNING)
    except ControlTimeout as e:
        _fail(str(e), EXIT_NO_ANSWER)
    except CommandFailed as e:
        if as_json:
            click.echo(json.dumps(e.result, indent=2))
        _fail(str(e), EXIT_FAILED)
    except ControlError as e:
        _fail(str(e), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result.get("status", "ok") != "ok":
        _fail(f"model push: {result['error']}", EXIT_FAILED)
    elif wait:
        click.echo(f"model version {result['version']} active: live on every embedding server after "
                   f"{result.get('live_after_s', 0):.2f} s, switched after {result.get('switched_after_s', 0):.2f} s")
    else:
        click.echo(f"model version {result['version']}: loading ({'delta' if result.get('delta') else 'full'})")
    if result.get("status", "ok") != "ok":
        raise click.exceptions.Exit(EXIT_FAILED)
