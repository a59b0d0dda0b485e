#!/usr/bin/env bash
# The cluster suite (issue 14): real network namespaces, cgroups, tc rate limits and
# daemons, so it needs root; CI runs it after the default suite. Extra arguments go
# to pytest (e.g. -k link -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=900 -m cluster tests/cluster "$@"
