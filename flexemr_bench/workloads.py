"""What ``emrctl bench`` measures, as data: suites, model workloads, ablations and open-loop loads.

Nothing here starts a process or a clock (except :func:`flexemrd_local_help`,
which asks the daemon which flags it has).  A :class:`SuiteSpec` names the
model workloads, how long each cell lasts and which phases run; a
:class:`ModelWorkload` is one capped model shape with its batch sizes; an
:class:`Ablation` is one flag changed against ``flexemr``.  The open-loop
phase's offered loads and cell durations are pure functions of a spec and the
closed-loop maxima (:func:`open_loop_loads`, :func:`open_loop_seconds`), so
they can be read and tested without running anything.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from typing import Mapping

CORE_SYSTEMS = ("flexemr", "inprocess", "redis")
BASELINES = ("inprocess", "inprocess-all", "monolithic", "redis")


@dataclasses.dataclass(frozen=True)
class ModelWorkload:
    """One model shape, capped, and the batch sizes it is measured at."""

    name: str
    preset: str
    rows_cap: int
    batch_sizes: tuple[int, ...]
    open_batch: int                      # batch size of the open-loop phase
    ablation_batch: int                  # batch size of the ablation phase (closed loop)
    max_ids_per_set: int = 24_000_000    # bounds the requests generated per batch size (memory, set-up time)

    def all_batches(self) -> list[int]:
        """Every batch size some phase drives, ascending (one request set each)."""
        return sorted({*self.batch_sizes, self.open_batch, self.ablation_batch})

    def closed_cell(self, batch: int) -> str:
        return f"{self.name}-b{batch}-closed"


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A flexemr variant: ``flags`` added to ``flexemrd local``; ``raw_rows``: pool on the ranker instead."""

    name: str
    flags: tuple[str, ...] = ()
    raw_rows: bool = False
    what: str = ""


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("flexemr-rawrows", raw_rows=True, what="raw rows from flexemr's servers, pooling on the ranker"),
    Ablation("flexemr-shared", ("--mapping", "shared"), what="engines share every connection (locks)"),
    Ablation("flexemr-1engine", ("--engines", "1"), what="one engine instead of 2"),
    Ablation("flexemr-inband", ("--credits", "inband"), what="credits in band on the data connection"),
    Ablation("flexemr-cache-fixed", ("--cache-policy", "fixed"), what="ranker cache, fixed 64 MiB"),
    Ablation("flexemr-cache-adaptive", ("--cache-policy", "adaptive"), what="ranker cache, adaptive size"),
)


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """A whole run: its model workloads, cell durations, client counts and which phases run where."""

    name: str
    workloads: tuple[ModelWorkload, ...]
    seconds: float                       # per measurement
    clients: int = 4                     # closed loop: socket clients / redis ranker workers
    open_clients: int = 8                # open loop: socket clients
    open_levels: tuple[float, ...] = (0.5,)           # of the slowest core system's closed-loop maximum
    flexemr_open_levels: tuple[float, ...] = (0.5,)   # of flexemr's closed-loop maximum
    open_seconds: float | None = None                 # per open-loop measurement (default: seconds)
    open_min_requests: int = 40        # an open-loop cell lasts until about this many arrivals ...
    open_max_stretch: float = 3.0      # ... but at most this many times its duration
    reps: int = 1                        # repetitions of every closed-loop cell (median kept)
    ablations: tuple[str, ...] = ()      # names from ABLATIONS
    ablation_workloads: tuple[str, ...] = ()
    ablation_open_levels: tuple[float, ...] = ()   # open-loop levels the ablations are also driven at
    drift_every: int = 4
    requests_per_set: int = 16
    mlperf_workload: str | None = None
    mlperf_batch: int = 256
    mlperf_seconds: float = 3.0
    mlperf_probes: int = 4
    mlperf_bound_ms: float = 50.0


_ALL_ABLATIONS = tuple(a.name for a in ABLATIONS)

SUITES: dict[str, SuiteSpec] = {
    "quick": SuiteSpec(
        "quick",
        (
            ModelWorkload("rmc1", "rmc1", 100_000, (64, 512, 4096), open_batch=64, ablation_batch=512),
            ModelWorkload("rmc2", "rmc2", 50_000, (64, 512), open_batch=64, ablation_batch=512),
            ModelWorkload("rmc3", "rmc3", 100_000, (64, 512, 4096), open_batch=64, ablation_batch=512),
        ),
        seconds=2.0,
        open_seconds=2.5,
        open_min_requests=20,
        open_max_stretch=1.6,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1",),
        requests_per_set=8,
        mlperf_workload="rmc1",
        mlperf_seconds=2.0,
        mlperf_probes=4,
    ),
    "full": SuiteSpec(
        "full",
        (
            ModelWorkload("rmc1", "rmc1", 200_000, (64, 256, 1024, 4096), open_batch=256, ablation_batch=1024),
            ModelWorkload("rmc2", "rmc2", 100_000, (64, 256, 1024, 4096), open_batch=64, ablation_batch=256),
            ModelWorkload("rmc3", "rmc3", 200_000, (64, 256, 1024, 4096), open_batch=256, ablation_batch=1024),
        ),
        seconds=6.0,
        open_levels=(0.25, 0.5, 0.8),
        flexemr_open_levels=(0.5, 0.8),
        reps=3,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1", "rmc2", "rmc3"),
        ablation_open_levels=(0.5,),
        mlperf_workload="rmc1",
        mlperf_seconds=6.0,
        mlperf_probes=6,
    ),
    # tests and a one-minute sanity check: the tiny model, 1-second cells
    "smoke": SuiteSpec(
        "smoke",
        (ModelWorkload("tiny", "tiny", 5_000, (64, 256), open_batch=64, ablation_batch=64),),
        seconds=1.0,
        open_min_requests=20,
        open_max_stretch=1.5,
        clients=2,
        open_clients=2,
        ablations=("flexemr-rawrows",),
        ablation_workloads=("tiny",),
        requests_per_set=4,
        mlperf_workload="tiny",
        mlperf_batch=64,
        mlperf_seconds=1.0,
        mlperf_probes=1,
    ),
}


# --------------------------------------------------------------------------- ablations


def flexemrd_local_help() -> str:
    """``flexemrd local --help``: which ablation flags this build has."""
    p = subprocess.run([sys.executable, "-m", "flexemrd", "local", "--help"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return p.stdout


def ablation_unsupported(ab: Ablation, help_text: str) -> str | None:
    """None if this build's ``flexemrd local`` (its ``help_text``) takes ``ab``'s flags, else why not."""
    for i in range(0, len(ab.flags), 2):
        flag, value = ab.flags[i], ab.flags[i + 1] if i + 1 < len(ab.flags) else None
        if flag not in help_text:
            return f"flexemrd local has no {flag} option in this build"
        m = re.search(re.escape(flag) + r" \[([^\]]+)\]", help_text)
        if value is not None and m and value not in m.group(1).split("|"):
            return f"flexemrd local {flag} does not accept {value!r} in this build"
    return None


def wanted_ablations(spec: SuiteSpec, wl: ModelWorkload, help_text: str) -> tuple[list[Ablation], dict[str, str]]:
    """The ablations to run on ``wl`` (in ABLATIONS order), and those skipped with why."""
    wanted: list[Ablation] = []
    skipped: dict[str, str] = {}
    if wl.name not in spec.ablation_workloads:
        return wanted, skipped
    for ab in ABLATIONS:
        if ab.name not in spec.ablations:
            continue
        why = ablation_unsupported(ab, help_text)
        if why:
            skipped[ab.name] = why
        else:
            wanted.append(ab)
    return wanted, skipped


# --------------------------------------------------------------------------- open-loop loads


@dataclasses.dataclass(frozen=True)
class OpenLoopLoad:
    """One offered load: ``level`` times the closed-loop maximum of the slowest core system or of flexemr."""

    level: float
    relative_to: str                   # "slowest" | "flexemr"
    reference_samples_per_s: float

    @property
    def offered_samples_per_s(self) -> float:
        return self.level * self.reference_samples_per_s

    def cell_name(self, wl: ModelWorkload) -> str:
        suffix = "-flexemr" if self.relative_to == "flexemr" else ""
        return f"{wl.name}-b{wl.open_batch}-open{int(round(self.level * 100))}{suffix}"


def open_loop_loads(spec: SuiteSpec, maxima: Mapping[str, float]) -> list[OpenLoopLoad]:
    """The open-loop cells, given each system's closed-loop maximum (samples/s) at the open batch size.

    Relative to the slowest core system: a load every system carries, so
    latencies compare like for like.  Relative to flexemr: a load the slow
    baselines may not carry (they are driven anyway, see :func:`open_loop_seconds`).
    """
    slowest = min((maxima[n] for n in CORE_SYSTEMS if n in maxima), default=0.0)
    loads = [OpenLoopLoad(lv, "slowest", slowest) for lv in spec.open_levels if slowest > 0]
    loads += [OpenLoopLoad(lv, "flexemr", maxima["flexemr"]) for lv in spec.flexemr_open_levels
              if maxima.get("flexemr")]
    return loads


def open_loop_seconds(spec: SuiteSpec, rate: float, offered: float, cap: float | None) -> tuple[float, bool]:
    """How long one system is driven at ``rate`` requests/s (``offered`` samples/s), and whether it is saturated.

    A cell lasts until about ``open_min_requests`` arrivals, at most
    ``open_max_stretch`` times its base duration.  A system whose closed-loop
    maximum ``cap`` is below the offered load is saturated: its window is cut
    to the same amount of work it could do, so a slow baseline does not
    stretch the run.
    """
    base = spec.open_seconds or spec.seconds
    secs = min(max(base, spec.open_min_requests / rate), spec.open_max_stretch * base)
    saturated = cap is not None and cap < offered
    if saturated:
        secs = max(0.5, secs * cap / offered)
    return secs, saturated
