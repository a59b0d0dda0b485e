"""``dense.pt`` on disk, read without torch: its path, the keys and shapes ``model.toml`` implies, a reader.

A torch checkpoint is a zip archive whose ``ARCHIVE/data.pkl`` describes each
tensor (storage type, shape, stride) and whose ``ARCHIVE/data/KEY`` members
hold the raw storages.  A restricted unpickler that knows only the few globals
a state_dict uses turns that into (dtype, shape, finite) records without
executing anything; an archive it does not understand raises ``UnsupportedArchive``
and the caller falls back to torch.

A checkpoint may come from anyone, and 11 KB can describe a stride-0
20000x20000 tensor or a storage that inflates to gigabytes.  So every decision
is made from metadata first (data.pkl's size, each tensor's shape, stride and
offset, each storage's declared and inflated size, all bounded by what
``model.toml`` implies), and values are read only for tensors that passed:
nothing larger than a declared shape is ever materialised.

This module exists so that :mod:`flexemr.model.dense` (torch) and
:mod:`flexemr.model.loader` (no torch) can both use these checks without
importing each other: dense -> dense_file <- loader, and loader imports dense
only lazily, inside the functions that need torch.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flexemr.model.spec import ModelSpec

__all__ = ["DENSE_FILE", "DenseEntries", "MAX_PICKLE_BYTES", "UnsupportedArchive", "check_dense_entries",
           "dense_file_problems", "dense_path", "dense_shapes", "read_dense_entries", "sniff_dense", "storage_budget"]

DENSE_FILE = "dense.pt"

# (dtype name, shape, all values finite) per state_dict key
DenseEntries = Mapping[str, tuple[str, tuple[int, ...], bool]]


def dense_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / DENSE_FILE


def dense_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every key ``dense.pt`` must hold and the shape ``model.toml`` implies for it (nn.Linear layout)."""
    out: dict[str, tuple[int, ...]] = {}
    for part, first, widths in (
        ("bottom_mlp", spec.dense_features, spec.bottom_mlp),
        ("top_mlp", spec.top_input_width, spec.top_mlp),
    ):
        fan_in = first
        for i, width in enumerate(widths):
            out[f"{part}.{i}.weight"] = (width, fan_in)
            out[f"{part}.{i}.bias"] = (width,)
            fan_in = width
    return out


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_dense_entries(path: str | Path, entries: DenseEntries, spec: ModelSpec) -> list[str]:
    """Compare a state_dict's (dtype, shape, finite) records with what ``spec`` implies."""
    problems: list[str] = []
    want = dense_shapes(spec)
    for key, shape in want.items():
        got = entries.get(key)
        if got is None:
            problems.append(f"{path}: missing key {key} (model.toml implies shape {_fmt(shape)})")
            continue
        dtype, gshape, finite = got
        if tuple(gshape) != shape:
            problems.append(f"{path}: {key} has shape {_fmt(tuple(gshape))}, model.toml implies {_fmt(shape)}")
        if dtype != "float32":
            problems.append(f"{path}: {key} has dtype {dtype}, must be float32")
        if not finite:
            problems.append(f"{path}: {key} contains NaN or infinite values")
    for key in entries:
        if key not in want:
            problems.append(f"{path}: unexpected key {key} (model.toml implies only {len(want)} keys: "
                            f"bottom_mlp.0..{len(spec.bottom_mlp) - 1}, top_mlp.0..{len(spec.top_mlp) - 1})")
    return problems


# --------------------------------------------------------------------------- torch-free dense.pt reader

class UnsupportedArchive(Exception):
    """The archive uses something the restricted reader does not know: let torch decide."""


class _Foreign(Exception):
    """The pickle names a non-torch global: not a plain state_dict (weights_only would refuse it too)."""


# torch's legacy typed-storage class names, as torch.save still pickles them
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest) -> _TensorInfo:
    return _TensorInfo(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_rest):
    return data


class _StateUnpickler(pickle.Unpickler):
    """Knows only what a state_dict of dense tensors pickles to; anything else is UnsupportedArchive."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" or module.startswith("torch."):
            raise UnsupportedArchive(f"{module}.{name}")  # a torch format detail we do not know: ask torch
        raise _Foreign(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsupportedArchive(f"persistent id {pid!r}")
        return _Storage(pid[1].dtype, str(pid[2]), int(pid[4]))


def sniff_dense(path: str | Path) -> str | None:
    """A problem line if ``path`` cannot be a torch checkpoint at all (no torch needed), else None.

    torch writes zip archives (``PK``); files from torch < 1.6 are bare pickles
    (``0x80``).  Anything else is truncated or overwritten, and saying so needs
    no torch, which keeps a corrupt file from pulling torch into emrctl.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else f"{path}: not a loadable torch state_dict: corrupt or truncated zip archive"
    if head.startswith(b"\x80"):
        return None
    return f"{path}: not a loadable torch state_dict: neither a zip archive nor a pickle (truncated or overwritten?)"


# A state_dict's data.pkl is a few hundred bytes per key; anything far larger is
# not a checkpoint of this model (and would cost memory just to unpickle).
MAX_PICKLE_BYTES = 16 << 20

_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}
_FLOATS = ("float32", "float64", "float16")  # the dtypes numpy can check for NaN without torch


def storage_budget(spec: ModelSpec) -> int:
    """The most bytes one storage of a valid ``dense.pt`` can need: every weight of the model, in float64.

    A storage may legitimately hold several tensors (views of one buffer), so the
    bound is the whole model, not one key; float64 leaves room for a wrong dtype
    to be reported as such rather than as an oversized storage.
    """
    return 8 * sum(int(np.prod(shape)) for shape in dense_shapes(spec).values())


def _layout_problems(path: Path, key: str, t: _TensorInfo, member: zipfile.ZipInfo | None, budget: int) -> list[str]:
    """What is wrong with one tensor's storage, offset, shape and stride, from metadata alone."""
    where = f"{path}: {key}: storage data/{t.storage.key}"
    size = _ITEMSIZE.get(t.storage.dtype, 8)
    declared = t.storage.numel * size
    if member is None:
        return [f"{where} is missing from the archive"]
    if t.storage.numel < 0 or declared > budget:
        return [f"{where} declares {t.storage.numel:,} elements ({declared:,} bytes), more than the whole model "
                f"needs ({budget:,} bytes)"]
    if member.file_size > budget:  # e.g. a deflated member that would inflate to gigabytes
        return [f"{where} inflates to {member.file_size:,} bytes, more than the whole model needs ({budget:,} bytes)"]
    if member.file_size < declared:
        return [f"{where} declares {t.storage.numel:,} elements ({declared:,} bytes) but the archive holds "
                f"{member.file_size:,} bytes"]
    if len(t.stride) != len(t.shape) or any(n < 0 for n in t.shape) or any(s < 0 for s in t.stride) or t.offset < 0:
        return [f"{where}: invalid layout (offset {t.offset}, shape {_fmt(t.shape)}, stride {_fmt(t.stride)})"]
    if all(t.shape):
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
        if last >= t.storage.numel:
            return [f"{where} is truncated: shape {_fmt(t.shape)} with stride {_fmt(t.stride)} from offset "
                    f"{t.offset} reaches element {last:,} of {t.storage.numel:,}"]
    return []


def read_dense_entries(path: Path, spec: ModelSpec) -> tuple[dict[str, tuple[str, tuple[int, ...], bool]], list[str]]:
    """(entries, problems) of a torch zip checkpoint, without torch.  Raises UnsupportedArchive.

    Everything is decided from the archive's metadata first: data.pkl (read with
    a restricted unpickler that records each tensor's storage, offset, shape and
    stride and loads nothing) and the zip directory (each storage member's
    inflated size).  Values are read only for a tensor whose key, shape, dtype
    and layout are what ``spec`` implies, so no tensor larger than its declared
    shape and no storage larger than the whole model is ever materialised.  A
    tensor whose metadata is wrong gets ``finite=True`` (unknown): its shape or
    layout problem is the one to report.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnsupportedArchive("not a zip archive") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise UnsupportedArchive("no single data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        pkl_size = zf.getinfo(pkls[0]).file_size
        if pkl_size > MAX_PICKLE_BYTES:
            return {}, [f"{path}: data.pkl is {pkl_size:,} bytes, more than any state_dict's "
                        f"({MAX_PICKLE_BYTES:,} at most)"]
        try:
            order = zf.read(prefix + "byteorder").decode().strip()
        except KeyError:
            order = "little"
        try:
            state = _StateUnpickler(zf.open(pkls[0])).load()
        except UnsupportedArchive:
            raise
        except _Foreign as e:
            return {}, [f"{path}: not a plain state_dict: it pickles {e} (save module.state_dict(), not the module)"]
        except Exception as e:
            return {}, [f"{path}: data.pkl is unreadable: {e}"]
        if not isinstance(state, Mapping):
            return {}, [f"{path}: holds a {type(state).__name__}, expected a state_dict (a dict of tensors)"]
        want = dense_shapes(spec)
        budget = storage_budget(spec)
        members = {i.filename: i for i in zf.infolist()}
        entries: dict[str, tuple[str, tuple[int, ...], bool]] = {}
        problems: list[str] = []
        storages: dict[str, np.ndarray] = {}
        for k, v in state.items():
            if not isinstance(v, _TensorInfo):
                problems.append(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
                continue
            entries[str(k)] = (v.storage.dtype, v.shape, True)
            layout = _layout_problems(path, str(k), v, members.get(f"{prefix}data/{v.storage.key}"), budget)
            problems += layout
            if layout or want.get(str(k)) != v.shape or v.storage.dtype not in _FLOATS:
                continue  # its metadata is the problem (or it has no NaN to find): leave the values unread
            arr = storages.get(v.storage.key)
            if arr is None:
                dt = np.dtype(v.storage.dtype).newbyteorder("<" if order == "little" else ">")
                raw = zf.read(f"{prefix}data/{v.storage.key}")  # bounded: file_size <= budget, checked above
                arr = storages[v.storage.key] = np.frombuffer(raw, dtype=dt, count=v.storage.numel)
            view = np.lib.stride_tricks.as_strided(
                arr[v.offset:], shape=v.shape, strides=[s * arr.itemsize for s in v.stride], writeable=False)
            entries[str(k)] = (v.storage.dtype, v.shape, bool(np.isfinite(view).all()))
        return entries, problems


def dense_file_problems(path: Path, spec: ModelSpec) -> list[str] | None:
    """Every problem of the checkpoint at ``path`` against ``spec`` without torch, or None: ask torch.

    None means the archive uses a format the restricted reader does not know (an
    older torch); the caller loads it with ``torch.load(weights_only=True)`` and
    checks shapes before values (see :func:`flexemr.model.dense.load_dense`).
    """
    bad = sniff_dense(path)
    if bad:
        return [bad]
    try:
        entries, problems = read_dense_entries(path, spec)
    except UnsupportedArchive:
        return None
    except zipfile.BadZipFile as e:  # e.g. a bad CRC: torch.load would not even notice the flipped bits
        return [f"{path}: corrupt archive: {e}"]
    except Exception as e:  # odd metadata: a validator reports, it never crashes
        return [f"{path}: not a loadable torch state_dict: {type(e).__name__}: {e}"]
    if problems and not entries:
        return problems
    return problems + check_dense_entries(path, entries, spec)
