#!/usr/bin/env bash
# The network-layer benchmark over RDMA verbs, for real: boot ONE soft-RoCE guest
# (scripts/rxe-vm) and run
#   python -m flexemr_bench.netlayer --transport rdma
# inside it (owned vs shared mapping, priority vs in-band credits, interleaved
# repetitions).  The guest's writes are discarded, so the JSON comes back on its
# console; this script writes OUT/netlayer-rdma.json and draws OUT/netlayer-rdma.png
# here on the host (--plot-only).  Extra arguments go to the benchmark.
#
#   scripts/bench-rdma.sh                          # bench-out/netlayer-rdma, ~3 minutes
#   scripts/bench-rdma.sh /tmp/nl --reps 3 --seconds 3
#
# The guest CPU is emulated: only the ratios in the output mean anything.
# On a host with an RDMA device of its own, run the module directly instead.
# Needs the Debian packages scripts/setup-rdma.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=bench-out/netlayer-rdma
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi
PY=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')
export PYTHONPATH="$ROOT/lib:$ROOT"
mkdir -p "$OUT"
LOG="$OUT/guest.log"
# Progress lines as they come: line-buffer rxe-vm's console filter (stdbuf reaches its grep).
LINEBUF=()
command -v stdbuf >/dev/null && LINEBUF=(stdbuf -oL)
set +e
"${LINEBUF[@]}" scripts/rxe-vm --mem "${FLEXEMR_RDMA_MEM:-2048}" --timeout "${FLEXEMR_RDMA_TIMEOUT:-1200}" -- \
  env OMP_NUM_THREADS=1 "$PY" -m flexemr_bench.netlayer --transport rdma --out /tmp/netlayer-rdma \
  --no-plot --emit-json --reps "${FLEXEMR_BENCH_REPS:-5}" --seconds "${FLEXEMR_BENCH_SECONDS:-4}" "$@" \
  2>&1 | tee "$LOG" | grep --line-buffered -a -v -E '^(NETLAYER-RDMA-JSON-BEGIN|NETLAYER-RDMA-JSON-END|\{")'
rc=${PIPESTATUS[0]}
set -e
# the guest's console uses CRLF line ends
tr -d '\r' < "$LOG" | sed -n '/^NETLAYER-RDMA-JSON-BEGIN$/,/^NETLAYER-RDMA-JSON-END$/p' | sed '1d;$d' > "$OUT/netlayer-rdma.json"
if [ "$rc" -ne 0 ] || [ ! -s "$OUT/netlayer-rdma.json" ]; then
  echo "bench-rdma: the guest run failed (exit $rc); console in $LOG" >&2
  exit $(( rc ? rc : 1 ))
fi
"$PY" -m flexemr_bench.netlayer --transport rdma --plot-only "$OUT" >/dev/null
echo "bench-rdma: $OUT/netlayer-rdma.json and $OUT/netlayer-rdma.png"
