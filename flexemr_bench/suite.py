"""``emrctl bench``: every system side by side on the same requests, one run, one results.json.

    emrctl bench --suite quick|full --out DIR [--zipf 1.05]

What a run does, in order:

1. **Models.**  ``DIR/models/<preset>-<rows_cap>``: the DeepRecSys RMC1/2/3
   shapes with every table capped to fit this machine, written once (by
   ``emrctl model init`` in a child process, progress on stderr) and reused by
   later runs.
2. **Requests.**  Per model and batch size, a list of batches from one
   :class:`~flexemr.reqgen.RequestGenerator`: Zipf ids (exponent ``--zipf``)
   scattered over each table by a permutation (never clustered at low ids),
   Poisson bag lengths around the preset's ids/bag, a hot set that drifts
   every ``drift_every`` batches.  Generated once, before any clock starts,
   and replayed identically to every system (the client processes are forked
   and inherit them).
3. **Systems**, started as real processes and stopped by pid:

   ``flexemr``         ``flexemrd local``: 2 embedding servers, a ranker with 2
                       engines, the daemon's defaults (owned mapping, priority
                       credits, cache off).  Clients talk to its unix socket.
   ``inprocess``       the monolithic reference (:class:`~flexemr.monolithic.MonolithicModel`):
                       same model and tables in one process, torch on all cores, one caller.
   ``inprocess-all``   the same in every client process at once (one torch thread
                       each, table pages shared): the in-process limit with
                       concurrent callers.  Ratios are against the stronger one.
   ``monolithic``      ``flexemrd local --embedding-servers 0``: the same ranker
                       (socket, validation, batching, NN) pooling its own tables.
   ``redis``           2 redis-servers holding every row, one key per row
                       (HugeCTR HPS's Redis tier); the ranker de-duplicates
                       ids per batch, fetches rows with MGETs pipelined to
                       both shards at once (RESP built and parsed with numpy),
                       pools with embedding_bag and runs the NN.
   ``flexemr-<knob>``  ablations: one daemon flag changed against ``flexemr``
                       (``--mapping shared``, ``--credits inband``, ``--engines 1``,
                       ``--cache-policy fixed|adaptive``), and ``flexemr-rawrows``:
                       flexemr's own embedding servers asked for raw rows (FETCH of
                       the de-duplicated ids) with pooling and the NN on the
                       ranker, i.e. no partial pooling.  An ablation whose flag
                       this build's ``flexemrd local`` lacks is skipped with a
                       note in results.json.

   The runners live in :mod:`flexemr_bench.systems`.

   **How the in-process limit is driven.**  It has no socket, so the load
   generator's client process *is* the system: one process calls
   ``predict`` back to back (closed loop) with torch's intra-op threads on
   every core, the way one monolithic host serves.  Open loop, that one
   process receives the same Poisson arrival stream (same aggregate rate) and
   serves it first come first served, latency counted from each scheduled
   arrival, so queueing shows exactly as for the socket systems.  The Redis
   ranker likewise lives in the client processes (one torch thread each,
   ``clients`` of them: the ranker's worker count).  Socket systems get
   ``clients`` closed-loop clients and ``open_clients`` open-loop clients
   whose requests the daemon batches together.

4. **Measurements.**  For each model: closed-loop maximum throughput at every
   batch size; ablations at one batch size, each repetition right after a
   fresh flexemr run; then open-loop Poisson arrivals at ``open_batch`` at two
   kinds of offered load: fractions of the *slowest* core system's
   closed-loop maximum (a load every system carries: latencies compare like
   for like; cells ``<model>-b<B>-open<pct>``) and fractions of *flexemr's*
   maximum (``...-open<pct>-flexemr``), where a system that cannot carry the
   load is still driven, for a window cut to the same amount of work, and
   marked ``saturated``.  An open-loop cell lasts until about
   ``open_min_requests`` arrivals (at most ``open_max_stretch`` times its duration).  Each
   measurement records samples/s, p50/p95/p99, a 101-point latency CDF,
   wire bytes per sample, CPU seconds per sample, client CPU, errors, and
   ``background_cpu_cores``: the CPU other processes of the machine took
   meanwhile (this is a shared 2-core host; the table flags noisy cells).
   A measurement that fails is recorded under the cell's ``failed``; a
   system that then cannot answer one small request is not driven again.

   * **Wire bytes** cross between the ranker and its embedding store, both
     directions, read from the store's own counters before and after:
     flexemr's servers answer a ``STATS`` frame (``bytes_in + bytes_out``,
     headers included), redis-server's ``INFO stats``
     (``total_net_input_bytes + total_net_output_bytes``).  In-process: 0.
   * **CPU seconds** are user+system time of everything the system runs:
     the daemon's process tree or redis-server by psutil, plus the client
     processes' own CPU for the systems whose work runs there (inprocess,
     redis, flexemr-rawrows).  ``client_cpu_s_per_sample`` is reported
     separately for every system (for socket systems it is the harness).

5. **MLPerf LoadGen** (:mod:`flexemr_bench.mlperf`) drives flexemr's unix
   socket in the Offline and Server scenarios and reports the highest Server
   QPS whose p99 stays under the stated bound.

Each workload entry of ``results.json`` is one (model, batch size, loop)
cell: ``{"name": "rmc1-b1024-closed", "systems": {"flexemr": {...}, ...},
"ratios": {"flexemr/inprocess": {...}, ...}}``.  Plots go next to it.

Where each part lives:

    workloads.py   the suites, model workloads, ablations and open-loop loads (data)
    inputs.py      the model directories and request sets (made before any clock starts)
    driver.py      the systems of a workload (started together, stopped by pid),
                   the forked load clients and one measurement
    phases.py      answer check, closed loop, ablations, open loop, MLPerf LoadGen
    report.py      ratios, medians, the schema check, the table and summary.md
    plots.py       the PNGs
    suite.py       this module: one run, workload after workload

The parent process never runs a torch operation: forked children of a process
whose OpenMP pool is live hang in their first parallel region.  It may import
torch (that starts no pool), so children skip the import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Sequence

# measure, run_clients, check_answers, ratios, validate_results, machine_info, format_markdown, ABLATIONS,
# SUITES, ...: re-exported, the public names of this module before the split (see __all__).
from flexemr_bench.driver import SystemSet, check_answers, measure, run_clients
from flexemr_bench.inputs import prepare_model, request_generator, request_sets
from flexemr_bench.phases import (
    WorkloadRun,
    ablation_phase,
    answer_check_phase,
    closed_loop_phase,
    mlperf_phase,
    open_loop_phase,
)
from flexemr_bench.report import (
    format_markdown,
    format_table,
    machine_info,
    ratios,
    validate_results,
    write_results,
)
from flexemr_bench.workloads import (
    ABLATIONS,
    SUITES,
    ModelWorkload,
    SuiteSpec,
    flexemrd_local_help,
    wanted_ablations,
)

RESULTS_VERSION = 1


class Progress:
    """Progress lines on stderr, stamped with the seconds since the run began."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class BenchInterrupted(Exception):
    """SIGTERM or SIGHUP arrived: every system was stopped, results so far are in results.json."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise BenchInterrupted(f"signal {signum}")


def run_suite(suite: SuiteSpec | str, out: Path, zipf: float = 1.05, seed: int = 0, seconds: float | None = None,
              mlperf: bool = True, ablations: bool = True, workloads: Sequence[str] | None = None,
              command: str | None = None, log: Progress | None = None) -> dict:
    """Run ``suite``; write ``out/results.json`` and the plots; return the results."""
    import torch  # noqa: F401  imported (not used) here so that forked clients do not pay for the import

    spec = SUITES[suite] if isinstance(suite, str) else suite
    if seconds is not None:
        spec = dataclasses.replace(spec, seconds=seconds, open_seconds=None,
                                   mlperf_seconds=min(spec.mlperf_seconds, seconds))
    log = log or Progress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    selected = [w for w in spec.workloads if not workloads or w.name in workloads]
    if not selected:
        raise ValueError(f"no workload of suite {spec.name} is called {', '.join(workloads or [])} "
                         f"(known: {', '.join(w.name for w in spec.workloads)})")
    help_text = flexemrd_local_help()
    results = _new_results(spec, out, zipf, seed, command)
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for wl in selected:
            run_workload(spec, wl, out, zipf, seed, help_text, ablations, mlperf, results, log)
            write_results(out, results)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        results["duration_s"] = round(log.elapsed, 1)
        results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_results(out, results)
    try:
        from flexemr_bench.plots import write_plots

        results["plots"] = write_plots(results, out)
    except Exception as e:  # a plot must never lose the numbers
        results["issues"].append(f"plots: {type(e).__name__}: {e}")
    write_results(out, results)
    (out / "summary.md").write_text(format_markdown(results))
    log(f"done in {log.elapsed:.0f} s: {out / 'results.json'}")
    return results


def _new_results(spec: SuiteSpec, out: Path, zipf: float, seed: int, command: str | None) -> dict[str, Any]:
    """results.json before the first workload: what was asked for and the machine; cells come later."""
    return {
        "version": RESULTS_VERSION,
        "suite": spec.name,
        "command": command or f"emrctl bench --suite {spec.name} --out {out}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {"zipf_exponent": zipf, "seed": seed, "seconds_per_cell": spec.seconds,
                     "closed_loop_clients": spec.clients, "open_loop_clients": spec.open_clients,
                     "open_levels_of_slowest_max": list(spec.open_levels),
                     "open_levels_of_flexemr_max": list(spec.flexemr_open_levels),
                     "open_loop_seconds": spec.open_seconds or spec.seconds, "repetitions": spec.reps,
                     "drift_every_batches": spec.drift_every},
        "systems": {},
        "workloads": [],
        "models": {},
        "skipped": [],
        "issues": [],
    }


def run_workload(spec: SuiteSpec, wl: ModelWorkload, out: Path, zipf: float, seed: int, help_text: str,
                 do_ablations: bool, do_mlperf: bool, results: dict, log: Progress) -> None:
    """One model: its systems started together, the phases in order, every system stopped (also on error)."""
    model = prepare_model(wl, out / "models", log)
    results["models"][wl.name] = model.summary()
    wanted, skipped = wanted_ablations(spec, wl, help_text) if do_ablations else ([], {})
    for name, why in skipped.items():
        results["skipped"].append({"workload": wl.name, "system": name, "why": why})
        log(f"  skipping {name}: {why}")
    systems = SystemSet(model.dir, out / "logs" / wl.name, wanted, log)
    try:
        log(f"{wl.name}: starting flexemr{''.join(', ' + n for n in systems.ablations)} and redis ...")
        systems.launch()
        # Requests are generated while the daemons boot.
        gen = request_generator(model, zipf, seed, spec.drift_every)
        reqsets = request_sets(gen, model, spec.requests_per_set)
        log(f"  generated requests: " + ", ".join(f"{len(v)} x {b}" for b, v in reqsets.items())
            + f" samples (zipf {zipf}, ~{model.ids_per_sample} ids/sample)")
        systems.wait_ready()
        run = WorkloadRun(spec, model, systems, gen, reqsets, results, log)
        answer_check_phase(run)
        for name, s in systems.all.items():
            results["systems"].setdefault(name, s.describe())
        closed_loop_phase(run)
        ablation_phase(run)
        open_loop_phase(run)
        if do_mlperf:
            mlperf_phase(run, out)
    except BenchInterrupted as e:
        results["issues"].append(f"interrupted by {e}")
        raise
    finally:
        log(f"{wl.name}: stopping {len(systems.started)} system(s)")
        results["issues"].extend(systems.stop())
        for issue in systems.issues():
            results["issues"].append(f"{wl.name}: {issue}")
            log(f"  ISSUE {issue}")


USAGE = "usage: python -m flexemr_bench.suite DIR"


def main(argv: list[str] | None = None) -> int:
    """``python -m flexemr_bench.suite DIR``: print the table of DIR/results.json again and rewrite summary.md."""
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{main.__doc__}")
        return 0
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    out = Path(args[0])
    results_path = out / "results.json"
    if not results_path.is_file():
        print(f"{results_path}: no such file (run emrctl bench --out {out} first)", file=sys.stderr)
        return 2
    results = json.loads(results_path.read_text())
    (out / "summary.md").write_text(format_markdown(results))
    print(format_table(results))
    return 0


__all__ = ["BenchInterrupted", "Progress", "SUITES", "SuiteSpec", "ModelWorkload", "ABLATIONS", "run_suite",
           "run_workload", "format_table", "measure", "run_clients", "ratios", "check_answers", "validate_results",
           "machine_info", "format_markdown"]


if __name__ == "__main__":
    sys.exit(main())
