"""``dense.pt`` on disk, read without torch: its path, the keys and shapes ``model.toml`` implies, a reader.

A torch checkpoint is a zip archive whose ``ARCHIVE/data.pkl`` describes each
tensor (storage type, shape, stride) and whose ``ARCHIVE/data/KEY`` members
hold the raw storages.  A restricted unpickler that knows only the few globals
a state_dict uses turns that into (dtype, shape, finite) records without
executing anything; an archive it does not understand raises ``UnsupportedArchive``
and the caller falls back to torch.

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

__all__ = ["DENSE_FILE", "DenseEntries", "UnsupportedArchive", "check_dense_entries", "dense_path", "dense_shapes",
           "read_dense_entries", "sniff_dense"]

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


def read_dense_entries(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bool]], list[str]]:
    """(entries, problems) of a torch zip checkpoint, without torch.  Raises UnsupportedArchive."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnsupportedArchive("not a zip archive") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise UnsupportedArchive("no single data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
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
        entries: dict[str, tuple[str, tuple[int, ...], bool]] = {}
        problems: list[str] = []
        storages: dict[str, np.ndarray] = {}
        for k, v in state.items():
            if not isinstance(v, _TensorInfo):
                problems.append(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
                continue
            finite = True
            if v.storage.dtype in ("float32", "float64", "float16"):
                arr = storages.get(v.storage.key)
                if arr is None:
                    dt = np.dtype(v.storage.dtype).newbyteorder("<" if order == "little" else ">")
                    try:
                        raw = zf.read(f"{prefix}data/{v.storage.key}")
                    except KeyError:
                        problems.append(f"{path}: {k}: storage data/{v.storage.key} is missing from the archive")
                        continue
                    arr = storages[v.storage.key] = np.frombuffer(raw, dtype=dt, count=len(raw) // dt.itemsize)
                numel = int(np.prod(v.shape))
                last = v.offset + sum((n - 1) * s for n, s in zip(v.shape, v.stride)) if numel else v.offset - 1
                if v.offset < 0 or last >= len(arr):
                    problems.append(f"{path}: {k}: storage data/{v.storage.key} is truncated")
                    continue
                view = np.lib.stride_tricks.as_strided(
                    arr[v.offset:], shape=v.shape, strides=[s * arr.itemsize for s in v.stride], writeable=False)
                finite = bool(np.isfinite(view).all())
            entries[str(k)] = (v.storage.dtype, v.shape, finite)
        return entries, problems
