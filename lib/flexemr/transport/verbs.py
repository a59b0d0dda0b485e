"""RDMA transport (pyverbs): device discovery today, the data path on the roadmap.

Where it stands: ``probe_devices`` finds RNICs through pyverbs (Debian's
python3-pyverbs; PyPI's does not build against Debian's rdma-core) and
``select_transport`` (registry.py) logs what it found.  The verbs data path (one RC QP per
connection inside a parent domain whose thread domain belongs to the engine,
credit QPs at a higher service level, RDMA READ for cache fills) is not
written yet, so ``IMPLEMENTED`` is False and hosts with RNICs use TCP, saying
so in the log.  Nothing above this module changes when it lands: engines only
see ``Connection``, and the embedding server only ``Listener`` (server side:
a listener backed by an rdma_cm id, each accepted QP a ``Connection`` whose
``fileno`` is its completion channel).
"""

from __future__ import annotations

from flexemr.transport.base import Connection, Listener, Transport

IMPLEMENTED = False


def probe_devices() -> tuple[list[str], str]:
    """Names of RDMA devices, and a sentence saying why the list is empty."""
    try:
        import pyverbs.device as d  # type: ignore[import-not-found]
    except ImportError:
        return [], "pyverbs is not installed (apt install python3-pyverbs)"
    try:
        devs = d.get_device_list()
    except Exception as e:  # pyverbs raises when the host has no device at all
        return [], f"no RDMA device ({e})"
    names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in devs]
    if not names:
        return [], "no RDMA device"
    if not IMPLEMENTED:
        return names, f"RDMA devices {names} found but the rdma data path is not implemented yet"
    return names, ""


class RdmaTransport(Transport):
    name = "rdma"

    def __init__(self, device: str) -> None:
        raise NotImplementedError(
            f"the rdma transport is not implemented yet (device {device}); set [ranker].transport = \"tcp\""
        )

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        raise NotImplementedError(_NOT_YET.format(what=f"connecting to {address}", key="[ranker].transport"))

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        raise NotImplementedError(_NOT_YET.format(what=f"adopting connection {conn_id}", key="[ranker].transport"))

    def listen(self, address: str) -> Listener:
        raise NotImplementedError(_NOT_YET.format(what=f"listening on {address}", key="the embedding host's transport"))


_NOT_YET = "the rdma transport is not implemented yet ({what}); use tcp ({key} = \"tcp\")"
