"""``python -m flexemr.kserve``: the KServe v2 front as its own process, over a ranker's unix socket.

    python -m flexemr.kserve --socket /run/flexemr/ranker.sock --model /var/lib/flexemr/model \\
        --http-port 8000 --grpc-port 8001 [--host 127.0.0.1]

Prints ``ready http=PORT grpc=PORT`` on stdout once both listen (port 0 picks
a free one and the line says which), serves until SIGTERM or SIGINT, then
stops accepting and lets requests in flight finish.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from flexemr.kserve.server import DEFAULT_HOST, KServeServer
from flexemr.kserve.socket_backend import SocketBackend
from flexemr.model.spec import load_spec


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", required=True, help="Unix socket of the ranker's inference API.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Model directory the ranker serves (for the table order and metadata).")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address both fronts bind.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None, help="KServe HTTP/REST port (0 = any free).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None, help="KServe gRPC port (0 = any free).")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Worker threads of each front, and ranker connections in the pool.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(socket_path: str, model_dir: str, host: str, http_port: int | None, grpc_port: int | None,
         threads: int, log_level: str) -> None:
    """Serve the KServe v2 inference protocol (Triton's) in front of a flexemr ranker."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s kserve %(levelname)s %(name)s: %(message)s")
    if http_port is None and grpc_port is None:
        raise click.UsageError("give --http-port, --grpc-port or both")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # only set a flag: the main loop does the work
    backend = SocketBackend(socket_path, load_spec(model_dir), pool_size=threads)
    front = KServeServer(backend, host=host, http_port=http_port, grpc_port=grpc_port, threads=threads)
    front.start()
    print(f"ready http={front.http_port or 0} grpc={front.grpc_port or 0}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        front.stop()
        backend.close()


if __name__ == "__main__":
    main()
