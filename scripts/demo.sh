#!/usr/bin/env bash
# The README's first command: set up, generate a model, start a whole local
# cluster (embedding servers + ranker), drive real traffic through it from
# concurrent clients, show throughput and latency, show emrctl status, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY=${PYTHON:-python3}
MODEL=${FLEXEMR_DEMO_MODEL:-models/demo}
SOCK=${FLEXEMR_DEMO_SOCKET:-/tmp/flexemr-demo.sock}
INSTANCE=demo
if [ ! -f "$MODEL/model.toml" ]; then
  echo "==> generating a model: 8 tables x 200k rows x 64 dims (preset bench8, capped)"
  emrctl model init --preset bench8 --rows-cap 200000 --out "$MODEL" --seed 1
fi
LOG=$(mktemp /tmp/flexemr-demo.XXXXXX.log)
echo "==> starting flexemrd local: 2 embedding servers, 2 engines (log: $LOG)"
flexemrd local --model "$MODEL" --embedding-servers 2 --engines 2 --socket "$SOCK" --instance "$INSTANCE" \
  >"$LOG" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "ready" "$LOG" && break
  kill -0 $PID 2>/dev/null || { echo "flexemrd exited:"; tail -30 "$LOG"; exit 1; }
  sleep 0.2
done
grep "ready" "$LOG"
echo "==> 8 concurrent clients, predict(), batches of 256 samples, 20 ids per bag, 5 s"
"$PY" -m flexemr.loadgen --socket "$SOCK" --model "$MODEL" --clients 8 --seconds 5 --batch 256
echo "==> emrctl status"
emrctl --instance "$INSTANCE" status || true
echo "==> stopping (SIGTERM: drain, then stop every worker)"
kill -TERM $PID
wait $PID && echo "stopped cleanly"
trap - EXIT
