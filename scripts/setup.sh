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

# TorchRec (extra "import") for the importer tests.  torchrec depends on the CUDA
# build of fbgemm-gpu, which fails to load without a GPU: remove it and put the CPU
# build of the pinned release in its place (both ship the fbgemm_gpu package, hence
# --force-reinstall after the uninstall).  Skipped when the pinned pair is already in.
if ! "$PY" - 2>/dev/null <<'EOF'
import importlib.metadata as md, re, sys
pins = dict(re.findall(r"^(torchrec|fbgemm-gpu-cpu)==(\S+)", open("constraints.txt").read(), re.M))
try:
    md.version("fbgemm-gpu")
    sys.exit(1)                      # the CUDA build is (back) in
except md.PackageNotFoundError:
    pass
sys.exit(0 if len(pins) == 2 and all(md.version(k) == v for k, v in pins.items()) else 1)
EOF
then
  echo "==> installing TorchRec with the CPU build of fbgemm-gpu (extra: import)"
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[import]"
  "$PY" -m pip uninstall -q -y fbgemm-gpu
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps --force-reinstall fbgemm-gpu-cpu
fi
"$PY" -c "import torchrec; from torchrec.models.dlrm import DLRM" 2>/dev/null \
  || { echo "TorchRec does not import: see the fbgemm-gpu note in scripts/setup.sh" >&2; exit 1; }
