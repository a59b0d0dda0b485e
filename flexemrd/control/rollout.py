"""Supervisor side of a live model update: distribute a version, switch when it is live everywhere.

``emrctl model push DIR`` becomes :meth:`ModelRollout.push`; the supervisor's
tick then drives one rollout at a time through its states::

    loading    every embedding server was sent MODEL LOAD (its own TCP connection,
               the data protocol); LIST polls until each reports the version live
    switching  every shard group's holders (RoutingTable.holders_of) hold it live and
               the inference process preloaded its dense NN (it sees ``loading`` in the
               topology and answers with a ModelDense command through the mailbox):
               the topology names it active, the epoch is
               bumped; the inference process switches between batches and acks the
               epoch once no batch of the old version is in flight
    (done)     the old version is retired on every server (released after its last
               request); ``model.active`` is the new version

A failure (a server cannot load it, the dense NN is wrong, timeout) leaves the
old version serving, retires the new one and records why.

Repair: an embedding server that restarts comes back with only the model it
boots with (version 1).  Every ``REPAIR_S`` the supervisor lists each server's
versions and replays the active version's recipe (its last full version and
the deltas since, in order) on any server that lacks it, then retires what it
booted with.  Meanwhile the ranker re-issues a part refused with
UNKNOWN_VERSION to another replica.  Everything is
published in the topology JSON under ``model`` (``emrctl status``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flexemr.model.spec import load_spec
from flexemr.model.versions import BOOT_VERSION, dense_dir_of, is_delta, read_delta, same_architecture
from flexemr.wire import codec
from flexemr.wire.codec import ModelOp, VersionState
from flexemr.wire.frame import FrameType

__all__ = ["ModelRollout", "ServerLink", "PushRefused"]

logger = logging.getLogger(__name__)

POLL_S = 0.05               # LIST polls while a version loads
LOAD_TIMEOUT_S = 600.0      # a version not live everywhere by then fails
SWITCH_TIMEOUT_S = 120.0    # the inference process must switch and drain by then
REPAIR_S = 1.0              # how often servers are checked for the active version
LINK_TIMEOUT_S = 2.0


class PushRefused(ValueError):
    """A push that cannot start (bad directory, another rollout running); the message says why."""


class ServerLink:
    """A blocking control connection from the supervisor to one embedding server (reopened on failure)."""

    def __init__(self, address: str, name: str, secret: bytes | None = None) -> None:
        self.address = address
        self.name = name
        self.secret = secret
        self._conn = None
        self._rid = 0

    def _open(self) -> None:
        from flexemr.transport import select_transport
        from flexemr.wire.handshake import client_hello

        # Whatever transport the address needs (shm for flexemrd local's servers, TCP between hosts).
        conn = select_transport("auto").connect(self.address, 0, -1)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(LINK_TIMEOUT_S)   # a stuck server must not hang the supervisor's loop
        self._conn = conn
        # Authenticated like an engine when the cluster has a secret ([daemon].secret_file).
        client_hello(conn.send_frame, self._read_frame, f"embedding server at {self.address}", codec.ROLE_CLIENT,
                     self.name, secret=self.secret)

    def _read_frame(self) -> tuple:
        h = self._conn.recv_header()
        return h, self._conn.recv_payload(h)

    def _call(self, frame: list, expect: FrameType) -> memoryview:
        assert self._conn is not None
        self._conn.send_frame(frame)
        h, payload = self._read_frame()
        if h.type == FrameType.ERROR:
            raise PushRefused(f"{self.address}: {codec.decode_error(payload)}")
        if h.type != expect:
            raise ConnectionError(f"{self.address}: expected {expect.name}, got frame type {h.type}")
        return payload

    def model(self, op: int, version: int = 0, base: int = 0, path: str = "") -> codec.ModelStatus:
        """Send one MODEL frame and return the server's MODEL_RESP (OSError when unreachable)."""
        try:
            if self._conn is None:
                self._open()
            self._rid += 1
            payload = self._call(codec.encode_model(self._rid, op, version, base, path), FrameType.MODEL_RESP)
            return codec.decode_model_status(payload)
        except (OSError, ConnectionError):
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None


class ModelRollout:
    """Model versions of a ranker: the active one, the one loading, the history (supervisor thread only)."""

    def __init__(self, plan, block) -> None:
        self.plan = plan
        self.block = block
        from flexemr.auth import load_secret

        secret = load_secret(plan.cfg.daemon.secret_file) if plan.cfg.daemon.secret_file else None
        self.links = [ServerLink(a, f"supervisor/{plan.instance}/model", secret) for a in plan.servers]
        model_dir = str(plan.cfg.daemon.model)
        self.state: dict[str, Any] = {
            "active": BOOT_VERSION, "loading": None, "previous": None, "last_error": None,
            "dirs": {str(BOOT_VERSION): model_dir}, "dense_dirs": {str(BOOT_VERSION): model_dir},
            "history": [], "servers": {},
            # how to rebuild the active version on a server that booted with version 1:
            # its last full version (if not version 1) and the deltas since, in order
            "recipe": [],
        }
        self._last_repair = 0.0
        self._last_poll = 0.0
        self._switch_epoch = 0

    def close(self) -> None:
        for link in self.links:
            link.close()

    def publish(self) -> None:
        topo = dict(self.block.topology)
        topo["model"] = self.state
        self.block.set_topology(topo)

    # -------------------------------------------------------------- emrctl model push

    def push(self, path: str, delta: bool, version: int, base: int) -> dict[str, Any]:
        if not self.plan.servers:
            raise PushRefused("this ranker pools its own tables (no embedding servers): restart it on the new model")
        if self.state["loading"] is not None:
            raise PushRefused(f"version {self.state['loading']['version']} is still being rolled out")
        p = Path(path).resolve()
        if not p.is_dir():
            raise PushRefused(f"{p}: no such directory")
        active = int(self.state["active"])
        known = [int(v) for v in self.state["dirs"]]
        version = version or max(known + [active]) + 1
        if version <= active:
            raise PushRefused(f"version {version} is not newer than the active version {active}")
        delta = delta or is_delta(p)
        base = base or active
        if delta and base != active:
            raise PushRefused(f"a delta must be based on the active version {active} (got --base {base})")
        root = self.state["dirs"][str(active)]
        spec = self.plan.spec
        try:
            if delta:
                changed = read_delta(p, spec)
                if not changed and not (p / "dense.pt").exists():
                    raise PushRefused(f"{p}: the delta changes nothing (no delta/NAME.ids.npy files, no dense.pt)")
            else:
                problems = same_architecture(spec, load_spec(p))
                if problems:
                    raise PushRefused(f"{p} cannot replace the serving model live: " + "; ".join(problems))
                if not (p / "dense.pt").exists():
                    raise PushRefused(f"{p}: missing dense.pt")
        except PushRefused:
            raise
        except Exception as e:  # ModelError, a bad model.toml: say what is wrong, push nothing
            raise PushRefused(str(e)) from None
        dense_dir = dense_dir_of(p, self.state["dense_dirs"][str(active)]) if delta else str(p)
        now = time.time()
        self.state["loading"] = {
            "version": version, "dir": str(p), "delta": delta, "base": base if delta else 0,
            "dense_dir": dense_dir, "state": "loading", "started_unix": now, "servers_live": 0,
            "servers_total": len(self.links), "dense_loaded": False,
        }
        self.state["last_error"] = None
        op = ModelOp.LOAD_DELTA if delta else ModelOp.LOAD
        errors = []
        for i, link in enumerate(self.links):
            try:
                self._record(i, link.model(op, version, base if delta else 0, str(p)))
            except (OSError, ConnectionError, PushRefused) as e:
                errors.append(f"embedding[{i}] ({link.address}): {e}")
        if errors:
            # Loading was refused (e.g. a missing base): nobody switches, what did start is released.
            self._fail("; ".join(errors))
            raise PushRefused(self.state["last_error"])
        self.publish()
        logger.info("model version %d: loading %s (%s) on %d embedding servers", version, p,
                    f"delta on {base}" if delta else "full", len(self.links))
        return {"version": version, "state": "loading", "delta": delta, "dir": str(p), "active": active}

    # -------------------------------------------------------------- supervisor tick

    def tick(self, now: float) -> None:
        if self.state["recipe"] and now - self._last_repair >= REPAIR_S:
            self._last_repair = now
            self._repair()
        job = self.state["loading"]
        if job is None or now - self._last_poll < POLL_S:
            return
        self._last_poll = now
        elapsed = time.time() - job["started_unix"]
        if job["state"] == "loading":
            self._poll_servers(job)
            if self.state["loading"] is None:
                return
            if self._all_live(job) and job["dense_loaded"]:
                self._switch(job)
            elif elapsed > LOAD_TIMEOUT_S:
                self._fail(f"version {job['version']} was not live on every embedding server within "
                           f"{LOAD_TIMEOUT_S:g} s")
            else:
                self.publish()
        elif job["state"] == "switching":
            if self.block.ranker.read()["epoch_seen"] >= self._switch_epoch:
                self._finish(job)
            elif time.time() - job["live_unix"] > SWITCH_TIMEOUT_S:
                self._fail(f"the inference process did not switch to version {job['version']} within "
                           f"{SWITCH_TIMEOUT_S:g} s (see its log)", switched=True)

    def _record(self, i: int, st: codec.ModelStatus) -> None:
        entry = {"versions": {str(v): VersionState.LABELS.get(s, str(s)) for v, (s, _b, _t) in st.versions.items()},
                 "rss_bytes": st.rss_bytes, "peak_rss_bytes": st.peak_rss_bytes}
        job = self.state["loading"]
        if job is not None and job["version"] in st.versions:
            entry["load_s"] = round(st.versions[job["version"]][2], 3)
        if st.message:
            entry["message"] = st.message
        self.state["servers"][str(i)] = entry

    def _poll_servers(self, job: dict[str, Any]) -> None:
        v = job["version"]
        live = 0
        for i, link in enumerate(self.links):
            try:
                st = link.model(ModelOp.LIST)
            except (OSError, ConnectionError, PushRefused):
                continue   # down or restarting: it is not live yet (the engines reconnect to it)
            if v not in st.versions:
                # A server that restarted lost what it loaded: ask again (a delta needs its base).
                try:
                    op = ModelOp.LOAD_DELTA if job["delta"] else ModelOp.LOAD
                    st = link.model(op, v, job["base"], job["dir"])
                except (OSError, ConnectionError, PushRefused):
                    continue
            self._record(i, st)
            state = st.versions.get(v, (0, 0, 0.0))[0]
            if state == VersionState.FAILED:
                self._fail(f"embedding[{i}] could not load version {v}: {st.message}")
                return
            live += state == VersionState.LIVE
        job["servers_live"] = live
        self._live = {i for i, e in self.state["servers"].items()
                      if e.get("versions", {}).get(str(v)) == "live"}

    def dense_loaded(self, version: int, error: str) -> dict[str, Any]:
        """The inference process preloaded ``version``'s dense NN (``error`` empty) or could not."""
        job = self.state["loading"]
        if job is None or job["version"] != version:
            return {"version": version, "ignored": True}
        if error:
            self._fail(f"version {version}: the inference process cannot load its dense NN: {error}")
        else:
            job["dense_loaded"] = True
            self.publish()
        return {"version": version, "ignored": False}

    def _all_live(self, job: dict[str, Any]) -> bool:
        """Every shard group live on every one of its holders (a replica without it would refuse requests)."""
        live = {int(i) for i in getattr(self, "_live", set())}
        routing = self.plan.routing
        return all(set(routing.holders_of(p)) <= live for p in range(len(self.links)))

    def _switch(self, job: dict[str, Any]) -> None:
        v = job["version"]
        job["state"] = "switching"
        job["live_unix"] = time.time()
        job["live_after_s"] = round(job["live_unix"] - job["started_unix"], 3)
        self.state["dirs"][str(v)] = job["dir"]
        self.state["dense_dirs"][str(v)] = job["dense_dir"]
        self.state["previous"] = self.state["active"]
        self.state["active"] = v
        self.publish()   # the topology names the version before the epoch tells anyone to look
        self._switch_epoch = self.block.runtime.publish()
        logger.info("model version %d live on every embedding server after %.2f s: switching the ranker", v,
                    job["live_after_s"])

    def _finish(self, job: dict[str, Any]) -> None:
        v, old = job["version"], self.state["previous"]
        for link in self.links:
            try:
                link.model(ModelOp.RETIRE, old)
            except (OSError, ConnectionError, PushRefused) as e:
                logger.warning("could not retire version %d on %s: %s", old, link.address, e)
        done = time.time()
        entry = {"version": v, "delta": job["delta"], "dir": job["dir"], "started_unix": job["started_unix"],
                 "live_after_s": job["live_after_s"],
                 "switched_after_s": round(done - job["started_unix"], 3), "replaced": old}
        self.state["history"] = (self.state["history"] + [entry])[-16:]
        step = {"version": v, "delta": job["delta"], "base": job["base"], "dir": job["dir"]}
        self.state["recipe"] = (self.state["recipe"] if job["delta"] else []) + [step]
        self.state["dirs"] = {k: d for k, d in self.state["dirs"].items() if int(k) >= v}
        self.state["dense_dirs"] = {k: d for k, d in self.state["dense_dirs"].items() if int(k) >= v}
        self.state["loading"] = None
        self.publish()
        logger.info("model version %d active (live after %.2f s, switched after %.2f s); version %s released", v,
                    entry["live_after_s"], entry["switched_after_s"], old)

    def _repair(self) -> None:
        """Replay the active version's recipe on servers that lack it (restarted), one step per poll."""
        active = int(self.state["active"])
        job = self.state["loading"]
        for i, link in enumerate(self.links):
            try:
                st = link.model(ModelOp.LIST)
                live = {v for v, (s, _b, _t) in st.versions.items() if s == VersionState.LIVE}
                if active in live:
                    continue
                busy = [v for v, (s, _b, _t) in st.versions.items() if s == VersionState.LOADING]
                if busy:
                    continue   # one step at a time: the next one may need this one as its base
                for step in self.state["recipe"]:
                    if step["version"] in live:
                        continue
                    logger.warning("embedding[%d] lacks model version %d (restarted?): loading version %d again",
                                   i, active, step["version"])
                    op = ModelOp.LOAD_DELTA if step["delta"] else ModelOp.LOAD
                    st = link.model(op, step["version"], step["base"], step["dir"])
                    break
                self._record(i, st)
            except (OSError, ConnectionError, PushRefused) as e:
                logger.debug("repair of embedding[%d]: %s", i, e)
                continue
        # Once active everywhere, drop what restarted servers booted with (and steps in between).
        keep = {active} | ({job["version"]} if job else set())
        for i, link in enumerate(self.links):
            entry = self.state["servers"].get(str(i), {})
            stale = [int(v) for v, s in entry.get("versions", {}).items()
                     if s == "live" and int(v) not in keep and int(v) < active]
            if stale and entry.get("versions", {}).get(str(active)) == "live":
                for v in stale:
                    try:
                        self._record(i, link.model(ModelOp.RETIRE, v))
                    except (OSError, ConnectionError, PushRefused):
                        pass

    def _fail(self, message: str, switched: bool = False) -> None:
        job = self.state["loading"]
        v = job["version"] if job else 0
        logger.error("model push of version %d failed: %s", v, message)
        if switched:   # put the old version back in the topology; the servers still hold it
            self.state["active"] = self.state["previous"]
        for link in self.links if not switched else ():
            try:
                link.model(ModelOp.RETIRE, v)
            except (OSError, ConnectionError, PushRefused):
                pass
        self.state["last_error"] = message
        self.state["loading"] = None
        self.state["dirs"].pop(str(v), None)
        self.state["dense_dirs"].pop(str(v), None)
        self.publish()
