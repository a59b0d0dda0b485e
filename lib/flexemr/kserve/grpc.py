"""KServe v2 over gRPC: ``inference.GRPCInferenceService`` on grpcio.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and
ModelInfer from the published ``grpc_predict_v2.proto`` (the subset of
Triton's service that KServe standardises; tritonclient.grpc calls the same
paths).  Inputs come as ``raw_input_contents`` (one bytes entry per input, what
tritonclient sends) or as typed ``contents``; outputs go back as
``raw_output_contents``.  Bad requests end with INVALID_ARGUMENT (NOT_FOUND for
an unknown model, UNAVAILABLE when the ranker cannot serve) and a message
naming the field; the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from flexemr.errors import RequestError
from flexemr.kserve import convert
from flexemr.kserve.proto import SERVICE, messages
from flexemr.kserve.service import KServeService
from flexemr.kserve.types import MODEL_VERSION, BackendUnavailable

logger = logging.getLogger(__name__)

# typed contents field of each datatype (InferTensorContents)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class KServeGrpcServicer:
    """The six RPCs, each a plain method taking (request, context)."""

    def __init__(self, service: KServeService) -> None:
        self.service = service
        self.pb = messages()

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.ServerLiveResponse(live=self.service.live())

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.ServerReadyResponse(ready=self.service.ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version or None))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.ServerMetadataResponse(**self.service.server_metadata())

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        md = self.service.model_metadata(request.name, request.version or None)
        tm = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[tm(**t) for t in md["inputs"]], outputs=[tm(**t) for t in md["outputs"]])

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise RequestError(f"raw_input_contents: has {len(raw)} entries for {len(request.inputs)} inputs "
                               "(one per input, in input order)")
        inputs = []
        for i, t in enumerate(request.inputs):
            name = t.name or f"inputs[{i}]"
            if raw:
                if t.HasField("contents"):
                    raise RequestError(f"input {name!r}: contents must be empty when raw_input_contents is used")
                inputs.append((name, convert.decode_raw(name, t.datatype, list(t.shape), raw[i])))
            else:
                field = _CONTENTS_FIELD.get(t.datatype)
                if field is None:
                    raise RequestError(f"input {name!r}: datatype {t.datatype!r} is not supported")
                values = getattr(t.contents, field)
                inputs.append((name, convert.decode_list(name, t.datatype, list(t.shape), list(values))))
        requested = [o.name for o in request.outputs] or None
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        left = context.time_remaining() if context is not None else None  # None: the client set no deadline
        tensors = self.service.infer(request.model_name, request.model_version or None, inputs, requested, params,
                                     deadline_s=left)
        resp = self.pb.ModelInferResponse(model_name=request.model_name,
                                          model_version=request.model_version or MODEL_VERSION, id=request.id)
        for t in tensors:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            resp.raw_output_contents.append(np.ascontiguousarray(t.data).tobytes())
        return resp


def _guarded(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    """Turn our exceptions into gRPC status codes (abort raises, ending only this RPC)."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except convert.UnknownModel as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BackendUnavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:
            logger.exception("gRPC %s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    call.__name__ = fn.__name__
    return call


def make_server(service: KServeService, address: str, threads: int = 8,
                max_message_bytes: int = 256 << 20) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) grpc.Server on ``address`` ("host:port"); returns it and the port."""
    pb = messages()
    servicer = KServeGrpcServicer(service)
    rpcs = {
        "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(getattr(servicer, name)), request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString)
        for name, (req, resp) in rpcs.items()
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kserve-grpc"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"gRPC: cannot bind {address}")
    return server, port
