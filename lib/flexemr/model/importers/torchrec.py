"""Import a ``torchrec.models.dlrm.DLRM`` state_dict as a flexemr model directory.

Checkpoint keys (what ``DLRM.state_dict()`` holds; a ``DLRMTrain`` ``model.``,
DDP ``module.``, DMP ``_dmp_wrapped_module.`` or torch.compile ``_orig_mod.``
prefix is stripped)::

    sparse_arch.embedding_bag_collection.embedding_bags.NAME.weight   [rows, D]    -> tables/NAME.npy
    dense_arch.model._mlp.I._linear.{weight,bias}                                  -> bottom_mlp.I.*
    over_arch.model.0._mlp.I._linear.{weight,bias}                                 -> top_mlp.I.*
    over_arch.model.1.{weight,bias}                                   [1, H]       -> top_mlp.LAST.*

The forwards agree layer for layer (ReLU after every DenseArch layer and every
OverArch MLP layer, none after the final Linear) except in two places:

* TorchRec returns logits; our score is their sigmoid (``torch.sigmoid(dlrm(...))``).
* ``InteractionArch`` stacks ``[dense, sparse_0 .. sparse_{F-1}]`` and keeps the
  STRICTLY UPPER triangle in row-major order (``torch.triu_indices(F+1, F+1, 1)``:
  (0,1), (0,2), .., (0,F), (1,2), ..), while ours keeps the strictly lower one
  ((1,0), (2,0), (2,1), (3,0), ..).  The dot products are the same numbers in
  another order, so the columns of the first over-arch layer that read them are
  permuted (:func:`interaction_columns`), never copied as they are.

The state_dict does not say which features a table serves: each table is taken
to serve one feature, in the order of the EmbeddingBagCollection (which is the
key order), and keeps its table name unless ``--name-map`` renames it (clients
then send that name).  A table shared by several features changes the over-arch
width; that is detected and refused, as are DLRM_DCN and DLRM_Projection, whose
interactions a model directory cannot express.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    solve_pairs_width,
    strip_prefix,
    write_model_dir,
)
from flexemr.model.spec import TableSpec
from flexemr.types import Interaction

__all__ = ["plan_torchrec", "import_torchrec", "interaction_columns"]

EBC = "sparse_arch.embedding_bag_collection.embedding_bags."
_WRAPPERS = ("_dmp_wrapped_module.", "module.", "model.", "_orig_mod.")

# Variants of torchrec.models.dlrm recognised by the keys of their interaction.
_VARIANTS = (
    ("inter_arch.crossnet.", "DLRM_DCN",
     "its interaction is a DCN-v2 low-rank cross network (inter_arch.crossnet.*)"),
    ("inter_arch.interaction_branch1.", "DLRM_Projection",
     "its interaction multiplies two learned projections (inter_arch.interaction_branch1/2.*)"),
)


def interaction_columns(n_sparse: int) -> np.ndarray:
    """For each of our pairwise dot-product columns, the TorchRec column holding the same product.

    Ours: pairs (i, j), i > j, in ``np.tril_indices(F+1, -1)`` order.
    TorchRec: pairs (a, b), a < b, in ``torch.triu_indices(F+1, F+1, 1)`` order.
    Index 0 is the dense (bottom MLP) vector in both.  ``ours[k] = theirs[result[k]]``.
    """
    n = n_sparse + 1
    ta, tb = np.triu_indices(n, 1)          # numpy's triu order == torch.triu_indices' order
    position = np.full((n, n), -1, dtype=np.int64)
    position[ta, tb] = np.arange(len(ta))
    li, lj = np.tril_indices(n, -1)
    return position[lj, li]                 # the product <z_i, z_j> is theirs at (j, i)


def _unwrap(ckpt: Any, source: str) -> Mapping[str, Any]:
    if isinstance(ckpt, Mapping) and not any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(ckpt.get(key), Mapping):
                return ckpt[key]
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(source, [f"holds a {type(ckpt).__name__}, expected a state_dict of "
                                       "torchrec.models.dlrm.DLRM (a dict of tensors)"])
    return ckpt


def _refuse_variants(state: Mapping[str, Any], source: str) -> None:
    for prefix, name, why in _VARIANTS:
        key = next((k for k in state if k.startswith(prefix)), None)
        if key is not None:
            raise UnsupportedCheckpoint(source, [
                f"{name} checkpoints are not supported: {why}, e.g. key {key}; a flexemr model directory "
                "has only the DLRM dot-product or concatenation interaction (export a torchrec.models.dlrm.DLRM)"])
    if not any(k.startswith(EBC) for k in state):
        if any(k.startswith(("emb_l.", "bot_l.", "top_l.")) for k in state):
            raise CheckpointError(source, ["keys emb_l.* / bot_l.* / top_l.* are a facebookresearch/dlrm "
                                           "checkpoint: import it with --from dlrm"])
        sample = ", ".join(list(state)[:5]) or "none"
        raise CheckpointError(source, [f"{EBC}NAME.weight: missing: not a torchrec.models.dlrm.DLRM state_dict "
                                       f"(keys: {sample}{', ...' if len(state) > 5 else ''})"])


def plan_torchrec(checkpoint: str | Path, options: ImportOptions | None = None) -> ImportPlan:
    """Read and check a TorchRec DLRM checkpoint; raise CheckpointError naming every bad key."""
    options = options or ImportOptions()
    source = str(checkpoint)
    state, prefix = strip_prefix(_unwrap(load_checkpoint(checkpoint), source), _WRAPPERS)
    _refuse_variants(state, source)
    problems: list[str] = []
    if options.interaction not in (None, Interaction.DOT):
        problems.append(f"--interaction {options.interaction.value}: torchrec's DLRM always uses the dot interaction")

    # -- tables, in EmbeddingBagCollection order (= key order)
    table_keys = [(k[len(EBC):-len(".weight")], k) for k in state if k.startswith(EBC) and k.endswith(".weight")]
    weights: list[torch.Tensor | None] = [float_tensor(state, k, (None, None), problems, "embedding table")
                                          for _, k in table_keys]

    # -- bottom (DenseArch) and top (OverArch) MLPs
    bottom_idx = numbered(state, r"dense_arch\.model\._mlp\.(\d+)\._linear\.weight")
    over_idx = numbered(state, r"over_arch\.model\.0\._mlp\.(\d+)\._linear\.weight")
    for what, idx, pattern in (("dense_arch", bottom_idx, "dense_arch.model._mlp.{}._linear.weight"),
                               ("over_arch", over_idx, "over_arch.model.0._mlp.{}._linear.weight")):
        if not idx:
            problems.append(f"{pattern.format(0)}: missing (the first {what} layer)")
        for i in range(max(idx, default=-1) + 1):
            if i not in idx:
                problems.append(f"{pattern.format(i)}: missing ({what} has layers up to {max(idx)})")
    bottom_keys = [(f"dense_arch.model._mlp.{i}._linear.weight", f"dense_arch.model._mlp.{i}._linear.bias")
                   for i in sorted(bottom_idx)]
    over_keys = [(f"over_arch.model.0._mlp.{i}._linear.weight", f"over_arch.model.0._mlp.{i}._linear.bias")
                 for i in sorted(over_idx)] + [("over_arch.model.1.weight", "over_arch.model.1.bias")]
    bottom = linear_chain(state, bottom_keys, None, problems, "dense_arch")
    over = linear_chain(state, over_keys, None, problems, "over_arch")

    used = {k for _, k in table_keys} | {k for pair in bottom_keys + over_keys for k in pair}
    for k in state:
        if k not in used:
            problems.append(f"{prefix}{k}: unexpected key: not part of torchrec.models.dlrm.DLRM "
                            "(an unsupported variant or a modified model)")
    if problems or bottom is None or over is None or any(w is None for w in weights):
        raise CheckpointError(source, problems)

    # -- shapes that tie the parts together
    d = int(bottom[-1][0].shape[0])
    dense_in = int(bottom[0][0].shape[1])
    if options.dense_features is not None and options.dense_features != dense_in:
        problems.append(f"dense_arch.model._mlp.0._linear.weight: reads {dense_in} dense features, "
                        f"but --dense-features says {options.dense_features}")
    for (name, key), w in zip(table_keys, weights):
        assert w is not None
        if w.shape[1] != d:
            problems.append(f"{key}: embedding dim {w.shape[1]}, but the last dense_arch layer "
                            f"(dense_arch.model._mlp.{max(bottom_idx)}._linear.weight) outputs {d}: DLRM needs them equal")
    n_tables = len(table_keys)
    top_in = int(over[0][0].shape[1])
    if top_in != d + n_tables + pairs(n_tables):
        f = solve_pairs_width(top_in - d) if top_in > d else None
        why = (f"{f} sparse features: some table serves several features (EmbeddingBagConfig.feature_names "
               "with more than one name), which a flexemr model directory (one feature per table) cannot express"
               if f is not None and f > n_tables else "no whole number of features")
        problems.append(f"over_arch.model.0._mlp.0._linear.weight: reads {top_in} inputs, but {n_tables} tables of "
                        f"dim {d} give {d + n_tables + pairs(n_tables)} (D + F + F*(F-1)/2); its width implies {why}")
    last_w = over[-1][0]
    if last_w.shape[0] != 1:
        problems.append(f"over_arch.model.1.weight: {last_w.shape[0]} outputs; flexemr serves one score per "
                        "sample (the last over-arch layer must have 1 output)")
    tables = resolve_tables(table_keys, options, problems)
    if problems:
        raise CheckpointError(source, problems)

    # -- our dense.pt: the first over-arch layer's interaction columns in our order
    cols = interaction_columns(n_tables)
    w0, b0 = over[0]
    w0_ours = torch.cat([w0[:, :d], w0[:, d:][:, torch.from_numpy(cols)]], dim=1)
    dense = mlp_dense_weights({"bottom_mlp": (bottom_keys, bottom), "top_mlp": (over_keys, [(w0_ours, b0), *over[1:]])},
                              problems)
    if problems:
        raise CheckpointError(source, problems)

    imported = []
    for (name, pooling), (_, key), w in zip(tables, table_keys, weights):
        assert w is not None
        t = TableSpec(name=name, rows=int(w.shape[0]), dim=int(w.shape[1]), pooling=pooling)
        imported.append(ImportedTable(spec=t, key=key, source=w))
    notes = [f"over_arch.model.0._mlp.0._linear.weight: {pairs(n_tables + 1)} interaction columns reordered "
             "from torchrec's upper-triangle order to flexemr's lower-triangle order",
             "score = sigmoid(torchrec logit)"]
    return build_plan(source, prefix, bottom, over, Interaction.DOT, dense, imported, notes)


def import_torchrec(checkpoint: str | Path, out: str | Path, options: ImportOptions | None = None,
                    progress: Progress | None = None) -> ImportPlan:
    """Import a TorchRec DLRM state_dict into the model directory ``out``; returns what was imported."""
    plan = plan_torchrec(checkpoint, options)
    write_model_dir(out, plan, progress)
    return plan
