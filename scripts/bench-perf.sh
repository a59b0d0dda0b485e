#!/usr/bin/env bash
# The runs behind docs/PERFORMANCE.md's same-host section, one after the other, on an idle machine:
#
#   sudo ./scripts/bench-perf.sh [OUT]          # ~20 minutes on 2 cores; OUT defaults to bench-out/perf
#
#   1. python -m flexemr_bench.ranker     in-process limit vs monolithic daemon vs flexemrd local (shm)
#      python -m flexemr_bench.profile    where flexemrd local's CPU goes, role x category, lookups and
#                                         predictions (perf + py-spy, ~1 minute; on the ranker's model)
#   2. python -m flexemr_bench.transports flexemrd local over shm vs over TCP
#   3. python -m flexemr_bench.cachegate  adaptive cache vs off, on loopback and behind a rate-limited veth
#                                         (a network namespace with tc tbf: needs root; skipped without it),
#                                         at 800 Mbit/s by capacity and at 200/400/800 Mbit/s (the rate curve)
#
# Each writes its JSON and PNG under OUT/<name>/ and prints its table; this script also keeps the
# machine's load average before and after each run in OUT/load.txt, since on a shared host only
# the ratios of one run mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out/perf}
ROWS=${FLEXEMR_BENCH_ROWS:-500000}
SECONDS_PER_CELL=${FLEXEMR_BENCH_SECONDS:-4}
REPS=${FLEXEMR_BENCH_REPS:-3}
export PYTHONPATH="$PWD/lib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
# The profile step samples with perf and py-spy; neither is a test dependency.
command -v py-spy >/dev/null || python -m pip install -q py-spy
command -v perf >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -q linux-perf >/dev/null; } || true
: > "$OUT/load.txt"

step() {   # step NAME COMMAND...: run one benchmark, log the load around it
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/load.txt"
  echo "   before: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
  local t0=$SECONDS
  "$@" 2> >(tee "$OUT/$name.log" >&2) | tee "$OUT/$name.txt"
  echo "   after:  $(cut -d' ' -f1-3 /proc/loadavg) ($((SECONDS - t0)) s)" >> "$OUT/load.txt"
}

step ranker python -m flexemr_bench.ranker --out "$OUT/ranker" --rows-cap "$ROWS" --seconds "$SECONDS_PER_CELL" --reps "$REPS"
step profile python -m flexemr_bench.profile --out "$OUT/profile" --model "$OUT/ranker/bench8-$ROWS" --seconds 5 \
  --system flexemr --kind both
step transports python -m flexemr_bench.transports --out "$OUT/transports" --rows-cap "$ROWS" --seconds "$SECONDS_PER_CELL" --reps "$REPS"

SLOW=()
if [ "$(id -u)" = 0 ]; then
  NS=emrslow
  if ! ip netns list | grep -qw "$NS"; then
    # The slow network: a veth pair into a namespace, both ends limited by tc tbf (this host has no netem).
    ip netns add "$NS"
    ip link add veth-emr type veth peer name veth-emrs
    ip link set veth-emrs netns "$NS"
    ip addr add 10.77.0.1/24 dev veth-emr
    ip link set veth-emr up
    ip netns exec "$NS" sh -c 'ip addr add 10.77.0.2/24 dev veth-emrs; ip link set veth-emrs up; ip link set lo up'
    tc qdisc add dev veth-emr root tbf rate 800mbit burst 256kb latency 20ms
    ip netns exec "$NS" tc qdisc add dev veth-emrs root tbf rate 800mbit burst 256kb latency 20ms
    trap 'ip link del veth-emr 2>/dev/null || true; ip netns del '"$NS"' 2>/dev/null || true' EXIT
  fi
  SLOW=(--slow-netns "$NS" --slow-addr 10.77.0.2 --slow-veth veth-emr --slow-peer veth-emrs --capacities 64MiB,128MiB,256MiB --rates 200,400,800)
else
  echo "not root: the cache benchmark runs on loopback only" >&2
fi
step cachegate python -m flexemr_bench.cachegate --out "$OUT/cachegate" --seconds 5 --reps "$REPS" "${SLOW[@]}"
echo "results under $OUT (load averages in $OUT/load.txt)"
