#!/usr/bin/env bash
# Install flexemr and its test/bench dependencies into the current Python.
# torch is pinned to the CPU build through constraints.txt (users with GPUs
# install the package without the constraints file and get their CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "==> installing redis-server (baseline for the benchmarks)"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 \
      || echo "    (redis-server not installed: the redis baseline will be skipped)"
  fi
fi
echo "==> installing flexemr (editable) with test, bench and kserve extras"
"$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,bench,kserve]"
