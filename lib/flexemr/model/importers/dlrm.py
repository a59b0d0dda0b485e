"""Import a facebookresearch/dlrm checkpoint (``dlrm_s_pytorch.py --save-model``) as a model directory.

``--save-model`` writes ``{"state_dict": dlrm.state_dict(), "epoch": .., "opt_state_dict": .., ...}``
(losses as numpy scalars); a bare ``DLRM_Net.state_dict()`` is accepted too.
Its keys (a DataParallel ``module.`` prefix is stripped)::

    emb_l.I.weight            [rows, m]   nn.EmbeddingBag(mode="sum")        -> tables/tI.npy
    emb_l.I.embs.weight       [rows, mI]  --md-flag: PrEmbeddingBag, then    -> tables/tI.npy = embs @ projᵀ
    emb_l.I.proj.weight       [m, mI]       a bias-free projection           (exact: the sum commutes with it)
    v_W_l.I                   [rows]      --weighted-pooling learned         -> folded into the rows (exact for sum)
    bot_l.2J.{weight,bias}                create_mlp: nn.Sequential of       -> bottom_mlp.J.*
    top_l.2J.{weight,bias}                Linear (even index), activation    -> top_mlp.J.*
                                          (odd index) pairs

``create_mlp(ln, sigmoid_layer)`` puts ReLU after every Linear except the one at
``sigmoid_layer``, which gets a Sigmoid.  The script builds the bottom MLP with
``sigmoid_bot=-1`` (ReLU after every layer, as ours) and the top with
``sigmoid_top = len(ln_top) - 2``: ReLU after every layer but the last, whose
Sigmoid is the output, which is exactly our score.  ``interact_features`` with
``arch_interaction_itself=False`` takes ``Z[:, li, lj]`` for ``i in range(n)``,
``j in range(i)`` over ``[x] + ly``: the strictly lower triangle in row-major
order, the same columns as ours, so they are copied; ``"cat"`` is ``[x] + ly``
as ours.  The interaction is read from the first top layer's width (``--interaction``
decides when both would fit); ``--arch-interaction-itself`` checkpoints (the
diagonal too) and QR embeddings (``--qr-flag``: the quotient and remainder
bags are combined after pooling, which no table of rows reproduces) are refused.
The checkpoint does not record ``--loss-threshold``, whose clamp of the output
is not applied.

Tables are named ``tI`` after their index in ``emb_l`` (``--name-map`` accepts
``tI``, ``emb_l.I`` or ``I``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flexemr.model.importers.common import (
    CheckpointError,
    ImportedTable,
    ImportOptions,
    ImportPlan,
    Progress,
    UnsupportedCheckpoint,
    build_plan,
    float_tensor,
    linear_chain,
    mlp_dense_weights,
    load_checkpoint,
    numbered,
    pairs,
    resolve_tables,
    strip_prefix,
    write_model_dir,
)
from flexemr.model.spec import TableSpec
from flexemr.types import Interaction

__all__ = ["plan_dlrm", "import_dlrm"]

_WRAPPERS = ("module.",)


def _unwrap(ckpt: Any, source: str) -> tuple[Mapping[str, Any], list[str]]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(source, [f"holds a {type(ckpt).__name__}, expected the dict dlrm_s_pytorch.py "
                                       "--save-model writes (or a DLRM_Net state_dict)"])
    if "state_dict" in ckpt:
        state = ckpt["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(source, [f"state_dict: is a {type(state).__name__}, expected a dict of tensors"])
        others = sorted(str(k) for k in ckpt if k != "state_dict")
        return state, [f"ignored the training state saved beside it ({', '.join(others)})"] if others else []
    return ckpt, []


def _mlp(state: Mapping[str, Any], part: str, problems: list[str]) -> list[tuple[str, str]]:
    """(weight key, bias key) of each Linear of a create_mlp Sequential, checking its layout."""
    idx = numbered(state, rf"{part}\.(\d+)\.weight")
    if not idx:
        problems.append(f"{part}.0.weight: missing (the first {part} layer)")
        return []
    for i in sorted(idx):
        if i % 2:
            problems.append(f"{part}.{i}.weight: a layer at an odd index; dlrm's create_mlp builds "
                            f"nn.Sequential(Linear, activation, Linear, ...), Linear layers at even indices")
    top = max(idx)
    for i in range(0, top + 1, 2):
        if i not in idx:
            problems.append(f"{part}.{i}.weight: missing ({part} has Linear layers up to index {top})")
    return [(f"{part}.{i}.weight", f"{part}.{i}.bias") for i in range(0, top + 1, 2)]


def _tables(state: Mapping[str, Any], problems: list[str]) -> list[ImportedTable | None]:
    """One ImportedTable (spec filled in later) per emb_l entry, in emb_l order."""
    idx = numbered(state, r"emb_l\.(\d+)\..*")
    if not idx:
        problems.append("emb_l.0.weight: missing (no embedding tables)")
        return []
    out: list[ImportedTable | None] = []
    for i in range(max(idx) + 1):
        key = f"emb_l.{i}.weight"
        if f"emb_l.{i}.weight_q" in state or f"emb_l.{i}.weight_r" in state:
            raise UnsupportedCheckpoint("checkpoint", [
                f"emb_l.{i}.weight_q: quotient-remainder embeddings (dlrm --qr-flag) are not supported: the "
                "quotient and remainder bags are pooled separately and combined afterwards, which no table "
                "of rows reproduces"])
        scale_key = f"v_W_l.{i}"
        scale = state.get(scale_key)
        if f"emb_l.{i}.embs.weight" in state:  # --md-flag: PrEmbeddingBag(embs, proj)
            src = float_tensor(state, f"emb_l.{i}.embs.weight", (None, None), problems, "mixed-dimension table")
            proj_key = f"emb_l.{i}.proj.weight"
            proj = None
            if proj_key in state and src is not None:
                proj = float_tensor(state, proj_key, (None, src.shape[1]), problems, "mixed-dimension projection")
            if src is None:
                out.append(None)
                continue
            key = f"emb_l.{i}.embs.weight"
        else:
            src = float_tensor(state, key, (None, None), problems, "embedding table")
            proj, proj_key = None, None
            if src is None:
                out.append(None)
                continue
        if scale is not None:
            scale = float_tensor(state, scale_key, (src.shape[0],), problems, "learned per-row pooling weights")
        placeholder = TableSpec(name=f"t{i}", rows=int(src.shape[0]),
                                dim=int(proj.shape[0] if proj is not None else src.shape[1]))
        out.append(ImportedTable(spec=placeholder, key=key, source=src,
                                 row_scale=scale, scale_key=scale_key if scale is not None else None,
                                 projection=proj, projection_key=proj_key if proj is not None else None))
    return out


def _interaction(top_in: int, d: int, dims: list[int], options: ImportOptions, problems: list[str]) -> Interaction:
    n = len(dims) + 1  # the bottom output and one vector per table
    width = {Interaction.DOT: d + pairs(n), Interaction.CAT: d + sum(dims)}
    if options.interaction is not None:
        if width[options.interaction] != top_in:
            problems.append(f"top_l.0.weight: reads {top_in} inputs, but --interaction {options.interaction.value} "
                            f"over {len(dims)} tables gives {width[options.interaction]}")
        return options.interaction
    fits = [k for k, w in width.items() if w == top_in]
    if len(fits) == 1:
        return fits[0]
    if len(fits) == 2:
        problems.append(f"top_l.0.weight: its {top_in} inputs fit both the dot and the cat interaction; "
                        "pass --interaction dot|cat (dlrm's --arch-interaction-op)")
        return Interaction.DOT
    t = len(dims)
    if top_in == d + pairs(n) + n and all(x == d for x in dims):
        # n(n-1)/2 + n == pairs(n + 1): the same width as a dot over one more table.
        raise UnsupportedCheckpoint("checkpoint", [
            f"top_l.0.weight: {top_in} inputs: a model trained with --arch-interaction-itself (each vector's dot "
            "product with itself too) is not supported: flexemr's dot interaction keeps only pairs i > j "
            f"(if the model has {t + 1} tables instead, emb_l.{t}.weight is missing)"])
    # A wider dot interaction means tables missing from the end of emb_l.
    more = next((k for k in range(n + 1, n + 1025) if d + pairs(k) >= top_in), None)
    if more is not None and d + pairs(more) == top_in:
        last = more - 2
        problems.append(f"emb_l.{t}.weight{f' .. emb_l.{last}.weight' if last > t else ''}: missing "
                        f"(top_l.0.weight reads {top_in} inputs: a dot interaction over {more - 1} tables)")
    else:
        problems.append(f"top_l.0.weight: reads {top_in} inputs, but {t} tables give {width[Interaction.DOT]} "
                        f"under interaction dot and {width[Interaction.CAT]} under cat")
    return Interaction.DOT


def plan_dlrm(checkpoint: str | Path, options: ImportOptions | None = None) -> ImportPlan:
    """Read and check a facebookresearch/dlrm checkpoint; raise CheckpointError naming every bad key."""
    options = options or ImportOptions()
    source = str(checkpoint)
    raw, notes = _unwrap(load_checkpoint(checkpoint), source)
    state, prefix = strip_prefix(raw, _WRAPPERS)
    if any(k.startswith(("sparse_arch.", "dense_arch.", "over_arch.")) for k in state):
        raise CheckpointError(source, ["keys sparse_arch.* / dense_arch.* / over_arch.* are a TorchRec DLRM "
                                       "state_dict: import it with --from torchrec"])
    problems: list[str] = []
    try:
        tables = _tables(state, problems)
    except UnsupportedCheckpoint as e:
        raise UnsupportedCheckpoint(source, e.problems) from None
    bottom_keys = _mlp(state, "bot_l", problems)
    top_keys = _mlp(state, "top_l", problems)
    for k in state:
        if not k.startswith(("emb_l.", "v_W_l.", "bot_l.", "top_l.")):
            problems.append(f"{prefix}{k}: unexpected key: not part of dlrm_s_pytorch's DLRM_Net")
        elif k.startswith("v_W_l.") and not k[len("v_W_l."):].isdigit():
            problems.append(f"{prefix}{k}: unexpected key")
    known_emb = {f"emb_l.{i}.{s}" for i in range(len(tables)) for s in ("weight", "embs.weight", "proj.weight")}
    for k in state:
        if k.startswith("emb_l.") and k not in known_emb and not k.endswith((".weight_q", ".weight_r")):
            problems.append(f"{prefix}{k}: unexpected key in emb_l (an embedding kind this importer does not know)")
    n_scales = numbered(state, r"v_W_l\.(\d+)")
    for i, k in n_scales.items():
        if i >= len(tables):
            problems.append(f"{prefix}{k}: pooling weights for table {i}, but emb_l has {len(tables)} tables")
    if problems:
        raise CheckpointError(source, problems)
    bottom = linear_chain(state, bottom_keys, None, problems, "bot_l")
    top = linear_chain(state, top_keys, None, problems, "top_l")
    if problems or bottom is None or top is None:
        raise CheckpointError(source, problems)

    dense_in = int(bottom[0][0].shape[1])
    d = int(bottom[-1][0].shape[0])
    if options.dense_features is not None and options.dense_features != dense_in:
        problems.append(f"bot_l.0.weight: reads {dense_in} dense features, but --dense-features says "
                        f"{options.dense_features}")
    dims = [t.spec.dim for t in tables if t is not None]
    interaction = _interaction(int(top[0][0].shape[1]), d, dims, options, problems)
    if interaction is Interaction.DOT:
        for t in tables:
            if t is not None and t.spec.dim != d:
                problems.append(f"{t.projection_key or t.key}: embedding dim {t.spec.dim}, but bot_l's last layer "
                                f"({bottom_keys[-1][0]}) outputs {d}: the dot interaction needs them equal")
    if top[-1][0].shape[0] != 1:
        problems.append(f"{top_keys[-1][0]}: {top[-1][0].shape[0]} outputs; the last top layer must have 1 "
                        "(the click probability)")
    found = [(f"t{i}", t.key) for i, t in enumerate(tables) if t is not None]
    aliases = {f"t{i}": (f"emb_l.{i}", str(i)) for i in range(len(tables))}
    named = resolve_tables(found, options, problems, aliases)
    if problems:
        raise CheckpointError(source, problems)

    dense = mlp_dense_weights({"bottom_mlp": (bottom_keys, bottom), "top_mlp": (top_keys, top)}, problems)
    if problems:
        raise CheckpointError(source, problems)

    imported = []
    for (name, pooling), t in zip(named, tables):
        assert t is not None
        spec_t = TableSpec(name=name, rows=t.spec.rows, dim=t.spec.dim, pooling=pooling)
        imported.append(ImportedTable(spec=spec_t, key=t.key, source=t.source, row_scale=t.row_scale,
                                      scale_key=t.scale_key, projection=t.projection, projection_key=t.projection_key))
        if t.row_scale is not None:
            notes.append(f"{t.scale_key}: learned pooling weights folded into the rows of {name}")
        if t.projection is not None:
            notes.append(f"{t.projection_key}: mixed-dimension projection folded into the rows of {name}")
    return build_plan(source, prefix, bottom, top, interaction, dense, imported, notes)


def import_dlrm(checkpoint: str | Path, out: str | Path, options: ImportOptions | None = None,
                progress: Progress | None = None) -> ImportPlan:
    """Import a facebookresearch/dlrm checkpoint into the model directory ``out``; returns what was imported."""
    plan = plan_dlrm(checkpoint, options)
    write_model_dir(out, plan, progress)
    return plan
