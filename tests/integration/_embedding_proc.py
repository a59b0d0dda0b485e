"""One embedding server process for the integration tests, run through the daemon's own entry.

    python tests/integration/_embedding_proc.py MODEL_DIR INDEX N_SERVERS STRATEGY MAX_PAYLOAD

Builds this server's shards from ``RoutingTable.build(spec, N_SERVERS, STRATEGY)``,
listens on a loopback port chosen by the kernel, prints ``PORT <n>`` and then
runs ``flexemrd.embedding.main.embedding_main`` (one torch thread), which prints
``READY`` on the same stdout once it serves and returns on SIGTERM.
"""

from __future__ import annotations

import os
import socket
import sys


def main() -> None:
    model, index, n_servers, strategy, max_payload = sys.argv[1:6]
    from flexemr.model.spec import load_spec
    from flexemr.routing.table import RoutingTable
    from flexemrd.embedding.main import EmbeddingPlan, embedding_main
    from flexemrd.process import ReadyPipe

    spec = load_spec(model)
    routing = RoutingTable.build(spec, int(n_servers), strategy)
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    plan = EmbeddingPlan(int(index), model, spec, routing.shards_of(int(index)), listener, threads=1,
                         max_payload=int(max_payload), log_level="warning")
    embedding_main(plan, ReadyPipe(os.dup(sys.stdout.fileno())))


if __name__ == "__main__":
    main()
