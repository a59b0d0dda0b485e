"""``dense.pt``: the DLRM neural network (bottom MLP, interaction, top MLP) in torch.

The contract (DESIGN.md, "Model directory")::

    dense.pt keys     bottom_mlp.{i}.weight [out, in]   bottom_mlp.{i}.bias [out]
                      top_mlp.{i}.weight    [out, in]   top_mlp.{i}.bias    [out]
                      (i = layer index; nn.Linear shapes; float32)

    forward           x = bottom(dense)                 ReLU after every bottom layer
                      "dot": Z = stack([x, *pooled]) [B, T+1, d]
                             h = cat([x, tril(Z Zᵀ, -1) row-major])
                      "cat": h = cat([x, *pooled])
                      score = sigmoid(top(h))           ReLU after every top layer but the last

The layers live in ``nn.ModuleList``s (not ``nn.Sequential`` with interleaved
ReLU modules) so that the index in a key is the layer index, as the contract
says.  ``reference_forward_numpy`` is an independent float64 implementation used
by tests to cross-check the torch one; keep it free of any code shared with
``DLRM.forward``.

Validation of a ``dense.pt`` against ``model.toml`` lives in
:mod:`flexemr.model.dense_file` because it must also work without torch (emrctl and
the supervisor never import torch); ``load_dense`` applies the same checks.  This
module never imports :mod:`flexemr.model.loader` (which imports it lazily).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexemr.errors import ModelError
from flexemr.model.dense_file import check_dense_entries, dense_file_problems, dense_path, dense_shapes
from flexemr.model.spec import ModelSpec
from flexemr.types import Interaction

__all__ = ["DLRM", "init_dense_state", "save_dense", "load_dense", "reference_forward_numpy"]


class DLRM(nn.Module):
    """The dense half of a DLRM-family model, built from a :class:`ModelSpec`.

    ``forward(dense [B, F] float32, pooled: list of [B, d_t] in table order) -> scores [B]``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.interaction = spec.interaction
        self.n_tables = len(spec.tables)
        widths = [spec.dense_features, *spec.bottom_mlp]
        self.bottom_mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        widths = [spec.top_input_width, *spec.top_mlp]
        self.top_mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # Pair indices of the strictly lower triangle, row-major (i > j), as
        # numpy's tril_indices lists them.  Non-persistent buffers: they follow
        # .to(device) but stay out of the state_dict, whose keys are a contract.
        li, lj = np.tril_indices(self.n_tables + 1, -1)
        self.register_buffer("_li", torch.from_numpy(li.astype(np.int64)), persistent=False)
        self.register_buffer("_lj", torch.from_numpy(lj.astype(np.int64)), persistent=False)

    def forward(self, dense: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(pooled) != self.n_tables:
            raise ValueError(f"DLRM.forward: expected {self.n_tables} pooled tensors (one per table), got {len(pooled)}")
        x = dense
        for layer in self.bottom_mlp:
            x = torch.relu(layer(x))
        if self.interaction is Interaction.DOT:
            z = torch.stack([x, *pooled], dim=1)                 # [B, T+1, d]
            zz = torch.bmm(z, z.transpose(1, 2))                 # [B, T+1, T+1]
            h = torch.cat([x, zz[:, self._li, self._lj]], dim=1)
        else:
            h = torch.cat([x, *pooled], dim=1)
        last = len(self.top_mlp) - 1
        for i, layer in enumerate(self.top_mlp):
            h = layer(h)
            if i < last:
                h = torch.relu(h)
        return torch.sigmoid(h).squeeze(1)


def init_dense_state(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights for ``spec`` (the DLRM reference initialisation).

    Weights ~ N(0, sqrt(2 / (fan_in + fan_out))), biases ~ N(0, sqrt(1 / fan_out)),
    as in facebookresearch/dlrm: activations keep roughly unit scale through the
    layers, so scores spread over (0, 1) instead of saturating at 0 or 1.  The
    numbers come from numpy's PCG64 so they do not depend on the torch version.
    """
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in dense_shapes(spec).items():
        if key.endswith(".weight"):
            fan_out, fan_in = shape
            std = np.sqrt(2.0 / (fan_in + fan_out))
        else:
            std = np.sqrt(1.0 / shape[0])
        state[key] = torch.from_numpy(rng.normal(0.0, std, size=shape).astype(np.float32))
    return state


def save_dense(model_dir: str | Path, state: Mapping[str, torch.Tensor | np.ndarray]) -> Path:
    """Write ``MODEL_DIR/dense.pt`` atomically (a reader never sees a half-written file)."""
    path = dense_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): torch.save writes whole storages, so a view would drag its base along.
    out = {
        k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()).contiguous().clone()
        for k, v in state.items()
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(out, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_dense(model_dir: str | Path, spec: ModelSpec) -> DLRM:
    """Load ``dense.pt`` into a :class:`DLRM` in eval mode, or raise ModelError listing every problem.

    The archive's metadata is checked first, without torch (shapes, strides,
    storage sizes, dtypes: :func:`~flexemr.model.dense_file.dense_file_problems`),
    so a hostile file is refused before ``torch.load`` builds anything.  Only an
    archive that reader does not know reaches torch unchecked; then the tensors
    are memory-mapped (zip archives), and shapes and dtypes are compared before
    any value is read, so a stride-0 giant costs nothing.
    """
    path = dense_path(model_dir)
    if not path.is_file():
        raise ModelError([f"{path}: missing (a model directory needs dense.pt, the MLP weights)"])
    problems = dense_file_problems(path, spec)
    if problems:
        raise ModelError(problems)
    try:
        # weights_only: a model directory may come from elsewhere; never unpickle code.
        # mmap: storages stay file-backed until load_state_dict copies the few it needs.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types here (zip, pickle, weights_only)
        foreign = re.search(r"Unsupported global: GLOBAL (\S+) was not", str(e))
        if foreign:  # same words as the torch-free validator in loader.py
            raise ModelError([f"{path}: not a plain state_dict: it pickles {foreign.group(1)} "
                              "(save module.state_dict(), not the module)"]) from None
        raise ModelError([f"{path}: not a loadable torch state_dict: {_short_error(e)}"]) from None
    if not isinstance(state, Mapping):
        raise ModelError([f"{path}: holds a {type(state).__name__}, expected a state_dict (a dict of tensors)"])
    if problems is None:  # torch read what the torch-free reader could not: check it here
        _check_loaded(path, state, spec)
    model = DLRM(spec)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)  # a serving model never trains; saves autograd bookkeeping
    return model


def _check_loaded(path: Path, state: Mapping[str, object], spec: ModelSpec) -> None:
    """Raise ModelError for a loaded state_dict that does not fit ``spec``: shapes first, values last.

    ``isfinite`` on a tensor allocates its full shape, so it runs only on tensors
    whose shape is the one ``spec`` implies (a stride-0 20000x20000 view is
    refused by its shape, never expanded).
    """
    want = dense_shapes(spec)
    entries = {}
    problems: list[str] = []
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            problems.append(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
            continue
        checkable = v.is_floating_point() and want.get(str(k)) == tuple(v.shape)
        finite = bool(torch.isfinite(v).all()) if checkable else True
        entries[str(k)] = (str(v.dtype).removeprefix("torch."), tuple(v.shape), finite)
    problems += check_dense_entries(path, entries, spec)
    if problems:
        raise ModelError(problems)


def _short_error(e: Exception) -> str:
    """torch's weights_only refusal is a page of advice with ANSI codes; keep the line that says why."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", msg)
    line = m.group(1) if m else msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return line[:300]


def reference_forward_numpy(
    state: Mapping[str, np.ndarray],
    spec: ModelSpec,
    dense: np.ndarray,
    pooled: Sequence[np.ndarray] | Mapping[str, np.ndarray],
) -> np.ndarray:
    """The DLRM forward in float64 numpy, written independently of :class:`DLRM` (test oracle).

    ``pooled`` is a list in table order or a dict by table name.  Returns float64 scores [B].
    """
    if isinstance(pooled, Mapping):
        pooled = [pooled[t.name] for t in spec.tables]
    w = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    x = np.asarray(dense, dtype=np.float64)
    for i in range(len(spec.bottom_mlp)):
        x = np.maximum(x @ w[f"bottom_mlp.{i}.weight"].T + w[f"bottom_mlp.{i}.bias"], 0.0)
    embs = [np.asarray(p, dtype=np.float64) for p in pooled]
    if spec.interaction is Interaction.DOT:
        feats = [x, *embs]
        cols = []
        for i in range(len(feats)):      # row-major strictly lower triangle: (1,0), (2,0), (2,1), ...
            for j in range(i):
                cols.append(np.einsum("bd,bd->b", feats[i], feats[j]))
        h = np.concatenate([x, np.stack(cols, axis=1)], axis=1) if cols else x
    else:
        h = np.concatenate([x, *embs], axis=1)
    n = len(spec.top_mlp)
    for i in range(n):
        h = h @ w[f"top_mlp.{i}.weight"].T + w[f"top_mlp.{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return 1.0 / (1.0 + np.exp(-h[:, 0]))
