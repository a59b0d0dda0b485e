#!/usr/bin/env bash
# Install what the RDMA layer and its guest suite need (Debian/Ubuntu, as root):
#   - rdma-core, ibverbs-utils, python3-pyverbs: the verbs library and its Python
#     binding (PyPI's pyverbs does not build against the distribution's rdma-core;
#     flexemr finds Debian's copy under /usr/lib/python3/dist-packages itself)
#   - qemu-system-x86, linux-image-amd64, busybox-static, cpio: the soft-RoCE
#     guest that scripts/rxe-vm boots, for hosts whose own kernel has no RDMA.
# Safe to run twice: apt-get skips what is already installed.
set -euo pipefail
PKGS="qemu-system-x86 linux-image-amd64 busybox-static cpio rdma-core ibverbs-utils python3-pyverbs"
if [ "$(id -u)" != 0 ]; then
  echo "setup-rdma: run as root (apt-get install $PKGS)" >&2
  exit 2
fi
command -v apt-get >/dev/null 2>&1 || { echo "setup-rdma: needs apt-get (Debian/Ubuntu); install: $PKGS" >&2; exit 2; }
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
  echo "==> RDMA packages already installed"
  exit 0
fi
echo "==> installing:$missing"
apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
