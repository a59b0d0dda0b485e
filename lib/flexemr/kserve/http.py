"""KServe v2 over HTTP/REST: a WSGI application (served by cheroot, see server.py).

Routes (``/versions/1`` may follow the model name)::

    GET  /v2                              server metadata
    GET  /v2/health/live                  200 while the process answers
    GET  /v2/health/ready                 200 when every shard has a live server, else 400
    GET  /v2/models/{model}               model metadata (flexemr, flexemr_lookup)
    GET  /v2/models/{model}/ready         200 / 400
    POST /v2/models/{model}/infer         inference

Inference bodies are JSON, or use the binary tensor data extension: the
``Inference-Header-Content-Length: N`` header says the first N bytes are the
JSON header; an input whose ``parameters.binary_data_size`` is set has no
``data`` and takes that many bytes, in input order, from what follows.
Outputs are binary when the request sets ``parameters.binary_data_output`` or
the output's ``parameters.binary_data`` (what tritonclient does by default),
JSON ``data`` lists otherwise.  gzip/deflate request bodies
(``Content-Encoding``) are accepted.  Errors are ``{"error": "..."}`` with 400
(bad request, naming the field), 404 (unknown model or path), 413 (too
large), 503 (ranker unavailable); the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from flexemr.errors import RequestError
from flexemr.kserve import convert
from flexemr.kserve.service import KServeService
from flexemr.kserve.types import MODEL_VERSION, BackendUnavailable, Tensor

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_ENV = "HTTP_INFERENCE_HEADER_CONTENT_LENGTH"
_MODEL_RE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?/?$")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 405: "405 Method Not Allowed",
           411: "411 Length Required", 413: "413 Payload Too Large", 500: "500 Internal Server Error",
           503: "503 Service Unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class KServeHttpApp:
    """The WSGI callable."""

    def __init__(self, service: KServeService, max_request_bytes: int = 256 << 20) -> None:
        self.service = service
        self.max_request_bytes = max_request_bytes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, headers, body = self._route(environ)
        except HttpError as e:
            status, headers, body = _json(e.status, {"error": str(e)})
        except convert.UnknownModel as e:
            status, headers, body = _json(404, {"error": str(e)})
        except RequestError as e:
            status, headers, body = _json(400, {"error": str(e)})
        except BackendUnavailable as e:
            status, headers, body = _json(503, {"error": str(e)})
        except Exception as e:  # never take the server down for one request
            logger.exception("HTTP %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            status, headers, body = _json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        headers.append(("Content-Length", str(sum(len(b) for b in body))))
        start_response(_STATUS.get(status, str(status)), headers)
        return body

    # ------------------------------------------------------------ routing

    def _route(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        svc = self.service
        if path in ("/v2", "/v2/"):
            _only(method, "GET")
            return _json(200, svc.server_metadata())
        if path == "/v2/health/live":
            _only(method, "GET")
            return _empty(200 if svc.live() else 400)
        if path == "/v2/health/ready":
            _only(method, "GET")
            if svc.ready():
                return _empty(200)
            return _json(400, {"error": "not ready: a shard has no live embedding server or the ranker is down"})
        m = _MODEL_RE.match(path)
        if not m:
            raise HttpError(404, f"no such endpoint: {path}")
        model, version, rest = m.group("model"), m.group("version"), m.group("rest")
        if rest is None:
            _only(method, "GET")
            return _json(200, svc.model_metadata(model, version))
        if rest == "/ready":
            _only(method, "GET")
            if svc.model_ready(model, version):
                return _empty(200)
            return _json(400, {"error": f"model {model!r} is not ready"})
        _only(method, "POST")
        return self._infer(environ, model, version)

    # ------------------------------------------------------------ inference

    def _body(self, environ: dict[str, Any]) -> bytes:
        raw_len = environ.get("CONTENT_LENGTH") or ""
        if not raw_len.strip().isdigit():
            raise HttpError(411, "the request needs a Content-Length")
        n = int(raw_len)
        if n > self.max_request_bytes:
            raise HttpError(413, f"request body of {n} bytes is over the limit of {self.max_request_bytes}")
        body = environ["wsgi.input"].read(n)
        if len(body) != n:
            raise HttpError(400, f"request body ended after {len(body)} of {n} bytes")
        encoding = (environ.get("HTTP_CONTENT_ENCODING") or "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            # gzip and zlib headers both; cap the output so a small bomb cannot eat memory
            d = zlib.decompressobj(wbits=47 if encoding == "gzip" else 15)
            try:
                body = d.decompress(body, self.max_request_bytes + 1)
            except zlib.error as e:
                raise HttpError(400, f"Content-Encoding {encoding}: body does not decompress ({e})") from None
            if len(body) > self.max_request_bytes or d.unconsumed_tail:
                raise HttpError(413, f"decompressed body is over the limit of {self.max_request_bytes} bytes")
        elif encoding != "identity":
            raise HttpError(400, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        return body

    def _infer(self, environ: dict[str, Any], model: str, version: str | None
               ) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        convert.check_model(model, version)
        body = self._body(environ)
        header_len = environ.get(_HEADER_LENGTH_ENV)
        if header_len is not None:
            if not header_len.strip().isdigit() or int(header_len) > len(body):
                raise RequestError(f"{HEADER_LENGTH}: {header_len!r} must be a byte count within the "
                                   f"{len(body)}-byte body")
            split = int(header_len)
        else:
            split = len(body)
        try:
            req = json.loads(body[:split])
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"request body: not valid JSON ({e})") from None
        if not isinstance(req, dict):
            raise RequestError("request body: must be a JSON object with \"inputs\"")
        inputs = self._inputs(req, memoryview(body)[split:])
        params = _object(req.get("parameters"), "parameters")
        raw_outputs = req.get("outputs")
        requested, binary_out = None, {}
        if raw_outputs is not None:
            if not isinstance(raw_outputs, list):
                raise RequestError("outputs: must be a list")
            requested = []
            for i, o in enumerate(raw_outputs):
                if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                    raise RequestError(f"outputs[{i}]: must be an object with a \"name\"")
                requested.append(o["name"])
                binary_out[o["name"]] = bool(_object(o.get("parameters"), f"outputs[{i}].parameters")
                                             .get("binary_data", False))
        all_binary = bool(params.get("binary_data_output", False))
        tensors = self.service.infer(model, version, inputs, requested, params)
        resp: dict[str, Any] = {"model_name": model, "model_version": version or MODEL_VERSION}
        if isinstance(req.get("id"), str) and req["id"]:
            resp["id"] = req["id"]
        resp["outputs"], blobs = _encode_outputs(tensors, all_binary, binary_out)
        header = json.dumps(resp, separators=(",", ":")).encode()
        if not blobs:
            return 200, [("Content-Type", "application/json")], [header]
        return 200, [("Content-Type", "application/octet-stream"), (HEADER_LENGTH, str(len(header)))], \
            [header, *blobs]

    def _inputs(self, req: dict[str, Any], binary: memoryview) -> list[tuple[str, np.ndarray]]:
        raw_inputs = req.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise RequestError("inputs: must be a non-empty list of tensors")
        out = []
        pos = 0
        for i, t in enumerate(raw_inputs):
            if not isinstance(t, dict):
                raise RequestError(f"inputs[{i}]: must be an object")
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise RequestError(f"inputs[{i}].name: must be a non-empty string")
            shape, datatype = t.get("shape"), t.get("datatype")
            if not isinstance(shape, list):
                raise RequestError(f"input {name!r}: shape must be a list of integers")
            if not isinstance(datatype, str):
                raise RequestError(f"input {name!r}: datatype must be a string such as \"INT64\"")
            size = _object(t.get("parameters"), f"input {name!r} parameters").get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise RequestError(f"input {name!r}: parameters.binary_data_size must be a byte count")
                if pos + size > len(binary):
                    raise RequestError(f"input {name!r}: binary_data_size {size} runs past the binary data "
                                       f"({len(binary) - pos} bytes left)")
                out.append((name, convert.decode_raw(name, datatype, shape, binary[pos:pos + size])))
                pos += size
            elif "data" in t:
                out.append((name, convert.decode_list(name, datatype, shape, t["data"])))
            else:
                raise RequestError(f"input {name!r}: has neither data nor parameters.binary_data_size")
        if pos != len(binary):
            raise RequestError(f"{len(binary) - pos} bytes of binary data after the last binary input "
                               f"({HEADER_LENGTH} or binary_data_size is wrong)")
        return out


def _encode_outputs(tensors: list[Tensor], all_binary: bool, binary_out: dict[str, bool]
                    ) -> tuple[list[dict[str, Any]], list[bytes]]:
    outputs, blobs = [], []
    for t in tensors:
        o: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if all_binary or binary_out.get(t.name, False):
            blob = np.ascontiguousarray(t.data).astype(t.data.dtype.newbyteorder("<"), copy=False).tobytes()
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            o["data"] = t.data.reshape(-1).tolist()
        outputs.append(o)
    return outputs, blobs


def _object(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError(f"{where}: must be a JSON object")
    return v


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"method {method} not allowed here (use {allowed})")


def _json(status: int, obj: Any) -> tuple[int, list[tuple[str, str]], list[bytes]]:
    return status, [("Content-Type", "application/json")], [json.dumps(obj, separators=(",", ":")).encode()]


def _empty(status: int) -> tuple[int, list[tuple[str, str]], list[bytes]]:
    return status, [("Content-Type", "text/plain")], [b""]
