"""deploy/kubernetes: every manifest validates offline, and the pods would run what the routing expects.

Schemas come from kubernetes-validate (no cluster).  The configs are the
ConfigMap's TOML as each pod would see it: the embedding pods' init script is
run for real (with its paths pointed into a temp dir) for every ordinal, and
its output parsed by flexemr.config; the ranker's servers list must name the
StatefulSet's pods through the headless Service in shard order, as
RoutingTable.build places shards by server index.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from flexemr.config import parse_size  # noqa: E402
from flexemr.model.presets import get_preset  # noqa: E402
from flexemr.routing import RoutingTable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KDIR = REPO / "deploy" / "kubernetes"
BASE = KDIR / "base"
sys.path.insert(0, str(KDIR))
from podconfig import load_pod_config  # noqa: E402
from sizing import size  # noqa: E402

K8S_VERSIONS = ("1.29.0", "1.37.0")   # oldest and newest the base is meant for
SIZED_FOR = "bench8"                 # the model preset the base's resource requests are computed for


def _docs() -> dict[str, dict]:
    out = {}
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def _generated(tmp_path: Path) -> list[dict]:
    """The ConfigMap and Secret kustomize generates (names without the hash suffix it adds and rewrites)."""
    import base64

    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    out = []
    for gen in kust["configMapGenerator"]:
        data = {Path(f).name: (BASE / f).read_text() for f in gen["files"]}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kust["secretGenerator"]:
        data = {}
        for f in gen["files"]:
            key, _, src = f.partition("=")
            assert (BASE / src).parent.is_dir() and src.startswith("secret/")
            data[key] = base64.b64encode(b"a-test-secret").decode()
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "data": data})
    return out


DOCS = _docs()
STS = DOCS["StatefulSet/embedding"]
DEPLOY = DOCS["Deployment/ranker"]


def _container(workload: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return next(c for c in workload["spec"]["template"]["spec"][key] if c["name"] == name)


def _volume(workload: dict, name: str) -> dict:
    return next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def test_every_manifest_validates_against_the_kubernetes_schemas(tmp_path):
    docs = list(DOCS.values()) + _generated(tmp_path)
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "ConfigMap", "Secret",
                                          "PodDisruptionBudget", "PersistentVolumeClaim"}
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_caught():
    bad = yaml.safe_load(yaml.safe_dump(STS))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    for gen in kust["configMapGenerator"]:
        for f in gen["files"]:
            assert (BASE / f).is_file(), f


def _run_setup(tmp_path: Path, hostname: str) -> subprocess.CompletedProcess:
    """The embedding pods' init script, for real, with its env paths pointed into tmp_path."""
    init = _container(STS, "setup", init=True)
    assert init["command"] == ["/bin/sh", "-c"]
    (tmp_path / "tpl").mkdir(exist_ok=True)
    (tmp_path / "tpl" / "embedding.toml").write_text((BASE / "config" / "embedding.toml").read_text())
    (tmp_path / "secret-src").write_text("a-test-secret\n")
    env = {e["name"]: e["value"] for e in init["env"]}
    env.update(FLEXEMR_TEMPLATE=str(tmp_path / "tpl" / "embedding.toml"), FLEXEMR_CONFIG=str(tmp_path / "out.toml"),
               FLEXEMR_SECRET_SRC=str(tmp_path / "secret-src"), FLEXEMR_SECRET=str(tmp_path / "secret"),
               HOSTNAME=hostname, PATH=os.environ["PATH"])
    return subprocess.run([*init["command"], *init["args"]], env=env, capture_output=True, text=True, timeout=30)


def test_pod_ordinal_is_the_shard_index_and_servers_are_what_routing_expects(tmp_path):
    replicas = STS["spec"]["replicas"]
    svc = DOCS[f"Service/{STS['spec']['serviceName']}"]
    port = svc["spec"]["ports"][0]["port"]
    ranker = load_pod_config(BASE / "config" / "ranker.toml")
    spec = get_preset(SIZED_FOR).spec
    # the ranker dials pod N of the StatefulSet through the headless Service, in shard order
    assert ranker.ranker.servers == tuple(f"{STS['metadata']['name']}-{i}.{svc['metadata']['name']}:{port}"
                                          for i in range(replicas))
    routing = RoutingTable.build(spec, len(ranker.ranker.servers), ranker.ranker.routing)
    held = set()
    for ordinal in range(replicas):
        r = _run_setup(tmp_path, f"{STS['metadata']['name']}-{ordinal}")
        assert r.returncode == 0, r.stderr
        cfg = load_pod_config(tmp_path / "out.toml")
        assert cfg.daemon.role == "embedding"
        assert cfg.embedding.index == ordinal
        assert cfg.embedding.servers == replicas == routing.n_servers
        assert cfg.embedding.routing == ranker.ranker.routing
        assert int(cfg.embedding.listen.rpartition(":")[2]) == port
        shards = routing.shards_of(cfg.embedding.index)
        assert shards, f"pod {ordinal} would hold no shard"
        held |= {(s.table, s.start, s.end) for s in shards}
        mode = stat.S_IMODE((tmp_path / "secret").stat().st_mode)
        assert mode == 0o600, oct(mode)
    assert held == {(s.table, s.start, s.end) for s in routing.shards}


def test_setup_refuses_a_hostname_without_ordinal(tmp_path):
    r = _run_setup(tmp_path, "embedding-x")
    assert r.returncode != 0 and "no StatefulSet ordinal" in r.stderr


def test_services_select_the_pods_and_probes_use_real_ports():
    for name, workload in (("embedding", STS), ("ranker", DEPLOY)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = DOCS[f"Service/{name}"]
        assert svc["spec"]["selector"].items() <= labels.items()
        pdb = DOCS[f"PodDisruptionBudget/{name}"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports
    assert DOCS["Service/embedding"]["spec"]["clusterIP"] == "None"
    assert DOCS["PodDisruptionBudget/embedding"]["spec"]["maxUnavailable"] == 0   # one pod per shard: keep all
    front = _container(DEPLOY, "kserve")
    assert front["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert front["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}


def _mounts(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def _covered(path: str, mounts: dict[str, str]) -> str | None:
    best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default=None)
    return mounts.get(best) if best else None


def test_the_daemons_find_their_files():
    ranker = load_pod_config(BASE / "config" / "ranker.toml")
    emb_text = (BASE / "config" / "embedding.toml").read_text()
    for workload, cfg_name in ((STS, "embedding"), (DEPLOY, "ranker")):
        daemon = _container(workload, "flexemrd")
        mounts = _mounts(daemon)
        cfg_path = daemon["command"][daemon["command"].index("--config") + 1]
        assert _covered(cfg_path, mounts) == "config"
        text = emb_text if cfg_name == "embedding" else (BASE / "config" / "ranker.toml").read_text()
        doc = tomllib.loads(text)
        assert _covered(doc["daemon"]["model"], mounts) == "model"
        assert _covered(doc["daemon"]["secret_file"], mounts) == "auth"
        assert _volume(workload, "auth-src")["secret"] == {"secretName": "flexemr-auth", "defaultMode": 0o440}
        setup = {e["name"]: e["value"] for e in _container(workload, "setup", init=True)["env"]}
        assert setup["FLEXEMR_SECRET"] == doc["daemon"]["secret_file"]
    # the front reaches the ranker's socket through the shared volume
    front = _container(DEPLOY, "kserve")
    sock = front["command"][front["command"].index("--socket") + 1]
    assert sock == ranker.ranker.socket
    assert _covered(sock, _mounts(front)) == _covered(sock, _mounts(_container(DEPLOY, "flexemrd"))) == "run"
    assert front["command"][front["command"].index("--host") + 1] == "0.0.0.0"   # probes come from the kubelet
    shm = _volume(DEPLOY, "shm")["emptyDir"]
    assert parse_size(shm["sizeLimit"] + "B") >= 2 * ranker.ranker.engines * ranker.ranker.ring_bytes


def test_resource_requests_are_sized_from_the_model():
    emb = load_pod_config(BASE / "config" / "embedding.toml", index=0)
    ranker = load_pod_config(BASE / "config" / "ranker.toml")
    want = size(get_preset(SIZED_FOR).spec, emb, ranker)
    for workload, container, kind in ((STS, "flexemrd", "embedding"), (DEPLOY, "flexemrd", "ranker"),
                                      (DEPLOY, "kserve", "kserve")):
        res = _container(workload, container)["resources"]
        assert res["requests"] == want[kind], (kind, res["requests"], want[kind])
        assert res["limits"]["memory"] == want[kind]["memory"]
    assert DOCS["PersistentVolumeClaim/flexemr-model"]["spec"]["resources"]["requests"] == want["model_volume"]
