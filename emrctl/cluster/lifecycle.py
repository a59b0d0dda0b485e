"""up, down, status, restart and link: the cluster's whole life, composed from the other modules.

``up`` makes resources in this order, journalling each before it exists:
directories, cgroups, the bridge namespace and bridge, then per host its
namespace, veth pair and rate limits; then it starts the embedding hosts,
waits until each says ready (a ranker's engines connect at boot, so the
servers must listen first), then the rankers.  Any failure (or Ctrl-C)
tears down what was made and says what failed.

``down`` undoes the journal by kind, in an order that always works:
processes, shared memory, qdiscs, links, namespaces, cgroups, directories.
It keeps going past a failed step and reports every failure; the record
stays until everything is gone, so ``down`` can be run again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from emrctl.cluster import configs, limits, netns, procs
from emrctl.cluster.errors import EXIT_USAGE, ClusterError
from emrctl.cluster.state import ClusterState, Host, cluster_dir, root_dir, used_subnets, validate_name

logger = logging.getLogger(__name__)

MAX_HOSTS = netns.MAX_HOSTS_PER_ROLE


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("emrctl cluster needs root (network namespaces, cgroups, tc): run it with sudo",
                           EXIT_USAGE)


# ------------------------------------------------------------------------------------------------ up


def up(name: str, model: str, embedding_hosts: int, rankers: int, replicas: int = 1, cpu_quota: float | None = None,
       rate_gbit: float | None = None, engines: int = 1, hedging: bool = False,
       ranker_cpu_quota: float | None = None, routing: str = "rows",
       progress: Any = lambda msg: None) -> ClusterState:
    """Create the cluster and start every daemon; returns its record once every host is ready."""
    validate_name(name)
    require_root()
    netns.require_tools("ip", *(["tc"] if rate_gbit is not None else []))
    limits.require_cpu_controller()
    limits.check_quota(cpu_quota)
    if ranker_cpu_quota != 0:   # 0: rankers run without a quota
        limits.check_quota(ranker_cpu_quota, "--ranker-cpu-quota")
    limits.check_rate(rate_gbit)
    _check_counts(embedding_hosts, rankers, replicas, engines)
    if routing not in ("rows", "tables"):
        raise ClusterError(f"--routing: must be 'rows' or 'tables', got {routing!r}", EXIT_USAGE)
    model = _check_model(model)
    _check_free(name)

    state = _claim(name, model, embedding_hosts, rankers, replicas, cpu_quota, rate_gbit, engines, hedging,
                   cpu_quota if ranker_cpu_quota is None else (ranker_cpu_quota or None), routing)
    try:
        _build(state, progress)
        state.phase = "up"
        state.save()
        return state
    except BaseException as e:
        progress(f"cluster {name}: start failed, removing what was made")
        try:
            _teardown(state)
        except ClusterError as cleanup:
            logger.error("cleanup after a failed up: %s", cleanup)
        if isinstance(e, ClusterError):
            raise
        if isinstance(e, KeyboardInterrupt):
            raise ClusterError(f"cluster {name}: interrupted; everything it made was removed") from None
        raise ClusterError(f"cluster {name}: {type(e).__name__}: {e}") from e


def _check_counts(n_emb: int, n_rank: int, replicas: int, engines: int) -> None:
    for what, n in (("--embedding-hosts", n_emb), ("--rankers", n_rank)):
        if not 1 <= n <= MAX_HOSTS:
            raise ClusterError(f"{what}: must be in 1..{MAX_HOSTS}, got {n}", EXIT_USAGE)
    if not 1 <= replicas <= n_emb:
        raise ClusterError(f"--replicas: must be in 1..{n_emb} (the number of embedding hosts), got {replicas}",
                           EXIT_USAGE)
    if not 1 <= engines <= 64:
        raise ClusterError(f"--engines: must be in 1..64, got {engines}", EXIT_USAGE)


def _check_model(model: str) -> str:
    from flexemr.model.loader import validate_model_dir

    path = Path(model).resolve()
    if not path.is_dir():
        raise ClusterError(f"--model: {model} is not a directory (make one: emrctl model init --preset tiny "
                           f"--out DIR)", EXIT_USAGE)
    problems = validate_model_dir(path)
    if problems:
        raise ClusterError(f"--model: {path} is not a valid model directory: " + "; ".join(problems), EXIT_USAGE)
    return str(path)


def _check_free(name: str) -> None:
    d = cluster_dir(name)
    if d.exists():
        raise ClusterError(f"cluster name {name!r} is in use ({d} exists): `emrctl cluster down --name {name}` "
                           f"first, or choose another name", EXIT_USAGE)
    for suffix in ("", "-e0", "-r0"):
        if netns.netns_exists(f"flexemr-{name}{suffix}"):
            raise ClusterError(f"network namespace flexemr-{name}{suffix} exists without a cluster record: "
                               f"remove it (`ip netns del flexemr-{name}{suffix}`) or choose another name",
                               EXIT_USAGE)


def _claim(name: str, model: str, n_emb: int, n_rank: int, replicas: int, cpu_quota: float | None,
           rate_gbit: float | None, engines: int, hedging: bool, ranker_cpu_quota: float | None,
           routing: str) -> ClusterState:
    """Take the name (mkdir is atomic), choose a subnet and write the first record."""
    root = root_dir()
    missing = []
    p = root
    while not p.exists():
        missing.append(p)
        p = p.parent
    root.mkdir(parents=True, exist_ok=True)
    d = cluster_dir(name)
    try:
        d.mkdir()
    except FileExistsError:
        raise ClusterError(f"cluster name {name!r} is in use ({d} exists)", EXIT_USAGE) from None
    options = {"embedding_hosts": n_emb, "rankers": n_rank, "replicas": replicas, "cpu_quota": cpu_quota,
               "rate_gbit": rate_gbit, "engines": engines, "hedging": hedging, "ranker_cpu_quota": ranker_cpu_quota,
               "routing": routing}
    state = ClusterState(name=name, subnet_index=_free_subnet(), model=model, options=options,
                         bridge_netns=f"flexemr-{name}", bridge=netns.BRIDGE_DEV, up_pid=os.getpid(),
                         up_pid_start=procs.start_time(os.getpid()))
    for m in reversed(missing):           # parents first: undone last
        state.journal.append({"kind": "dir", "path": str(m), "removed": False})
    state.journal.append({"kind": "dir", "path": str(d), "removed": False, "tree": True})
    state.save()
    return state


def _free_subnet() -> int:
    taken = used_subnets()
    for k in range(256):
        if k not in taken and not netns.subnet_in_use_here(k):
            return k
    raise ClusterError("no free 10.213.K.0/24 range: 256 clusters are up, or this machine uses 10.213.0.0/16")


def _plan_hosts(state: ClusterState) -> None:
    o = state.options
    d = state.dir
    for role, n, prefix in (("embedding", o["embedding_hosts"], "e"), ("ranker", o["rankers"], "r")):
        for i in range(n):
            hn = f"{prefix}{i}"
            addr = (netns.embedding_address if role == "embedding" else netns.ranker_address)(state.subnet_index, i)
            state.hosts.append(Host(
                name=hn, role=role, index=i, netns=f"flexemr-{state.name}-{hn}", address=addr, link=hn,
                instance=f"{state.name}-{hn}", config=str(d / f"{hn}.toml"), log=str(d / f"{hn}.log"),
                cgroup=str(limits.cgroup_path(state.name, hn)),
                port=configs.EMBEDDING_PORT if role == "embedding" else 0,
                socket=str(d / f"{hn}.sock") if role == "ranker" else "",
            ))


def _build(state: ClusterState, progress: Any) -> None:
    o = state.options
    _plan_hosts(state)
    state.save()
    if not netns.netns_dir_was_there():
        state.record("netns-dir")
    # cgroups: /sys/fs/cgroup/cpu/flexemr, .../<cluster>, .../<cluster>/<host>
    top = limits.CPU_ROOT / limits.TOP
    if not top.exists():
        state.record("cgroup", path=str(top))
        limits.make_cgroup(top, None)
    cpath = limits.cgroup_path(state.name)
    state.record("cgroup", path=str(cpath))
    limits.make_cgroup(cpath, None)
    for h in state.hosts:
        state.record("cgroup", path=h.cgroup)
        limits.make_cgroup(Path(h.cgroup), _quota_of(state, h))

    progress(f"cluster {state.name}: network 10.213.{state.subnet_index}.0/24, bridge in netns {state.bridge_netns}")
    state.record("netns", name=state.bridge_netns)
    netns.add_netns(state.bridge_netns)
    netns.add_bridge(state.bridge_netns, state.bridge)
    for h in state.hosts:
        state.record("netns", name=h.netns)
        netns.add_netns(h.netns)
        state.record("link", netns=state.bridge_netns, dev=h.link)
        netns.add_host_link(state.bridge_netns, h.link, h.netns, h.address, state.bridge)
        if o["rate_gbit"] is not None:
            for ns, dev in ((h.netns, netns.HOST_DEV), (state.bridge_netns, h.link)):
                state.record("qdisc", netns=ns, dev=dev)
                limits.add_rate_limit(ns, dev, o["rate_gbit"])

    embedding = state.of_role("embedding")
    servers = [f"{h.address}:{h.port}" for h in embedding]
    for h in state.hosts:
        quota = _quota_of(state, h) is not None
        if h.role == "embedding":
            doc = configs.embedding_doc(h, state.model, len(embedding), o["replicas"], quota, o["routing"])
        else:
            doc = configs.ranker_doc(h, state.model, servers, o["replicas"], o["engines"], o["hedging"], quota,
                                     o["routing"])
        configs.write_config(h.config, doc)

    # Servers first: a ranker's engines connect to every server while it boots.
    for role in ("embedding", "ranker"):
        hosts = state.of_role(role)
        progress(f"cluster {state.name}: starting {len(hosts)} {role} host(s)")
        procs.wait_ready([_start(state, h) for h in hosts])
        for h in hosts:
            h.state = "running"
        state.save()


def _quota_of(state: ClusterState, h: Host) -> float | None:
    o = state.options
    return o.get("ranker_cpu_quota") if h.role == "ranker" else o["cpu_quota"]


def _start(state: ClusterState, h: Host) -> procs.Started:
    state.record("shm", instance=h.instance)
    h.state = "starting"
    state.record("process", host=h.name)
    started = procs.start(h)
    h.pid, h.pid_start = started.proc.pid, procs.start_time(started.proc.pid)
    state.save()
    return started


# ------------------------------------------------------------------------------------------------ down


def down(name: str, progress: Any = lambda msg: None) -> list[str]:
    """Stop every daemon and remove everything the cluster made; returns what was removed."""
    validate_name(name)
    require_root()
    d = cluster_dir(name)
    if d.is_dir() and not (d / "state.json").exists():
        # `up` died between taking the name and writing its first record: nothing else exists yet.
        shutil.rmtree(d, ignore_errors=True)
        return [str(d)]
    state = ClusterState.load(name)
    if state.phase == "creating" and state.up_pid and state.up_pid != os.getpid() \
            and abs(procs.start_time(state.up_pid) - state.up_pid_start) < 0.05:
        raise ClusterError(f"`emrctl cluster up` (pid {state.up_pid}) is still creating cluster {name!r}: wait for it "
                           f"to finish or fail, or kill it, then run down")
    state.phase = "stopping"
    state.save()
    return _teardown(state, progress)


def _teardown(state: ClusterState, progress: Any = lambda msg: None) -> list[str]:
    done: list[str] = []
    errors: list[str] = []

    def attempt(entry: dict[str, Any] | None, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except (ClusterError, OSError) as e:
            errors.append(f"{what}: {e}")
            return
        done.append(what)
        if entry is not None:
            state.removed(entry)

    # Rankers first: they stop sending before their servers go.
    hosts = sorted(state.hosts, key=lambda h: h.role != "ranker")
    if state.pending("process") or any(procs.host_pids(h) for h in hosts):
        progress(f"cluster {state.name}: stopping {len(hosts)} daemons")
    for h in hosts:
        attempt(None, f"processes of {h.name}", procs.stop, h)
        h.state = "stopped"
    if not errors:
        for e in state.pending("process"):
            state.removed(e)
    for e in state.pending("shm"):
        from flexemr import naming

        attempt(e, f"shared memory of {e['instance']}", naming.unlink_instance_segments, e["instance"])
    for e in state.pending("qdisc"):
        attempt(e, f"qdisc on {e['dev']} ({e['netns']})", limits.remove_rate_limit, e["netns"], e["dev"])
    for e in state.pending("link"):
        attempt(e, f"link {e['dev']} ({e['netns']})", netns.del_link, e["netns"], e["dev"])
    for e in state.pending("netns"):
        attempt(e, f"netns {e['name']}", netns.del_netns, e["name"])
    for e in state.pending("netns-dir"):
        attempt(e, netns.NETNS_DIR, netns.cleanup_netns_dir)
    for e in state.pending("cgroup"):
        attempt(e, f"cgroup {e['path']}", limits.remove_cgroup, e["path"])
    if errors:
        raise ClusterError(f"cluster {state.name}: down left {len(errors)} thing(s); fix and run down again:\n  "
                           + "\n  ".join(errors))
    for e in state.pending("dir"):
        if e.get("tree"):
            shutil.rmtree(e["path"], ignore_errors=True)
        else:
            try:
                os.rmdir(e["path"])   # a shared parent stays while another cluster lives in it
            except OSError:
                continue
        done.append(e["path"])
    return done


# ------------------------------------------------------------------------------------------------ status


def status(name: str) -> dict[str, Any]:
    """The cluster as the operator sees it; the JSON of ``emrctl cluster status --json``."""
    state = ClusterState.load(name)
    hosts = [_host_status(state, h) for h in state.hosts]
    return {
        "name": state.name,
        "phase": state.phase,
        "subnet": state.subnet,
        "model": state.model,
        "options": state.options,
        "bridge_netns": state.bridge_netns,
        "directory": str(state.dir),
        "hosts": hosts,
        "rankers": [h for h in hosts if h["role"] == "ranker"],
        "embedding_hosts": [h for h in hosts if h["role"] == "embedding"],
    }


def _host_status(state: ClusterState, h: Host) -> dict[str, Any]:
    running = procs.alive(h)
    current = "dead" if h.state == "running" and not running else h.state
    out: dict[str, Any] = {
        "name": h.name, "role": h.role, "index": h.index, "namespace": h.netns, "address": h.address,
        "instance": h.instance, "config": h.config, "log": h.log, "state": current,
        "pids": procs.host_pids(h) if running else [], "supervisor_pid": h.pid if running else None,
        "link": {"netns": state.bridge_netns, "dev": h.link, "up": netns.link_is_up(state.bridge_netns, h.link)},
        "cgroup": h.cgroup,
    }
    if h.cgroup and os.path.isdir(h.cgroup):
        st = limits.cpu_stat(h.cgroup)
        out["cpu"] = {"quota_cores": limits.quota_cores(h.cgroup), "nr_periods": st.get("nr_periods", 0),
                      "nr_throttled": st.get("nr_throttled", 0),
                      "throttled_ms": round(st.get("throttled_time", 0) / 1e6, 1)}
    if state.options.get("rate_gbit") is not None:
        out["link"]["rate_gbit"] = state.options["rate_gbit"]
    if h.role == "ranker":
        out["socket"] = h.socket
    else:
        out["listen"] = f"{h.address}:{h.port}"
    return out


# ------------------------------------------------------------------------------------------------ one host


def restart(name: str, host_name: str, progress: Any = lambda msg: None) -> Host:
    """Stop one host's daemon and start it again with the same config, namespace and cgroup."""
    require_root()
    state = ClusterState.load(name)
    h = state.host(host_name)
    progress(f"cluster {name}: stopping {h.name}")
    procs.stop(h)
    from flexemr import naming

    naming.unlink_instance_segments(h.instance)
    if h.socket:
        Path(h.socket).unlink(missing_ok=True)
    progress(f"cluster {name}: starting {h.name}")
    h.state = "starting"
    started = procs.start(h)
    h.pid, h.pid_start = started.proc.pid, procs.start_time(started.proc.pid)
    state.save()
    procs.wait_ready([started])
    h.state = "running"
    state.save()
    return h


def set_link(name: str, host_name: str, up_: bool) -> dict[str, Any]:
    """Cut or restore one host's link (its veth end on the bridge goes down or up)."""
    require_root()
    state = ClusterState.load(name)
    h = state.host(host_name)
    netns.set_link(state.bridge_netns, h.link, up_)
    return {"host": h.name, "netns": state.bridge_netns, "dev": h.link, "up": netns.link_is_up(state.bridge_netns,
                                                                                              h.link)}

