"""The phases of one workload, in the order the suite runs them, each filling its results.json cells.

1. :func:`answer_check_phase`: every system's scores for one request against
   the in-process reference (``answer_check``; a difference above 1e-3 is an
   issue).
2. :func:`closed_loop_phase`: maximum throughput at every batch size, systems
   and repetitions interleaved, the median repetition kept.
3. :func:`ablation_phase`: the ablations, closed loop at one batch size, each
   repetition right after flexemr's (same time window: a noisy neighbour hits
   both), flexemr's runs pooled with the closed-loop phase's.
4. :func:`open_loop_phase`: Poisson arrivals at the loads of
   :func:`~flexemr_bench.workloads.open_loop_loads`; a system that cannot
   carry its load is still driven, for a window cut to the same amount of
   work, and marked ``saturated``.
5. :func:`mlperf_phase`: MLPerf LoadGen against flexemr's socket.

The phases share one :class:`WorkloadRun`: the cells made so far, the
closed-loop runs (the ablations reuse flexemr's), and the systems found
broken (a failed measurement followed by an unanswered probe request), which
no later phase drives again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flexemr_bench.driver import SystemSet, answer, check_answers, measure
from flexemr_bench.inputs import PreparedModel, make_requests
from flexemr_bench.report import measurement_line, median_run, ratios
from flexemr_bench.systems import System
from flexemr_bench.workloads import ModelWorkload, OpenLoopLoad, SuiteSpec, open_loop_loads, open_loop_seconds

if TYPE_CHECKING:
    from flexemr.reqgen import Batch, RequestGenerator

Log = Callable[[str], None]
ANSWER_TOLERANCE = 1e-3    # max |score - in-process score| before the answer check reports an issue
PROBE_TIMEOUT_S = 60.0     # a system that fails a measurement must answer one small request this fast


@dataclasses.dataclass
class WorkloadRun:
    """One workload's state shared by its phases: inputs, systems, and the cells written so far."""

    spec: SuiteSpec
    model: PreparedModel
    systems: SystemSet
    gen: RequestGenerator
    reqsets: dict[int, list[Batch]]
    results: dict[str, Any]
    log: Log
    cells: dict[str, dict] = dataclasses.field(default_factory=dict)
    broken: dict[str, str] = dataclasses.field(default_factory=dict)      # system -> why it is not driven again
    closed_runs: dict[int, dict[str, list[dict]]] = dataclasses.field(default_factory=dict)  # batch -> system -> runs

    @property
    def wl(self) -> ModelWorkload:
        return self.model.workload

    @property
    def probe(self) -> Batch:
        """The smallest request: the answer check's, and what a system must still answer after a failure."""
        return self.reqsets[min(self.reqsets)][0]

    def cell(self, name: str, **fields: Any) -> dict:
        """The results.json cell ``name``, appended to ``workloads`` the first time it is asked for."""
        if name not in self.cells:
            self.cells[name] = {"name": name, "model": self.wl.name, **fields, "systems": {}}
            self.results["workloads"].append(self.cells[name])
        return self.cells[name]

    def clients_for(self, s: System, open_loop: bool) -> int:
        """Client processes for ``s``: its fixed worker count, else the suite's (one count for resident systems)."""
        if s.workers is not None:
            return s.workers
        if s.resident:
            return self.spec.clients
        return self.spec.open_clients if open_loop else self.spec.clients

    def try_measure(self, c: dict, name: str, s: System, requests: list[Batch], clients: int, seconds: float,
                    rate_per_client: float = 0.0) -> dict | None:
        """One measurement, or None.  A failure is recorded (cell "failed", issues); a system that then cannot
        answer one small request within PROBE_TIMEOUT_S (dead or wedged) is not driven again."""
        if name in self.broken:
            return None
        try:
            r = measure(s, requests, clients, seconds, rate_per_client)
            if r["requests"] == 0:
                raise RuntimeError("no request completed")
            return r
        except RuntimeError as e:
            c.setdefault("failed", {})[name] = str(e)
            self.results["issues"].append(f"{self.wl.name}: {name} failed in {c['name']}: {e}")
            self.log(f"    FAILED: {e}")
            self._probe(name, s)
            return None

    def _probe(self, name: str, s: System) -> None:
        try:
            answer(s, self.probe, timeout=PROBE_TIMEOUT_S)
        except RuntimeError as e:
            self.broken[name] = str(e)
            self.results["issues"].append(f"{self.wl.name}: {name} no longer answers ({e}); not driven again")
            self.log(f"    {name} no longer answers ({e}); not driven again")


# --------------------------------------------------------------------------- 1. answers


def answer_check_phase(run: WorkloadRun) -> None:
    """Every system against the in-process reference on the probe request (results.json ``answer_check``)."""
    wl, log, results = run.wl, run.log, run.results
    log("  all systems ready; checking that every system gives the same scores ...")
    try:
        diffs = check_answers(run.systems.all, run.probe)
    except RuntimeError as e:
        diffs = {}
        results["issues"].append(f"{wl.name}: answer check failed: {e}")
        log(f"  ISSUE answer check failed: {e}")
    results.setdefault("answer_check", {})[wl.name] = {
        k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in diffs.items()}
    for name, d in diffs.items():
        if isinstance(d, str):
            results["issues"].append(f"{wl.name}: {name} could not answer one request: {d}")
            log(f"  ISSUE {name} could not answer one request: {d}")
        elif not d <= ANSWER_TOLERANCE:
            results["issues"].append(f"{wl.name}: {name} scores differ from inprocess by up to {d:.3g}")
            log(f"  ISSUE {name}: scores differ from inprocess by up to {d:.3g}")


# --------------------------------------------------------------------------- 2, 3. closed loop


def _drive_closed(run: WorkloadRun, c: dict, batch: int, systems: dict[str, System]) -> None:
    """``spec.reps`` rounds over ``systems`` in turn; the cell keeps each system's median run."""
    spec, log = run.spec, run.log
    runs = run.closed_runs.setdefault(batch, {})
    for rep in range(spec.reps):
        for name, s in systems.items():
            if name in run.broken:
                continue
            n = run.clients_for(s, False)
            log(f"  {c['name']}: {name} [{rep + 1}/{spec.reps}] closed loop, {n} client(s), {spec.seconds:g} s")
            r = run.try_measure(c, name, s, run.reqsets[batch], n, spec.seconds)
            if r is not None:
                runs.setdefault(name, []).append(r)
                log(measurement_line(r))
    for name, rs in runs.items():
        c["systems"][name] = median_run(rs)
    c["ratios"] = ratios(c["systems"])


def closed_loop_phase(run: WorkloadRun) -> None:
    """Maximum throughput of the core systems at every batch size (cells ``<model>-b<B>-closed``)."""
    for b in run.wl.batch_sizes:
        c = run.cell(run.wl.closed_cell(b), batch=b, mode="closed")
        _drive_closed(run, c, b, run.systems.core)


def ablation_phase(run: WorkloadRun) -> None:
    """The ablations at ``ablation_batch``, interleaved with flexemr (or every core system, if that
    batch size had no closed-loop cell yet); the cell is marked ``ablation``."""
    ablations = run.systems.ablations
    if not ablations:
        return
    wl = run.wl
    b = wl.ablation_batch
    c = run.cell(wl.closed_cell(b), batch=b, mode="closed")
    c["ablation"] = True
    if b in wl.batch_sizes:
        order = {"flexemr": run.systems.flexemr, **ablations}
    else:
        order = {**run.systems.core, **ablations}
    _drive_closed(run, c, b, order)


# --------------------------------------------------------------------------- 4. open loop


def _reference_cell(run: WorkloadRun, batch: int) -> dict:
    """The closed-loop cell the open-loop loads are relative to, measured once if no phase made it."""
    c = run.cell(run.wl.closed_cell(batch), batch=batch, mode="closed")
    for name, s in run.systems.core.items():
        r = run.try_measure(c, name, s, run.reqsets[batch], run.clients_for(s, False), run.spec.seconds)
        if r is not None:
            c["systems"][name] = r
    c["ratios"] = ratios(c["systems"])
    return c


def _open_loop_cell(run: WorkloadRun, load: OpenLoopLoad, maxima: dict[str, float]) -> None:
    spec, wl, log = run.spec, run.wl, run.log
    b = wl.open_batch
    offered = load.offered_samples_per_s
    rate = offered / b     # requests/s offered in total
    c = run.cell(load.cell_name(wl), batch=b, mode="open", offered_samples_per_s=round(offered, 1),
                 offered_requests_per_s=round(rate, 3), load_level=load.level, load_relative_to=load.relative_to)
    systems = dict(run.systems.core)
    if load.relative_to == "slowest" and load.level in spec.ablation_open_levels:
        systems.update(run.systems.ablations)
    for name, s in systems.items():
        if name in run.broken:
            continue
        n = run.clients_for(s, True)
        cap = maxima.get(name)
        secs, saturated = open_loop_seconds(spec, rate, offered, cap)
        log(f"  {c['name']}: {name} open loop, {rate:.2f} req/s ({offered:,.0f} samples/s), {n} client(s), "
            f"{secs:.2g} s" + (f" (saturated: its maximum is {cap:,.0f} samples/s)" if saturated else ""))
        r = run.try_measure(c, name, s, run.reqsets[b], n, secs, rate / n)
        if r is not None:
            if saturated:
                r["saturated"] = True
                r["max_samples_per_s"] = cap
            c["systems"][name] = r
            log(measurement_line(r))
    c["ratios"] = ratios(c["systems"])


def open_loop_phase(run: WorkloadRun) -> None:
    """Poisson arrivals at ``open_batch`` (cells ``<model>-b<B>-open<pct>[-flexemr]``)."""
    b = run.wl.open_batch
    ref = run.cells.get(run.wl.closed_cell(b)) or _reference_cell(run, b)
    maxima = {n: r["samples_per_s"] for n, r in ref["systems"].items()}
    for load in open_loop_loads(run.spec, maxima):
        _open_loop_cell(run, load, maxima)


# --------------------------------------------------------------------------- 5. MLPerf LoadGen


def mlperf_phase(run: WorkloadRun, out: Path) -> None:
    """MLPerf LoadGen's Offline and Server scenarios against flexemr (results.json ``mlperf``), on the
    suite's ``mlperf_workload`` only and only while flexemr still answers."""
    spec, wl = run.spec, run.wl
    if spec.mlperf_workload != wl.name or "flexemr" in run.broken:
        return
    from flexemr_bench.mlperf import run_mlperf

    mreq = make_requests(run.gen, spec.mlperf_batch, run.model.ids_per_sample, wl, max(spec.requests_per_set, 16))
    run.results["mlperf"] = run_mlperf(run.systems.flexemr.sock, mreq, out / "mlperf", seconds=spec.mlperf_seconds,
                                       bound_ms=spec.mlperf_bound_ms, probes=spec.mlperf_probes, log=run.log,
                                       system="flexemr", workload=wl.name, batch=spec.mlperf_batch)
