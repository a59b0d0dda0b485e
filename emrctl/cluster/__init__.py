"""``emrctl cluster``: a multi-host flexemr cluster on one Linux machine.

Each host (N embedding hosts, M rankers) is a network namespace of its own,
joined to the others by a veth pair into a bridge that lives in a dedicated
namespace, so the root namespace gets no link, address or route at all.
Each host runs ``flexemrd run --config`` from a TOML file written for it,
optionally under a cgroup v1 CPU quota and a ``tc`` rate limit on its link.

Modules, one job each:

    state.py      the on-disk record: hosts, and a journal of every resource,
                  written before the resource is made (``down`` after a crash)
    netns.py      namespaces, the bridge, veth pairs, addresses (``ip``)
    limits.py     cgroup v1 CPU quotas and ``tc`` tbf rate limits
    configs.py    one TOML config per host, from the daemon's real keys
    procs.py      starting daemons inside namespaces, waiting for "ready", stopping by pid
    lifecycle.py  up / down / status / restart, composed from the above
    cli.py        the click commands
"""
