"""``emrctl bench``: run the benchmarks side by side with their baselines.

    emrctl bench --suite quick|full --out DIR [--zipf 1.05] [--seed 0]

Starts everything it measures (``flexemrd local`` daemons, a redis-server, the
in-process model) and stops it by pid, drives it, writes ``DIR/results.json``
and PNG plots, and prints a table.  ``quick`` takes under 5 minutes on a
2-core machine, ``full`` under 45; ``smoke`` (the tiny model, 1-second
cells) checks the machinery in about a minute.  What is measured and how:
:mod:`flexemr_bench.suite`.  No daemon instance is needed (``--instance``
is ignored).  Imported only when invoked (emrctl's LAZY_COMMANDS), so
``emrctl status`` never pays for numpy or torch.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click


@click.command("bench")
@click.option("--suite", "suite_name", type=click.Choice(["quick", "full", "smoke", "scale"]), default="quick",
              show_default=True, help="quick: < 5 min on 2 cores; full: < 45 min; smoke: tiny model, ~1 min; "
                                      "scale: embedding hosts and rankers in namespaces (root, ~4 min).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for results.json, plots, logs and the generated models (reused across runs).")
@click.option("--zipf", type=click.FloatRange(min=0.0), default=1.05, show_default=True,
              help="Zipf exponent of the ids' popularity.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the request streams.")
@click.option("--seconds", type=click.FloatRange(min=0.2), default=None,
              help="Override the duration of every measurement (seconds).")
@click.option("--workload", "workloads", multiple=True, help="Only this model workload (repeatable): rmc1, rmc2, ...")
@click.option("--no-mlperf", is_flag=True, help="Skip the MLPerf LoadGen phase.")
@click.option("--no-ablations", is_flag=True, help="Skip the flexemr ablations.")
def bench(suite_name: str, out_dir: Path, zipf: float, seed: int, seconds: float | None, workloads: tuple[str, ...],
          no_mlperf: bool, no_ablations: bool) -> None:
    """Benchmark flexemr side by side with the in-process limit and a Redis store."""
    if suite_name == "scale":   # its own runner: a namespace cluster per cell (flexemr_bench.scale)
        from flexemr_bench.scale import main as scale_main

        raise click.exceptions.Exit(scale_main(["--out", str(out_dir)] + (["--seconds", f"{seconds:g}"] if seconds
                                                                          else [])))
    from flexemr_bench.suite import BenchInterrupted, Progress, format_table, run_suite

    parts = ["emrctl", "bench", "--suite", suite_name, "--out", str(out_dir)]
    if zipf != 1.05:
        parts += ["--zipf", f"{zipf:g}"]
    if seed:
        parts += ["--seed", str(seed)]
    if seconds is not None:
        parts += ["--seconds", f"{seconds:g}"]
    for w in workloads:
        parts += ["--workload", w]
    parts += ["--no-mlperf"] * no_mlperf + ["--no-ablations"] * no_ablations
    command = " ".join(shlex.quote(p) for p in parts)
    log = Progress()
    log(f"emrctl bench: suite {suite_name}, results in {out_dir}")
    try:
        results = run_suite(suite_name, out_dir, zipf=zipf, seed=seed, seconds=seconds, mlperf=not no_mlperf,
                            ablations=not no_ablations, workloads=workloads or None, command=command, log=log)
    except (KeyboardInterrupt, BenchInterrupted) as e:
        click.echo(f"emrctl bench: interrupted ({e or 'SIGINT'}); every process it started was stopped; "
                   f"partial results in {out_dir / 'results.json'}", err=True)
        raise click.exceptions.Exit(130)
    except (RuntimeError, ValueError) as e:
        click.echo(f"emrctl bench: {e}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(format_table(results))
    click.echo(f"\nresults: {out_dir / 'results.json'}; plots: {', '.join(results.get('plots', []))}")
    bad = sum(r.get("errors", 0) for c in results["workloads"] for r in c["systems"].values())
    if bad:
        click.echo(f"emrctl bench: {bad} requests failed (see ISSUE lines and the logs under {out_dir / 'logs'})",
                   err=True)
        raise click.exceptions.Exit(1)
