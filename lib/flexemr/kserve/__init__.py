"""The KServe v2 inference protocol (what Triton, KServe and MLServer speak), HTTP and gRPC.

A front in front of a ranker, written against :class:`~flexemr.kserve.types.InferenceBackend`
so that it runs over the unix socket (:mod:`flexemr.kserve.socket_backend`,
``python -m flexemr.kserve``) or inside the inference process.

- :mod:`~flexemr.kserve.convert`: HPS (DES/CATCOLUMN/ROWINDEX) and KJT input conventions, outputs, metadata
- :mod:`~flexemr.kserve.service`: health, metadata, one inference call (protocol-neutral)
- :mod:`~flexemr.kserve.http`: REST + binary tensor extension (WSGI on cheroot)
- :mod:`~flexemr.kserve.grpc`: ``inference.GRPCInferenceService`` on grpcio (proto/ holds the .proto)
- :mod:`~flexemr.kserve.server`: start/stop both on threads

This package never imports ``flexemrd``.  docs/KSERVE.md is the user's page.
"""

from flexemr.kserve.types import LOOKUP_MODEL, PREDICT_MODEL, BackendUnavailable, InferenceBackend, Tensor

__all__ = ["InferenceBackend", "BackendUnavailable", "Tensor", "PREDICT_MODEL", "LOOKUP_MODEL"]
