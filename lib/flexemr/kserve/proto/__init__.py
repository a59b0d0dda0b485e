"""The KServe v2 gRPC messages, compiled from ``grpc_predict_v2.proto`` when first imported.

Nothing generated is committed: ``grpc_tools.protoc`` (grpcio-tools, the
``kserve`` extra) turns the .proto beside this file into a FileDescriptorSet
in memory, and the messages are built from it in a **private** descriptor
pool.  Why private: tritonclient's own ``service_pb2`` registers the very same
``inference.*`` names (Triton's superset of this file) in protobuf's default
pool, and two files defining one symbol there is a hard error, so a process
that holds both a tritonclient and this server (a test, a benchmark) could not
import them both.  The wire does not care which pool a class came from.

    from flexemr.kserve.proto import pb
    req = pb.ModelInferRequest(model_name="flexemr")
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
PACKAGE = "inference"
SERVICE = "inference.GRPCInferenceService"

_MESSAGES = (
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
    "InferParameter", "InferTensorContents",
)
_lock = threading.Lock()


def compile_descriptor_set(proto: Path = PROTO) -> bytes:
    """Run protoc (in-process, from grpcio-tools) and return the serialized FileDescriptorSet."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError("the KServe gRPC front needs grpcio-tools (pip install 'flexemr[kserve]')") from None
    with tempfile.TemporaryDirectory(prefix="flexemr-proto-") as tmp:
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) compiling {proto}")
        return Path(out).read_bytes()


def _build() -> SimpleNamespace:
    fds = descriptor_pb2.FileDescriptorSet.FromString(compile_descriptor_set())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    ns = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
          for name in _MESSAGES}
    return SimpleNamespace(pool=pool, **ns)


_pb: SimpleNamespace | None = None


def messages() -> SimpleNamespace:
    """The message classes (``.ModelInferRequest`` ...), built once per process."""
    global _pb
    with _lock:
        if _pb is None:
            _pb = _build()
        return _pb


def __getattr__(name: str) -> SimpleNamespace:
    # ``from flexemr.kserve.proto import pb`` compiles on first use, not at package import.
    if name == "pb":
        return messages()
    raise AttributeError(name)
