"""Start and stop the KServe fronts (HTTP and/or gRPC) on threads of the calling process.

    front = KServeServer(backend, http_port=8000, grpc_port=8001)   # host 127.0.0.1 unless given
    front.start()          # returns once both listen; port 0 picks a free port
    front.http_port, front.grpc_port
    front.stop()

HTTP is cheroot (a threaded WSGI server meant to be embedded: start/stop from
code, no signal handlers, no event loop of its own), whose worker threads
block on the backend the way our socket and batcher calls do.  gRPC is
grpcio's server with its own thread pool.  Neither installs signal handlers,
so the host process (``python -m flexemr.kserve`` or the daemon's inference
process) keeps its own.
"""

from __future__ import annotations

import logging
import threading

from cheroot import wsgi

from flexemr.kserve.http import KServeHttpApp
from flexemr.kserve.service import KServeService
from flexemr.kserve.types import InferenceBackend

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


class KServeServer:
    """Both fronts over one backend; either port may be None (that front off)."""

    def __init__(self, backend: InferenceBackend, host: str = DEFAULT_HOST, http_port: int | None = None,
                 grpc_port: int | None = None, threads: int = 8, max_request_bytes: int = 256 << 20) -> None:
        if http_port is None and grpc_port is None:
            raise ValueError("KServeServer: give http_port, grpc_port or both")
        for what, port in (("http_port", http_port), ("grpc_port", grpc_port)):
            if port is not None and not (0 <= port <= 65535):
                raise ValueError(f"KServeServer: {what} {port} outside 0..65535")
        self.service = KServeService(backend)
        self.host = host
        self.threads = threads
        self.max_request_bytes = max_request_bytes
        self._want_http, self._want_grpc = http_port, grpc_port
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._http: wsgi.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc = None

    def start(self) -> None:
        try:
            if self._want_grpc is not None:
                from flexemr.kserve.grpc import make_server  # grpcio only when the gRPC front is on

                self._grpc, self.grpc_port = make_server(self.service, _join(self.host, self._want_grpc),
                                                         self.threads, self.max_request_bytes)
                self._grpc.start()
                logger.info("KServe gRPC front on %s:%d", self.host, self.grpc_port)
            if self._want_http is not None:
                app = KServeHttpApp(self.service, self.max_request_bytes)
                srv = wsgi.Server((self.host, self._want_http), app, numthreads=self.threads,
                                  server_name="flexemr", timeout=60)
                srv.max_request_body_size = self.max_request_bytes
                srv.prepare()  # binds now, so the port is known and errors surface here
                self._http = srv
                self.http_port = srv.bind_addr[1]
                self._http_thread = threading.Thread(target=srv.serve, name="kserve-http", daemon=True)
                self._http_thread.start()
                logger.info("KServe HTTP front on %s:%d", self.host, self.http_port)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace_s``; idempotent."""
        if self._http is not None:
            self._http.stop()
            if self._http_thread is not None:
                self._http_thread.join(grace_s)
            self._http = self._http_thread = None
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait(grace_s + 1)
            self._grpc = None

    def __enter__(self) -> KServeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
