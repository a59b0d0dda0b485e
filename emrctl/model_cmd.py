"""``emrctl model``: create, check and list model directories.

    emrctl model init --preset NAME --out DIR [--seed N] [--rows-cap R] [--force]
    emrctl model validate DIR [--json]
    emrctl model list-presets [--json]
    emrctl model push DIR [--delta] [--version N] [--base N] [--no-wait] [--json]   (a running instance:
                        emrctl/push_cmd.py)
    emrctl model import --from torchrec|dlrm CHECKPOINT --out DIR [--name-map CKPT=NAME ...]
                        [--pooling MODE] [--table-pooling NAME=MODE ...] [--dense-features N]
                        [--interaction dot|cat] [--force] [--json]

Runs entirely within emrctl (no daemon involved).  Importing this module never
imports torch: ``validate`` and ``list-presets`` answer without it, and ``init``
imports it only to write ``dense.pt``; ``import`` imports torch and the importers
(flexemr.model.importers) only when it runs.  The integrator adds the group to the
top-level CLI with ``cli.add_command(model_cmd.model)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from flexemr.model.loader import dense_path, validate_model_dir
from flexemr.model.presets import PRESETS, capped, dense_param_count, get_preset
from flexemr.model.spec import ModelSpec, load_spec

EXIT_OK = 0
EXIT_INVALID = 1

# The files `init` writes; --force removes exactly these and nothing else.
_MODEL_FILES = ("model.toml", "dense.pt")


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def _summary(spec: ModelSpec) -> dict:
    return {
        "tables": len(spec.tables),
        "rows": sum(t.rows for t in spec.tables),
        "embedding_bytes": spec.embedding_bytes,
        "dense_parameters": dense_param_count(spec),
        "interaction": spec.interaction.value,
        "dense_features": spec.dense_features,
    }


def _summary_line(s: dict) -> str:
    return (f"{s['tables']} tables, {s['rows']:,} rows, {_human(s['embedding_bytes'])} of embeddings, "
            f"interaction {s['interaction']}, {s['dense_parameters']:,} dense parameters")


@click.group("model")
def model() -> None:
    """Create, check and list model directories (model.toml, dense.pt, tables/*.npy)."""


@model.command("list-presets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_presets(as_json: bool) -> None:
    """List the presets `emrctl model init` can write."""
    rows = []
    for p in PRESETS.values():
        s = p.spec
        rows.append({
            "name": p.name,
            **_summary(s),
            "rows_per_table": sorted({t.rows for t in s.tables}),
            "dims": sorted({t.dim for t in s.tables}),
            "ids_per_bag": p.ids_per_bag,
            "description": p.description,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<9} {'tables':>6} {'rows/table':>22} {'dim':>10} {'ids/bag':>7} {'inter':>5} "
               f"{'embeddings':>10}  description")
    for r in rows:
        per = "/".join(f"{x:,}" for x in r["rows_per_table"])
        dims = "/".join(str(d) for d in r["dims"])
        click.echo(f"{r['name']:<9} {r['tables']:>6} {per:>22} {dims:>10} {r['ids_per_bag']:>7} "
                   f"{r['interaction']:>5} {_human(r['embedding_bytes']):>10}  {r['description']}")


def _clear_model_files(out: Path) -> None:
    """Remove exactly what a model directory consists of: stale tables would otherwise linger."""
    for name in _MODEL_FILES:
        (out / name).unlink(missing_ok=True)
    for f in (out / "tables").glob("*.npy") if (out / "tables").is_dir() else ():
        f.unlink()


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@model.command("init")
@click.option("--preset", required=True, type=click.Choice(list(PRESETS)), help="Model shape (see list-presets).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model directory to write.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of every random weight.")
@click.option("--rows-cap", type=click.IntRange(min=1), default=None, help="Cap every table at this many rows.")
@click.option("--force", is_flag=True, help="Overwrite the model files of a non-empty DIR.")
def init(preset: str, out: Path, seed: int, rows_cap: int | None, force: bool) -> None:
    """Write a model directory with random weights for a preset."""
    from flexemr.model.presets import init_model_dir  # imports torch only when called

    spec = capped(get_preset(preset).spec, rows_cap)
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise click.ClickException(
                f"{out} is not empty; pass --force to overwrite its model files "
                f"(model.toml, dense.pt, tables/*.npy), or choose another --out")
        # Only what a model directory consists of; anything else of the user's stays.
        _clear_model_files(out)
    need = spec.embedding_bytes + dense_param_count(spec) * 4
    free = _free_bytes(out)
    if need > free:
        raise click.ClickException(f"preset {preset} needs {_human(need)} but only {_human(free)} is free under {out}"
                                   + ("" if rows_cap else "; --rows-cap makes it smaller"))

    err = click.get_text_stream("stderr")
    with click.progressbar(length=need, label=f"writing {preset}", file=err, show_eta=True, show_percent=True,
                           width=30) as bar:
        last = 0

        def progress(done: int, total: int) -> None:
            nonlocal last
            bar.update(done - last)
            last = done

        spec = init_model_dir(out, preset, seed=seed, rows_cap=rows_cap, progress=progress)
    s = _summary(spec)
    click.echo(f"wrote {preset} (seed {seed}) to {out.resolve()}")
    click.echo(f"  tables:   {s['tables']} ({', '.join(f'{t.name}: {t.rows:,}x{t.dim}' for t in spec.tables[:8])}"
               f"{', ...' if len(spec.tables) > 8 else ''})")
    click.echo(f"  rows:     {s['rows']:,}")
    click.echo(f"  bytes:    {s['embedding_bytes']:,} of embeddings ({_human(s['embedding_bytes'])}), "
               f"{dense_path(out).stat().st_size:,} in dense.pt ({s['dense_parameters']:,} parameters)")
    click.echo(f"  model:    interaction {s['interaction']}, dense_features {s['dense_features']}, "
               f"bottom_mlp {list(spec.bottom_mlp)}, top_mlp {list(spec.top_mlp)}")


@model.command("validate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON {ok, path, problems, summary}.")
def validate(model_dir: Path, as_json: bool) -> None:
    """Check a model directory against the contract; print every problem (exit 1 if any)."""
    problems = validate_model_dir(model_dir)
    summary = None if problems else _summary(load_spec(model_dir))
    if as_json:
        click.echo(json.dumps({"ok": not problems, "path": str(model_dir), "problems": problems, "summary": summary}))
    elif problems:
        for p in problems:
            click.echo(p)
        click.echo(f"{model_dir}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", err=True)
    else:
        click.echo(f"ok: {model_dir}: {_summary_line(summary)}")
    click.get_current_context().exit(EXIT_INVALID if problems else EXIT_OK)


# --------------------------------------------------------------------------- import

def _pairs(option: str, values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        left, sep, right = v.partition("=")
        if not sep or not left or not right:
            raise click.BadParameter(f"{v!r}: expected NAME=VALUE", param_hint=option)
        out.append((left, right))
    return out


def _parse_pooling(option: str, value: str):
    from flexemr.types import Pooling

    try:
        return Pooling.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


@model.command("import")
@click.option("--from", "source", required=True, type=click.Choice(["torchrec", "dlrm"]),
              help="torchrec: a torchrec.models.dlrm.DLRM state_dict; dlrm: a facebookresearch/dlrm "
                   "dlrm_s_pytorch.py --save-model checkpoint.")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model directory to write.")
@click.option("--name-map", multiple=True, metavar="CKPTNAME=NAME",
              help="Rename a checkpoint table (clients send NAME as the sparse feature). Repeatable.")
@click.option("--pooling", default="sum", show_default=True, type=click.Choice(["sum", "mean", "max"]),
              help="Pooling of every table --table-pooling does not name (a state_dict does not record it).")
@click.option("--table-pooling", multiple=True, metavar="NAME=MODE",
              help="Pooling of one table (checkpoint or new name): sum, mean or max. Repeatable.")
@click.option("--dense-features", type=click.IntRange(min=1), default=None,
              help="Width of the dense input; checked against the weights, which determine it.")
@click.option("--interaction", type=click.Choice(["dot", "cat"]), default=None,
              help="dlrm only: --arch-interaction-op, when the top MLP's width fits both.")
@click.option("--force", is_flag=True, help="Overwrite the model files of a non-empty DIR.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON {ok, path, checkpoint, from, summary, tables, notes} or {ok, problems}.")
def import_(source: str, checkpoint: Path, out: Path, name_map: tuple[str, ...], pooling: str,
            table_pooling: tuple[str, ...], dense_features: int | None, interaction: str | None, force: bool,
            as_json: bool) -> None:
    """Import a model trained elsewhere (TorchRec or facebookresearch/dlrm) as a model directory."""
    options_kw = {
        "name_map": dict(_pairs("--name-map", name_map)),
        "pooling": _parse_pooling("--pooling", pooling),
        "table_pooling": {k: _parse_pooling("--table-pooling", v) for k, v in _pairs("--table-pooling", table_pooling)},
        "dense_features": dense_features,
    }
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise click.ClickException(f"{out} is not empty; pass --force to overwrite its model files "
                                   "(model.toml, dense.pt, tables/*.npy), or choose another --out")
    if not checkpoint.is_file():
        raise click.ClickException(f"{checkpoint}: no such file")

    # torch and the importers load only now: `emrctl status` and `emrctl model validate` stay torch-free.
    from flexemr.model.importers import plan_checkpoint
    from flexemr.model.importers.common import CheckpointError, ImportOptions, StderrProgress, write_model_dir
    from flexemr.types import Interaction

    if interaction is not None:
        options_kw["interaction"] = Interaction(interaction)
    options = ImportOptions(**options_kw)
    try:
        # The whole checkpoint is checked before anything in DIR is touched: a bad
        # one never costs the model already there, even with --force.
        plan = plan_checkpoint(source, checkpoint, options)
        need = plan.spec.embedding_bytes + dense_param_count(plan.spec) * 4
        free = _free_bytes(out)
        if need > free:
            raise click.ClickException(f"{checkpoint} needs {_human(need)} but only {_human(free)} is free under {out}")
        if out.is_dir() and force:
            _clear_model_files(out)
        write_model_dir(out, plan, None if as_json else StderrProgress())
    except CheckpointError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "path": str(out), "checkpoint": str(checkpoint),
                                   "problems": e.problems}))
        else:
            click.echo(f"cannot import {checkpoint} (--from {source}):", err=True)
            for p in e.problems:
                click.echo(f"  {p}", err=True)
        click.get_current_context().exit(EXIT_INVALID)
        return
    spec = plan.spec
    if as_json:
        click.echo(json.dumps({
            "ok": True, "path": str(out.resolve()), "checkpoint": str(checkpoint), "from": source,
            "summary": _summary(spec), "notes": list(plan.notes),
            "tables": [{"name": t.spec.name, "key": t.key, "rows": t.spec.rows, "dim": t.spec.dim,
                        "pooling": t.spec.pooling.label} for t in plan.tables],
        }))
        return
    click.echo(f"imported {checkpoint} (--from {source}) to {out.resolve()}")
    click.echo(f"  model:    interaction {spec.interaction.value}, dense_features {spec.dense_features}, "
               f"bottom_mlp {list(spec.bottom_mlp)}, top_mlp {list(spec.top_mlp)}")
    for t in plan.tables:
        click.echo(f"  table:    {t.spec.name:<16} {t.spec.rows:>12,} x {t.spec.dim:<4} {t.spec.pooling.label:<4}  "
                   f"<- {t.key}")
    click.echo(f"  wrote:    model.toml, dense.pt ({dense_path(out).stat().st_size:,} bytes), "
               f"{len(plan.tables)} tables ({_human(spec.embedding_bytes)})")
    for n in plan.notes:
        click.echo(f"  note:     {n}")


def _add_push() -> None:
    from emrctl.push_cmd import push

    model.add_command(push)


_add_push()
