"""The KServe v2 front against a real ``flexemrd local``, driven by the real tritonclient.

Answers must match lib/flexemr/monolithic.py (the oracle) for HPS-convention
(DES/CATCOLUMN/ROWINDEX) and KJT-convention requests, over HTTP (binary and
JSON) and gRPC; malformed requests get the protocol's errors and the next good
request is served; readiness follows the ranker.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from flexemr.client import InferenceClient  # noqa: E402
from flexemr.kserve.convert import kjt_to_csr  # noqa: E402
from flexemr.monolithic import MonolithicModel  # noqa: E402
from tests.conftest import REPO, LocalCluster  # noqa: E402
from tests.helpers.daemons import free_ports, stop_process  # noqa: E402

pytestmark = pytest.mark.timeout(600)
CLIENTS = {"http": tritonclient_http, "grpc": tritonclient_grpc}


class Front:
    """``python -m flexemr.kserve`` as a subprocess on free ports."""

    def __init__(self, cluster: LocalCluster, model, tmp) -> None:
        self.log = tmp / "kserve.log"
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexemr.kserve", "--socket", cluster.socket, "--model", str(model),
             "--http-port", "0", "--grpc-port", "0", "--threads", "4"],
            stdout=subprocess.PIPE, stderr=self._logf, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            raise RuntimeError(f"kserve front did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        fields = dict(kv.split("=") for kv in line.split()[1:])
        self.http_port, self.grpc_port = int(fields["http"]), int(fields["grpc"])

    def url(self, kind: str) -> str:
        return f"127.0.0.1:{self.http_port if kind == 'http' else self.grpc_port}"

    def stop(self) -> int:
        rc = stop_process(self.proc, timeout=20)
        self._logf.close()
        return rc


class DaemonFront:
    """The front inside the daemon: ``flexemrd local --http-port P --grpc-port Q``."""

    def __init__(self, cluster: LocalCluster, http_port: int, grpc_port: int) -> None:
        self.cluster, self.http_port, self.grpc_port = cluster, http_port, grpc_port

    def url(self, kind: str) -> str:
        return f"127.0.0.1:{self.http_port if kind == 'http' else self.grpc_port}"

    def stop(self) -> int:
        return 0


@pytest.fixture(scope="module", params=["sidecar", "daemon"])
def stack(request, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kserve")
    if request.param == "daemon":
        http_port, grpc_port = free_ports(2)
        cluster = LocalCluster(tiny_model, tmp, servers=2, engines=1,
                               extra=["--http-port", str(http_port), "--grpc-port", str(grpc_port)])
        front = DaemonFront(cluster, http_port, grpc_port)
        yield cluster, front
        cluster.stop()
        return
    cluster = LocalCluster(tiny_model, tmp, servers=2, engines=1)
    try:
        front = Front(cluster, tiny_model, tmp)
    except BaseException:
        cluster.stop()
        raise
    yield cluster, front
    assert front.stop() == 0, front.log.read_text()[-3000:]
    cluster.stop()


@pytest.fixture(scope="module")
def oracle(tiny_model) -> MonolithicModel:
    return MonolithicModel(tiny_model)


def _batch(spec, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    sparse = {}
    for t in spec.tables:
        lengths = rng.integers(0, 5, batch).astype(np.int32)
        sparse[t.name] = (rng.integers(0, t.rows, int(lengths.sum())).astype(np.int64), lengths)
    return rng.random((batch, spec.dense_features), dtype=np.float32), sparse


def _inputs(mod, tensors, binary: bool = True):
    out = []
    for name, arr in tensors:
        dt = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32", np.uint32: "UINT32"}[arr.dtype.type]
        i = mod.InferInput(name, list(arr.shape), dt)
        if mod is tritonclient_http:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        out.append(i)
    return out


def _hps_tensors(spec, dense, sparse, flat_des: bool = False):
    keys, row_index = kjt_to_csr(spec.table_names, sparse)
    des = dense.reshape(1, -1) if flat_des else dense
    return [("DES", des), ("CATCOLUMN", keys), ("ROWINDEX", row_index)]


def _kjt_tensors(dense, sparse):
    out = [("DES", dense)] if dense is not None else []
    for name, (values, lengths) in sparse.items():
        out += [(f"{name}__values", values), (f"{name}__lengths", lengths)]
    return out


def _scores(result) -> np.ndarray:
    return result.as_numpy("OUTPUT0")


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_health_and_metadata(stack, oracle, kind):
    _, front = stack
    mod = CLIENTS[kind]
    c = mod.InferenceServerClient(front.url(kind))
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("flexemr") and c.is_model_ready("flexemr_lookup")
    assert not c.is_model_ready("dcn")
    meta = c.get_server_metadata()
    md = c.get_model_metadata("flexemr")
    if kind == "grpc":
        assert meta.name == "flexemr" and "binary_tensor_data" in meta.extensions
        names = [t.name for t in md.inputs]
        assert [t.name for t in md.outputs] == ["OUTPUT0"]
    else:
        assert meta["name"] == "flexemr" and "binary_tensor_data" in meta["extensions"]
        names = [t["name"] for t in md["inputs"]]
        assert [t["name"] for t in md["outputs"]] == ["OUTPUT0"]
    assert names[:3] == ["DES", "CATCOLUMN", "ROWINDEX"]
    assert "t0__values" in names and "t3__lengths" in names
    with pytest.raises(InferenceServerException, match="unknown model 'dcn'"):
        c.get_model_metadata("dcn")


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("flat_des", [False, True])
def test_hps_convention_scores_match_the_monolithic_model(stack, oracle, kind, flat_des):
    _, front = stack
    mod = CLIENTS[kind]
    c = mod.InferenceServerClient(front.url(kind))
    dense, sparse = _batch(oracle.spec, 37, seed=3)
    result = c.infer("flexemr", _inputs(mod, _hps_tensors(oracle.spec, dense, sparse, flat_des)),
                     outputs=[mod.InferRequestedOutput("OUTPUT0")])
    got = _scores(result)
    assert got.shape == (37,) and got.dtype == np.float32
    np.testing.assert_allclose(got, oracle.predict(dense, sparse), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,binary", [("http", True), ("http", False), ("grpc", True)])
def test_kjt_convention_scores_match_the_monolithic_model(stack, oracle, kind, binary):
    _, front = stack
    mod = CLIENTS[kind]
    c = mod.InferenceServerClient(front.url(kind))
    dense, sparse = _batch(oracle.spec, 19, seed=4)
    outputs = [mod.InferRequestedOutput("OUTPUT0", binary_data=binary)] if kind == "http" else None
    result = c.infer("flexemr", _inputs(mod, _kjt_tensors(dense, sparse), binary), outputs=outputs)
    np.testing.assert_allclose(_scores(result), oracle.predict(dense, sparse), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_lookup_model_returns_pooled_embeddings(stack, oracle, kind):
    _, front = stack
    mod = CLIENTS[kind]
    c = mod.InferenceServerClient(front.url(kind))
    _, sparse = _batch(oracle.spec, 11, seed=5)
    want = oracle.lookup(sparse)
    kjt = c.infer("flexemr_lookup", _inputs(mod, _kjt_tensors(None, {"t1": sparse["t1"], "t3": sparse["t3"]})))
    for t in ("t1", "t3"):
        np.testing.assert_allclose(kjt.as_numpy(f"{t}__pooled"), want[t], rtol=1e-5, atol=1e-6)
    assert kjt.as_numpy("t0__pooled") is None
    keys, row_index = kjt_to_csr(oracle.spec.table_names, sparse)
    hps = c.infer("flexemr_lookup", _inputs(mod, [("CATCOLUMN", keys), ("ROWINDEX", row_index)]))
    np.testing.assert_allclose(hps.as_numpy("OUTPUT0"),
                               np.concatenate([want[t] for t in oracle.spec.table_names], axis=1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_malformed_requests_get_protocol_errors_and_the_next_request_is_served(stack, oracle, kind):
    _, front = stack
    mod = CLIENTS[kind]
    c = mod.InferenceServerClient(front.url(kind))
    spec = oracle.spec
    dense, sparse = _batch(spec, 8, seed=6)
    good = _hps_tensors(spec, dense, sparse)
    bad_rows = dict(good)
    bad_rows["ROWINDEX"] = bad_rows["ROWINDEX"][:-1]
    out_of_range = {**sparse, "t2": (np.full_like(sparse["t2"][0], spec.table("t2").rows + 5), sparse["t2"][1])}
    cases = [
        (good[:2], "input 'ROWINDEX': required with CATCOLUMN"),
        (list(bad_rows.items()), "ROWINDEX: has 32 offsets"),
        (good[1:], "input 'DES': required by model 'flexemr'"),
        ([("DES", dense[:, :5].copy())] + good[1:], "input 'DES'"),
        (_kjt_tensors(dense, out_of_range), "t2"),                    # the ranker's own validation
        (good + [("t0__values", sparse["t0"][0])], "mix the HPS convention"),
    ]
    code = "400" if kind == "http" else "INVALID_ARGUMENT"
    for tensors, match in cases:
        with pytest.raises(InferenceServerException, match=match) as info:
            c.infer("flexemr", _inputs(mod, tensors))
        assert code in str(info.value.status())
    np.testing.assert_allclose(_scores(c.infer("flexemr", _inputs(mod, good))), oracle.predict(dense, sparse),
                               rtol=1e-5, atol=1e-6)


def _post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def test_raw_http_errors_name_the_field(stack, oracle):
    _, front = stack
    port = front.http_port
    status, body = _post(port, "/v2/models/flexemr/infer", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]
    req = json.dumps({"inputs": [{"name": "CATCOLUMN", "datatype": "INT64", "shape": [2],
                                  "parameters": {"binary_data_size": 16}}]}).encode()
    status, body = _post(port, "/v2/models/flexemr/infer", req + b"\0" * 8,
                         {"Inference-Header-Content-Length": str(len(req))})
    assert status == 400 and "binary_data_size 16 runs past the binary data" in body["error"]
    status, body = _post(port, "/v2/models/flexemr/infer", json.dumps({"inputs": [
        {"name": "CATCOLUMN", "datatype": "INT64", "shape": [2], "data": [1, "x"]}]}).encode(), {})
    assert status == 400 and "input 'CATCOLUMN'" in body["error"]
    status, body = _post(port, "/v2/models/nope/infer", b"{}", {})
    assert status == 404 and "unknown model 'nope'" in body["error"]
    # JSON in, JSON out, with a version in the path and the request id echoed
    dense, sparse = _batch(oracle.spec, 3, seed=7)
    keys, row_index = kjt_to_csr(oracle.spec.table_names, sparse)
    req = {"id": "r1", "inputs": [
        {"name": "DES", "datatype": "FP32", "shape": [3, 13], "data": dense.tolist()},
        {"name": "CATCOLUMN", "datatype": "INT64", "shape": [len(keys)], "data": keys.tolist()},
        {"name": "ROWINDEX", "datatype": "INT32", "shape": [len(row_index)], "data": row_index.tolist()}]}
    status, body = _post(port, "/v2/models/flexemr/versions/1/infer", json.dumps(req).encode(), {})
    assert status == 200 and body["id"] == "r1" and body["outputs"][0]["name"] == "OUTPUT0"
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"], np.float32), oracle.predict(dense, sparse),
                               rtol=1e-5, atol=1e-6)


def test_predict_csr_on_the_unix_socket(stack, oracle):
    cluster, _ = stack
    dense, sparse = _batch(oracle.spec, 21, seed=8)
    keys, row_index = kjt_to_csr(oracle.spec.table_names, sparse)
    with InferenceClient(cluster.socket) as c:
        got = c.predict_csr(dense.reshape(-1), keys, row_index, tables=oracle.spec)
    np.testing.assert_allclose(got, oracle.predict(dense, sparse), rtol=1e-5, atol=1e-6)


def _embedding_servers(cluster: LocalCluster) -> list:
    import psutil

    procs = [psutil.Process(pid) for pid in cluster.children()]
    return [p for p in procs if p.name().startswith("flexemr-emb")]


def test_not_ready_while_a_shard_has_no_live_server(stack, oracle):
    """A frozen embedding server: its shard has no live server, so the front says not ready, then ready again."""
    import signal
    import time

    cluster, front = stack
    h = tritonclient_http.InferenceServerClient(front.url("http"))
    g = tritonclient_grpc.InferenceServerClient(front.url("grpc"))
    servers = _embedding_servers(cluster)
    assert len(servers) == 2, [p.name() for p in servers]
    assert h.is_server_ready() and g.is_server_ready()
    servers[1].send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        while (h.is_server_ready() or g.is_server_ready()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not h.is_server_ready() and not g.is_server_ready() and not g.is_model_ready("flexemr")
        assert h.is_server_live() and g.is_server_live()
    finally:
        servers[1].send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while not (h.is_server_ready() and g.is_server_ready()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert h.is_server_ready() and g.is_server_ready()
    dense, sparse = _batch(oracle.spec, 6, seed=10)
    np.testing.assert_allclose(_scores(g.infer("flexemr", _inputs(tritonclient_grpc, _kjt_tensors(dense, sparse)))),
                               oracle.predict(dense, sparse), rtol=1e-5, atol=1e-6)


def test_ready_follows_the_ranker(tiny_model, tmp_path, oracle):
    """In-process front (next to tritonclient in one process): not ready while the ranker is gone, and a
    restarted ranker is served again (pooled connections to the old one are replaced, not failed)."""
    import time

    from flexemr.kserve.server import KServeServer
    from flexemr.kserve.socket_backend import SocketBackend

    cluster = LocalCluster(tiny_model, tmp_path, servers=1, engines=1)
    backend = SocketBackend(cluster.socket, oracle.spec, pool_size=2)
    dense, sparse = _batch(oracle.spec, 4, seed=9)
    want = oracle.predict(dense, sparse)
    try:
        with KServeServer(backend, http_port=0, grpc_port=0, threads=2) as front:
            h = tritonclient_http.InferenceServerClient(f"127.0.0.1:{front.http_port}")
            g = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{front.grpc_port}")
            assert h.is_server_ready() and g.is_server_ready()
            np.testing.assert_allclose(_scores(g.infer("flexemr", _inputs(tritonclient_grpc, _kjt_tensors(dense, sparse)))),
                                       want, rtol=1e-5, atol=1e-6)
            cluster.stop()
            time.sleep(backend.cache_s)
            assert h.is_server_live() and g.is_server_live()
            assert not h.is_server_ready() and not g.is_server_ready()
            assert not h.is_model_ready("flexemr") and not g.is_model_ready("flexemr")

            cluster = LocalCluster(tiny_model, tmp_path, servers=1, engines=1, instance=cluster.instance)
            deadline = time.monotonic() + 30
            while not h.is_server_ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert h.is_server_ready() and g.is_server_ready()
            np.testing.assert_allclose(_scores(g.infer("flexemr", _inputs(tritonclient_grpc, _kjt_tensors(dense, sparse)))),
                                       want, rtol=1e-5, atol=1e-6)

            cluster.stop()
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                g.infer("flexemr", _inputs(tritonclient_grpc, _kjt_tensors(dense, sparse)))
            with pytest.raises(InferenceServerException, match="503"):
                h.infer("flexemr", _inputs(tritonclient_http, _kjt_tensors(dense, sparse)))
    finally:
        backend.close()
        cluster.stop()
