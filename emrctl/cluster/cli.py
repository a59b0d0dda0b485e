"""``emrctl cluster up|status|down|restart|link``: the click commands (loaded only when invoked).

    emrctl cluster up --name demo --model DIR --embedding-hosts 3 --rankers 2 --replicas 2
    emrctl cluster status --name demo [--json]
    emrctl cluster down --name demo

Exit codes: 0 ok, 1 the operation failed (the message says what and where),
2 bad usage, not root, or a missing tool (nothing was changed).
"""

from __future__ import annotations

import json
from typing import Any

import click

from emrctl.cluster.errors import ClusterError


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ClusterError as e:
        click.echo(f"emrctl cluster: {e}", err=True)
        raise click.exceptions.Exit(e.code) from None


@click.group("cluster")
def cluster() -> None:
    """A multi-host cluster on this machine: one network namespace per host (needs root)."""


@cluster.command("up")
@click.option("--name", required=True, help="Cluster name (1-20 of [A-Za-z0-9_-]).")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model directory.")
@click.option("--embedding-hosts", type=int, required=True, help="Embedding hosts (one namespace each).")
@click.option("--rankers", type=int, default=1, show_default=True, help="Ranker hosts sharing the embedding hosts.")
@click.option("--replicas", type=int, default=1, show_default=True, help="Embedding hosts holding each shard.")
@click.option("--cpu-quota", type=float, default=None, metavar="CORES",
              help="CPU quota of every host in cores (cgroup v1 cfs quota), e.g. 0.25.")
@click.option("--ranker-cpu-quota", type=float, default=None, metavar="CORES",
              help="CPU quota of each ranker (default: --cpu-quota; 0: none).")
@click.option("--rate-gbit", type=float, default=None, metavar="G", help="Rate limit of every host's link (tc tbf).")
@click.option("--engines", type=int, default=1, show_default=True, help="Engine processes per ranker.")
@click.option("--routing", type=click.Choice(["rows", "tables"]), default="rows", show_default=True,
              help="rows: every table cut into one range per host; tables: whole tables per host.")
@click.option("--hedging/--no-hedging", default=False, show_default=True,
              help="Rankers resend a slow subrequest to another replica (survives a cut link with replicas).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON once up.")
def up_cmd(name: str, model_dir: str, embedding_hosts: int, rankers: int, replicas: int, cpu_quota: float | None,
           ranker_cpu_quota: float | None, rate_gbit: float | None, engines: int, routing: str, hedging: bool,
           as_json: bool) -> None:
    """Create the namespaces, links and limits, and start every host's daemon."""
    from emrctl.cluster import lifecycle

    _run(lifecycle.up, name, model_dir, embedding_hosts, rankers, replicas=replicas, cpu_quota=cpu_quota,
         rate_gbit=rate_gbit, engines=engines, hedging=hedging, ranker_cpu_quota=ranker_cpu_quota,
         routing=routing, progress=_progress)
    st = _run(lifecycle.status, name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"cluster {name} is up: {embedding_hosts} embedding hosts, {rankers} rankers")
    for r in st["rankers"]:
        click.echo(f"  {r['name']}: socket {r['socket']}  (emrctl --instance {r['instance']} status)")
    click.echo(f"stop it with: emrctl cluster down --name {name}")


@cluster.command("status")
@click.option("--name", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(name: str, as_json: bool) -> None:
    """Hosts, namespaces, addresses, pids and states of a cluster."""
    from emrctl.cluster import lifecycle

    st = _run(lifecycle.status, name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"cluster {st['name']} ({st['phase']}), subnet {st['subnet']}, bridge in netns {st['bridge_netns']}")
    click.echo(f"  {'host':<5} {'role':<10} {'state':<9} {'address':<16} {'namespace':<28} {'pids':<6} where")
    for h in st["hosts"]:
        where = h.get("socket") or h.get("listen", "")
        link = "" if h["link"]["up"] in (True, None) else "  LINK DOWN"
        click.echo(f"  {h['name']:<5} {h['role']:<10} {h['state']:<9} {h['address']:<16} {h['namespace']:<28} "
                   f"{len(h['pids']):<6} {where}{link}")


@cluster.command("down")
@click.option("--name", required=True)
def down_cmd(name: str) -> None:
    """Stop every daemon by pid and remove every namespace, link, cgroup, qdisc, segment and file."""
    from emrctl.cluster import lifecycle

    removed = _run(lifecycle.down, name, progress=_progress)
    click.echo(f"cluster {name} is down ({len(removed)} resources removed)")


@cluster.command("restart")
@click.option("--name", required=True)
@click.argument("host")
def restart_cmd(name: str, host: str) -> None:
    """Restart one host's daemon (e.g. r0 or e1); the others keep serving."""
    from emrctl.cluster import lifecycle

    h = _run(lifecycle.restart, name, host, progress=_progress)
    click.echo(f"cluster {name}: {h.name} restarted (pid {h.pid})")


@cluster.command("link")
@click.option("--name", required=True)
@click.argument("host")
@click.argument("state", type=click.Choice(["up", "down"]))
def link_cmd(name: str, host: str, state: str) -> None:
    """Cut (down) or restore (up) one host's network link."""
    from emrctl.cluster import lifecycle

    r = _run(lifecycle.set_link, name, host, state == "up")
    click.echo(f"cluster {name}: link of {r['host']} ({r['dev']} in netns {r['netns']}) is {state}")
