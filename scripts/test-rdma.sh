#!/usr/bin/env bash
# Run the rdma-marked suite (tests/rdma) for real: boot ONE soft-RoCE guest
# (scripts/rxe-vm: Debian kernel under QEMU, rxe0 on 10.0.2.15) and run
#   python -m pytest -m rdma tests/rdma
# inside it, with this checkout on PYTHONPATH.  Extra arguments go to pytest.
#
#   scripts/test-rdma.sh            # whole rdma suite, a few minutes (emulated CPU)
#   scripts/test-rdma.sh -k read    # one test
#
# On a host that has an RDMA device of its own (a real RNIC), no guest is
# needed: FLEXEMR_RDMA_GUEST=1 python -m pytest -m rdma tests/rdma
# Needs the Debian packages scripts/setup-rdma.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The guest has no pyenv shims worth their start-up cost: resolve the interpreter here.
PY=$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')
export PYTHONPATH="$ROOT/lib:$ROOT"
export FLEXEMR_RDMA_GUEST=1
START=$(date +%s)
set +e
scripts/rxe-vm --timeout "${FLEXEMR_RDMA_TIMEOUT:-1200}" -- \
  "$PY" -m pytest -m rdma -q -rs -p no:cacheprovider -p no:hypothesispytest --timeout=600 tests/rdma "$@"
rc=$?
set -e
echo "test-rdma: exit $rc after $(( $(date +%s) - START )) s"
exit $rc
