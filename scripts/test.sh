#!/usr/bin/env bash
# The test command of the README: set up, then run the default test suite
# (unit, property and end-to-end tests with real processes; slow ones are
# marked and run with: python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q -p no:cacheprovider --timeout=300 "$@"
