"""What every importer shares: reading a checkpoint, naming tables, writing the model directory.

An importer (``torchrec.py``, ``dlrm.py``) turns a foreign checkpoint into an
:class:`ImportPlan` (our ``model.toml`` spec, ``dense.pt`` tensors under our key
names, and one source tensor per table) without copying any table;
:func:`write_model_dir` then writes the directory of the contract (DESIGN.md,
"Model directory")::

    OUT/tables/NAME.npy   one table at a time, CHUNK rows at a time, straight
                          from the checkpoint's memory map into the .npy's
                          (np.lib.format.open_memmap): a table is never held
                          twice in memory, whatever its size
    OUT/dense.pt          flexemr.model.dense.save_dense (atomic)
    OUT/model.toml        last, so an interrupted import leaves a directory that
                          fails validation instead of one that looks whole

Checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``: no
code is unpickled, and table storages stay in the file until a chunk is read.
Every problem is reported as a :class:`CheckpointError` whose lines name the
checkpoint key at fault.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from flexemr.errors import FlexemrError
from flexemr.model.dense import save_dense
from flexemr.model.loader import validate_model_dir
from flexemr.model.spec import ModelSpec, TableSpec, write_spec
from flexemr.model.tables import table_path
from flexemr.types import Interaction, Pooling

__all__ = [
    "CheckpointError",
    "UnsupportedCheckpoint",
    "ImportOptions",
    "ImportedTable",
    "ImportPlan",
    "load_checkpoint",
    "strip_prefix",
    "float_tensor",
    "dense_weights",
    "mlp_dense_weights",
    "build_plan",
    "resolve_tables",
    "write_model_dir",
    "StderrProgress",
    "pairs",
    "solve_pairs_width",
    "numbered",
    "linear_chain",
]

# Same rule as model.toml's table names (flexemr.model.spec).
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

# Bytes of float32 rows copied per step (64 Ki rows of dim 128): the memory an import needs beyond torch.
DEFAULT_CHUNK_BYTES = 32 << 20


class CheckpointError(FlexemrError):
    """A checkpoint cannot be imported; ``problems`` lists every issue, each naming its key."""

    def __init__(self, source: str | Path, problems: list[str]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        super().__init__(f"cannot import {self.source}:\n  " + "\n  ".join(self.problems))


class UnsupportedCheckpoint(CheckpointError):
    """A recognised model variant that flexemr's model directory cannot express exactly."""


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """What the weights do not say, given by the user (``emrctl model import`` options).

    ``name_map`` renames checkpoint tables (our table name is the sparse feature
    name clients send); ``table_pooling`` keys may be checkpoint or new names.
    ``dense_features`` and ``interaction`` are checked against the weights where
    these determine them, and decide where they do not.
    """

    dense_features: int | None = None
    pooling: Pooling = Pooling.SUM
    table_pooling: Mapping[str, Pooling] = dataclasses.field(default_factory=dict)
    name_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    interaction: Interaction | None = None


@dataclasses.dataclass(frozen=True)
class ImportedTable:
    """One table to write: where it comes from and how its rows are transformed on the way."""

    spec: TableSpec
    key: str                                  # checkpoint key of the weight, for error messages
    source: torch.Tensor                      # [rows, dim], any float dtype, typically memory-mapped
    row_scale: torch.Tensor | None = None     # [rows]: per-row weights folded into the rows (exact for sum pooling)
    scale_key: str | None = None
    projection: torch.Tensor | None = None    # [dim, source dim]: a linear map after pooling, folded into the rows
    projection_key: str | None = None

    def transform(self, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` as they must be stored: float32, weights and projection folded in.

        Both folds are exact for sum pooling: sum(w_r * e_r) @ Pᵀ == sum((w_r * e_r) @ Pᵀ).
        """
        rows = self.source[start:end].detach().to(torch.float32)
        if self.row_scale is not None:
            rows = rows * self.row_scale[start:end].detach().to(torch.float32).unsqueeze(1)
        if self.projection is not None:
            rows = rows @ self.projection.detach().to(torch.float32).T
        return rows

    @property
    def where(self) -> str:
        parts = [k for k in (self.scale_key, self.projection_key) if k]
        return self.key + (f" (with {', '.join(parts)} folded in)" if parts else "")


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    """Everything an importer read, ready to be written as a model directory."""

    source: str
    spec: ModelSpec
    dense: dict[str, torch.Tensor]
    tables: tuple[ImportedTable, ...]
    notes: tuple[str, ...] = ()               # what the import did beyond copying, for the user


# --------------------------------------------------------------------------- reading

def _numpy_scalar_globals() -> list[Any]:
    """The globals a pickled numpy scalar needs (facebookresearch/dlrm saves losses as numpy floats)."""
    out: list[Any] = [np.dtype]
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    out.append(core.multiarray.scalar)
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))
    return out


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a checkpoint safely (no code runs) and lazily (storages memory-mapped).

    Raises CheckpointError when the file is missing, is not a torch checkpoint,
    or pickles anything but tensors, containers and numpy scalars.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, [f"{p}: no such file"])
    # Only the zip format (torch >= 1.6) can be memory-mapped; the legacy one is read whole.
    lazy = zipfile.is_zipfile(p)
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=lazy)
        except Exception as e:  # torch raises many types here (zip, pickle, weights_only)
            raise CheckpointError(p, [_load_problem(p, e)]) from None


def _load_problem(p: Path, e: Exception) -> str:
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    foreign = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if foreign:
        return (f"{p}: pickles {foreign.group(1)}, which a weights-only load refuses "
                "(save model.state_dict(), not the module or other objects)")
    return f"{p}: not a loadable torch checkpoint: {_short(e)}"


def _short(e: Exception) -> str:
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def strip_prefix(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """Remove a wrapper prefix (``module.`` of DDP, ...) that every key shares; returns (state, prefix)."""
    keys = list(state)
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return dict(state), ""


def float_tensor(state: Mapping[str, Any], key: str, shape: tuple[int | None, ...], problems: list[str],
                 what: str = "") -> torch.Tensor | None:
    """``state[key]`` checked to be a floating tensor of ``shape`` (None = any); appends a problem naming the key."""
    if key not in state:
        problems.append(f"{key}: missing{f' ({what})' if what else ''}")
        return None
    v = state[key]
    if not isinstance(v, torch.Tensor):
        problems.append(f"{key}: is a {type(v).__name__}, expected a tensor")
        return None
    if not v.is_floating_point():
        problems.append(f"{key}: dtype {str(v.dtype).removeprefix('torch.')}, expected a floating-point tensor")
        return None
    if v.layout is not torch.strided or v.is_quantized:
        problems.append(f"{key}: a {v.layout} tensor; expected a plain dense tensor")
        return None
    got = tuple(v.shape)
    if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        problems.append(f"{key}: shape {tuple(got)}, expected {want}{f' ({what})' if what else ''}")
        return None
    return v


def dense_weights(tensors: Mapping[str, tuple[str, torch.Tensor]], problems: list[str]) -> dict[str, torch.Tensor]:
    """``{our key: (checkpoint key, tensor)}`` -> our dense.pt tensors as float32, checked finite."""
    out: dict[str, torch.Tensor] = {}
    for ours, (key, t) in tensors.items():
        t32 = t.detach().to(torch.float32)
        if not bool(torch.isfinite(t32).all()):
            problems.append(f"{key}: holds NaN or infinite values")
        out[ours] = t32
    return out


# A checkpoint MLP: the (weight key, bias key) of each Linear, and its (weight, bias) tensors, in layer order.
LinearKeys = list[tuple[str, str]]
LinearLayers = list[tuple[torch.Tensor, torch.Tensor]]


def mlp_dense_weights(mlps: Mapping[str, tuple[LinearKeys, LinearLayers]],
                      problems: list[str]) -> dict[str, torch.Tensor]:
    """Our dense.pt tensors from the checkpoint's MLPs: ``{part: (keys, layers)}`` -> ``part.J.weight/bias``.

    ``part`` is ``bottom_mlp`` or ``top_mlp``; layer ``J`` is the J-th Linear of
    the chain whatever index the checkpoint gave it.  Problems name the checkpoint key.
    """
    src: dict[str, tuple[str, torch.Tensor]] = {}
    for part, (keys, layers) in mlps.items():
        for j, ((wk, bk), (w, b)) in enumerate(zip(keys, layers)):
            src[f"{part}.{j}.weight"] = (wk, w)
            src[f"{part}.{j}.bias"] = (bk, b)
    return dense_weights(src, problems)


def build_plan(source: str, prefix: str, bottom: LinearLayers, top: LinearLayers, interaction: Interaction,
               dense: dict[str, torch.Tensor], tables: list[ImportedTable], notes: list[str]) -> ImportPlan:
    """The ImportPlan of a checked checkpoint: its spec is read off the MLP shapes and the tables' specs.

    ``prefix`` is the wrapper prefix :func:`strip_prefix` removed ("" for none); the user is told about it.
    """
    spec = ModelSpec(
        dense_features=int(bottom[0][0].shape[1]),
        bottom_mlp=tuple(int(w.shape[0]) for w, _ in bottom),
        top_mlp=tuple(int(w.shape[0]) for w, _ in top),
        interaction=interaction,
        tables=tuple(t.spec for t in tables),
    )
    if prefix:
        notes = [*notes, f"stripped the {prefix!r} prefix of every key"]
    return ImportPlan(source=source, spec=spec, dense=dense, tables=tuple(tables), notes=tuple(notes))


def resolve_tables(
    found: list[tuple[str, str]],
    options: ImportOptions,
    problems: list[str],
    aliases: Mapping[str, tuple[str, ...]] | None = None,
) -> list[tuple[str, Pooling]]:
    """Our (name, pooling) for each checkpoint table ``(ckpt_name, key)``, in checkpoint order.

    ``aliases`` lists other spellings a user may give for a checkpoint name in
    the options (dlrm's ``emb_l.3`` or ``3`` for ``t3``).  Unknown option names and
    names model.toml would refuse are problems naming the key.
    """
    aliases = aliases or {}
    spelled: dict[str, str] = {}
    for ckpt, _ in found:
        for alias in (ckpt, *aliases.get(ckpt, ())):
            spelled[alias] = ckpt
    known = ", ".join(c for c, _ in found)
    rename: dict[str, str] = {}
    for given, new in options.name_map.items():
        if given not in spelled:
            problems.append(f"--name-map {given}={new}: the checkpoint has no table {given!r} (tables: {known})")
            continue
        rename[spelled[given]] = new
    names = {ckpt: rename.get(ckpt, ckpt) for ckpt, _ in found}
    by_new = {new: ckpt for ckpt, new in names.items()}
    pooling: dict[str, Pooling] = {}
    for given, mode in options.table_pooling.items():
        ckpt = spelled.get(given) or by_new.get(given)
        if ckpt is None:
            problems.append(f"--table-pooling {given}={mode.label}: no table {given!r} (tables: {known})")
            continue
        pooling[ckpt] = mode
    out: list[tuple[str, Pooling]] = []
    seen: dict[str, str] = {}
    for ckpt, key in found:
        name = names[ckpt]
        if not _NAME_RE.match(name):
            hint = "pass --name-map" if name == ckpt else "choose another --name-map target"
            problems.append(f"{key}: table name {name!r} is not a valid flexemr table name "
                            f"(letters, digits, _ . -, starting with a letter or _; {hint})")
        if name in seen:
            problems.append(f"{key}: table name {name!r} is already used by {seen[name]}")
        seen[name] = key
        out.append((name, pooling.get(ckpt, options.pooling)))
    return out


# --------------------------------------------------------------------------- writing

Progress = Callable[[str, int, int], None]   # (table name, rows done, rows total)


class StderrProgress:
    """Per-table progress on stderr: an updating line on a terminal, a few lines otherwise."""

    def __init__(self, stream: IO[str] | None = None, interval_s: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 5.0)
        self._last = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self._last < self.interval_s:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        line = f"tables/{table}.npy: {done:,}/{total:,} rows ({pct:3.0f}%)"
        # A terminal gets one line rewritten in place; a log file gets a line per update.
        self.stream.write(("\r" + line + ("\n" if finished else "")) if self.tty else line + "\n")
        self.stream.flush()


def _chunk_rows(dim: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, dim * 4))


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages; never loses data (file pages are re-read on access)
_libc: Any = None


def _page_out(t: torch.Tensor) -> None:
    """Drop the pages of ``t`` (rows already copied) from this process: a memory-mapped checkpoint
    otherwise stays resident page by page until the whole table has been read.

    MADV_PAGEOUT rather than MADV_DONTNEED: on memory that is not file-backed (a legacy
    checkpoint read whole) it is a mere hint, where DONTNEED would zero the rows.
    Best effort: any failure (another OS, an old kernel) leaves the pages where they are.
    """
    global _libc
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        import ctypes

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo = (start + page - 1) // page * page      # whole pages inside the rows only
        hi = end // page * page
        if hi > lo:
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_PAGEOUT))
    except (OSError, AttributeError, ValueError):
        pass


def _write_table(out: Path, t: ImportedTable, chunk_bytes: int, progress: Progress | None) -> Path:
    """Copy one table chunk by chunk into ``tables/NAME.npy`` (float32, C order).

    open_memmap writes the .npy header and sizes the file; the rows then go in with
    plain writes, so neither the written table nor (see _page_out) the read one stays
    mapped in this process: memory holds one chunk, not two tables.
    """
    spec = t.spec
    path = table_path(out, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    step = _chunk_rows(spec.dim, chunk_bytes)
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(spec.rows, spec.dim))
        offset = int(header.offset)
        del header
        if progress is not None:
            progress(spec.name, 0, spec.rows)
        with open(tmp, "r+b") as f:
            f.seek(offset)
            for start in range(0, spec.rows, step):
                end = min(spec.rows, start + step)
                chunk = np.ascontiguousarray(t.transform(start, end).numpy())
                bad = ~np.isfinite(chunk).all(axis=1)
                if bad.any():
                    row = start + int(np.flatnonzero(bad)[0])
                    raise CheckpointError("checkpoint", [f"{t.where}: row {row} holds NaN or infinite values"])
                f.write(memoryview(chunk).cast("B"))
                _page_out(t.source[start:end])
                if progress is not None:
                    progress(spec.name, end, spec.rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_model_dir(out: str | Path, plan: ImportPlan, progress: Progress | None = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Path]:
    """Write ``plan`` as a model directory in ``out`` and check it; returns the files written.

    Existing model files of the same names are overwritten (the caller decides
    whether ``out`` may be non-empty); ``model.toml`` is removed first and
    written last.  The result is validated with the same torch-free check the
    daemon runs, so a directory this returns is one ``flexemrd`` will serve.
    """
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.toml").unlink(missing_ok=True)
    written: list[Path] = []
    for t in plan.tables:
        try:
            written.append(_write_table(d, t, chunk_bytes, progress))
        except CheckpointError as e:
            raise CheckpointError(plan.source, e.problems) from None
    written.append(save_dense(d, plan.dense))
    written.append(write_spec(d, plan.spec))
    problems = validate_model_dir(d)
    if problems:  # a bug in an importer, not in the checkpoint: say so plainly
        raise CheckpointError(plan.source, [f"the written model directory is invalid: {p}" for p in problems])
    return written


def pairs(n: int) -> int:
    """Number of unordered pairs among ``n`` vectors."""
    return n * (n - 1) // 2 if n > 1 else 0


def solve_pairs_width(extra: int) -> int | None:
    """``F`` with ``F + F*(F-1)/2 == extra`` (dense-sparse plus sparse-sparse dot products), if any."""
    f = int((math.isqrt(8 * extra + 1) - 1) // 2)
    for cand in (f - 1, f, f + 1):
        if cand >= 0 and cand + pairs(cand) == extra:
            return cand
    return None


def numbered(state: Mapping[str, Any], pattern: str) -> dict[int, str]:
    """``{index: key}`` for the keys matching ``pattern`` (a regex with one integer group)."""
    rx = re.compile(pattern)
    out: dict[int, str] = {}
    for k in state:
        m = rx.fullmatch(k)
        if m:
            out[int(m.group(1))] = k
    return out


def linear_chain(
    state: Mapping[str, Any],
    layers: list[tuple[str, str]],
    fan_in: int | None,
    problems: list[str],
    what: str,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Check ``[(weight key, bias key), ...]`` form a chain of nn.Linear layers; returns their tensors.

    ``fan_in`` is the width the first layer must read (None: whatever it reads).
    Each problem names the key whose shape breaks the chain.
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    ok = True
    for i, (wk, bk) in enumerate(layers):
        w = float_tensor(state, wk, (None, fan_in), problems, f"{what} layer {i}")
        if w is None:
            ok = False
            fan_in = None
            continue
        b = float_tensor(state, bk, (w.shape[0],), problems, f"{what} layer {i} bias")
        ok = ok and b is not None
        if b is not None:
            out.append((w, b))
        fan_in = int(w.shape[0])
    return out if ok else None
