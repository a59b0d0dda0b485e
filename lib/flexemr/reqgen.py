"""Synthetic inference requests with recommendation-like skew, for tests, the demo and benchmarks.

``RequestGenerator(spec, ids_per_bag).batch(B)`` returns ``(dense, sparse)`` in
the client layout (DESIGN.md): dense float32 [B, dense_features], sparse
``{table: (values int64 [N], lengths int32 [B])}`` in table order.

What the traffic looks like, and why:

* **Zipf-skewed ids.** The popularity rank r of an id follows a bounded Zipf law,
  P(r) ∝ (r + 1)^-s over [0, rows), as production embedding accesses roughly do
  (that skew is what makes a ranker-side cache pay).  Sampling is vectorised
  sampling from one uniform draw per id: the 1,024 hottest ranks use the exact
  discrete law (Walker's alias table, O(1) per draw, cache-resident); the tail
  uses the closed-form inverse CDF of the continuous law over [r + ½, r + 1½),
  whose error against the discrete law (relative ~ s(s+1)/24r², < 1e-6 past
  rank 1,024) is far below sampling noise.  No per-table CDF of ``rows``
  entries is kept, so 4M-row tables cost nothing to set up.
* **Hot rows are scattered.** Ranks map to ids through a per-table random
  permutation (int32, 4 bytes per row), so the hot rows spread over every range
  shard instead of piling onto the server that holds the low ids.
* **Bag lengths vary** (Poisson with mean ``ids_per_bag``, or fixed), and a bag
  is empty with probability ``empty_bag_prob``: servers and pooling must cope.
* **The hot set drifts.** Every ``drift_every`` batches (0: never), a random
  ``drift_fraction`` of the ranks has its ids shuffled among itself, so about
  that fraction of the hot ids is replaced by previously cold ones: an adaptive
  cache must keep up.

Same arguments and seed, same batches.

Saved request files (``save_requests`` / ``load_requests``) are ``.npz``
archives, uncompressed, readable with ``np.load(path, allow_pickle=False)``::

    meta                   0-d str array: JSON {"format": "flexemr.requests", "version": 1,
                           "batches": [[table names of batch 0], ...], ...caller's meta}
    b{i}.dense             float32 [B_i, dense_features]      i = 0, 1, ...
    b{i}.{table}.values    int64 [N]
    b{i}.{table}.lengths   int32 [B_i]

Table names may contain dots, so readers take them from ``meta``, not by
splitting keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from flexemr.model.spec import ModelSpec

__all__ = ["RequestGenerator", "ZipfSampler", "Batch", "save_requests", "load_requests", "requests_meta"]

Sparse = dict[str, tuple[np.ndarray, np.ndarray]]
Batch = tuple[np.ndarray, Sparse]

FORMAT = "flexemr.requests"
VERSION = 1


class ZipfSampler:
    """Bounded Zipf over ranks [0, n): P(r) ∝ (r + 1)^-s, sampled in O(1) per draw, O(HEAD) memory."""

    HEAD = 1024

    def __init__(self, n: int, s: float) -> None:
        if n < 1:
            raise ValueError(f"ZipfSampler: n must be positive, got {n}")
        if s < 0:
            raise ValueError(f"ZipfSampler: exponent must be >= 0, got {s}")
        self.n, self.s = int(n), float(s)
        k = min(self.n, self.HEAD)
        w = np.arange(1, k + 1, dtype=np.float64) ** -self.s
        self._head_mass = float(w.sum())
        self._prob, self._alias = _alias_table(w / self._head_mass)
        self._k = k
        # Tail ranks k+1..n (1-based) as the continuous law on [k + 1/2, n + 1/2).
        self._g0 = self._g(k + 0.5)
        self._tail = float(self._g(self.n + 0.5) - self._g0) if self.n > k else 0.0
        self.p_head = self._head_mass / (self._head_mass + self._tail)

    def _g(self, x: float | np.ndarray):
        """Antiderivative of x^-s."""
        a = 1.0 - self.s
        return np.log(x) if abs(a) < 1e-12 else np.power(x, a) / a

    def _g_inv(self, y: np.ndarray) -> np.ndarray:
        a = 1.0 - self.s
        return np.exp(y) if abs(a) < 1e-12 else np.power(a * y, 1.0 / a)

    def _head(self, x: np.ndarray) -> np.ndarray:
        """Alias-table draw from uniforms x in [0, 1): the integer part picks a column, the fraction decides."""
        xk = x * self._k
        col = np.minimum(xk.astype(np.int64), self._k - 1)
        return np.where(xk - col < self._prob[col], col, self._alias[col])

    def sample(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """``m`` ranks (int64, 0 = hottest)."""
        u = rng.random(m)
        if self._tail <= 0.0:
            return self._head(u)
        out = np.empty(m, dtype=np.int64)
        head = u < self.p_head
        hi = np.flatnonzero(head)
        out[hi] = self._head(u[hi] / self.p_head)
        ti = np.flatnonzero(~head)
        ut = (u[ti] - self.p_head) / (1.0 - self.p_head)
        x = self._g_inv(self._g0 + ut * self._tail)
        r1 = np.clip(np.floor(x + 0.5), self._k + 1, self.n)    # 1-based rank in the tail
        out[ti] = r1.astype(np.int64) - 1
        return out

    def pmf(self, ranks: np.ndarray) -> np.ndarray:
        """Exact probability of each (0-based) rank under the discrete law the sampler approximates."""
        r = np.asarray(ranks, dtype=np.float64) + 1.0
        return r ** -self.s / (self._head_mass + self._tail)


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: column i keeps i with probability prob[i], else gives alias[i].

    A Python loop, but over the HEAD ranks only and once per sampler.
    """
    k = len(p)
    scaled = p * k
    prob = np.ones(k, dtype=np.float64)
    alias = np.arange(k, dtype=np.int64)
    small = [i for i in range(k) if scaled[i] < 1.0]
    large = [i for i in range(k) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


class RequestGenerator:
    """Batches of requests for ``spec`` (see the module docstring for the traffic model)."""

    def __init__(
        self,
        spec: ModelSpec,
        ids_per_bag: int | Mapping[str, int],
        zipf_exponent: float = 1.05,
        seed: int = 0,
        empty_bag_prob: float = 0.02,
        length_dist: str = "poisson",
        drift_every: int = 0,
        drift_fraction: float = 0.1,
    ) -> None:
        names = spec.table_names
        if isinstance(ids_per_bag, Mapping):
            unknown = sorted(set(ids_per_bag) - set(names))
            missing = [n for n in names if n not in ids_per_bag]
            if unknown or missing:
                raise ValueError(f"ids_per_bag: unknown tables {unknown}, missing tables {missing}")
            self.ids_per_bag = {n: int(ids_per_bag[n]) for n in names}
        else:
            self.ids_per_bag = {n: int(ids_per_bag) for n in names}
        if any(v < 0 for v in self.ids_per_bag.values()):
            raise ValueError(f"ids_per_bag must be >= 0, got {self.ids_per_bag}")
        if length_dist not in ("poisson", "fixed"):
            raise ValueError(f"length_dist must be 'poisson' or 'fixed', got {length_dist!r}")
        if not 0.0 <= empty_bag_prob <= 1.0:
            raise ValueError(f"empty_bag_prob must be in [0, 1], got {empty_bag_prob}")
        if not 0.0 <= drift_fraction <= 1.0:
            raise ValueError(f"drift_fraction must be in [0, 1], got {drift_fraction}")
        if drift_every < 0:
            raise ValueError(f"drift_every must be >= 0, got {drift_every}")
        self.spec = spec
        self.zipf_exponent = float(zipf_exponent)
        self.empty_bag_prob = float(empty_bag_prob)
        self.length_dist = length_dist
        self.drift_every = int(drift_every)
        self.drift_fraction = float(drift_fraction)
        self.batches_made = 0
        # Separate streams: drifting the hot set must not shift the request stream's draws.
        perm_seq, req_seq = np.random.SeedSequence(seed).spawn(2)
        self._perm_rng = np.random.default_rng(perm_seq)
        self._rng = np.random.default_rng(req_seq)
        samplers: dict[tuple[int, float], ZipfSampler] = {}
        self._zipf: dict[str, ZipfSampler] = {}
        self._perm: dict[str, np.ndarray] = {}
        for t in spec.tables:
            key = (t.rows, self.zipf_exponent)
            if key not in samplers:
                samplers[key] = ZipfSampler(t.rows, self.zipf_exponent)
            self._zipf[t.name] = samplers[key]
            perm = np.arange(t.rows, dtype=np.int32 if t.rows < 2**31 else np.int64)
            self._perm_rng.shuffle(perm)
            self._perm[t.name] = perm

    def hot_ids(self, table: str, k: int) -> np.ndarray:
        """The ids of the ``k`` most popular ranks of ``table`` right now (hottest first)."""
        return self._perm[table][:k].astype(np.int64)

    def drift(self) -> None:
        """Shuffle the ids of a random ``drift_fraction`` of ranks among themselves, in every table.

        A shuffle, not a shift by one: the chosen ranks are in rank order, so a
        shift would hand each hot id to the next chosen (still hot) rank and the
        hot set would hardly change.  Shuffled, a chosen hot rank almost surely
        receives a cold id, since nearly all chosen ranks are cold.
        """
        for perm in self._perm.values():
            idx = np.flatnonzero(self._perm_rng.random(len(perm)) < self.drift_fraction)
            if len(idx) > 1:
                perm[idx] = perm[idx[self._perm_rng.permutation(len(idx))]]

    def _lengths(self, table: str, b: int) -> np.ndarray:
        mean = self.ids_per_bag[table]
        if self.length_dist == "poisson":
            lengths = self._rng.poisson(mean, b).astype(np.int32)
        else:
            lengths = np.full(b, mean, dtype=np.int32)
        if self.empty_bag_prob > 0:
            lengths[self._rng.random(b) < self.empty_bag_prob] = 0
        return lengths

    def batch(self, b: int) -> Batch:
        """One request of ``b`` samples: (dense float32 [b, F], {table: (values int64, lengths int32)})."""
        if b < 1:
            raise ValueError(f"batch size must be positive, got {b}")
        if self.drift_every and self.batches_made and self.batches_made % self.drift_every == 0:
            self.drift()
        self.batches_made += 1
        dense = self._rng.standard_normal((b, self.spec.dense_features), dtype=np.float32)
        sparse: Sparse = {}
        for t in self.spec.tables:
            lengths = self._lengths(t.name, b)
            ranks = self._zipf[t.name].sample(self._rng, int(lengths.sum(dtype=np.int64)))
            sparse[t.name] = (self._perm[t.name][ranks].astype(np.int64), lengths)
        return dense, sparse


# --------------------------------------------------------------------------- request files

def save_requests(path: str | Path, batches: Iterable[Batch], meta: Mapping[str, object] | None = None) -> Path:
    """Write batches to an ``.npz`` (layout in the module docstring); returns the path as given."""
    arrays: dict[str, np.ndarray] = {}
    names: list[list[str]] = []
    for i, (dense, sparse) in enumerate(batches):
        arrays[f"b{i}.dense"] = np.ascontiguousarray(dense, dtype=np.float32)
        names.append(list(sparse))
        for name, (values, lengths) in sparse.items():
            arrays[f"b{i}.{name}.values"] = np.ascontiguousarray(values, dtype=np.int64)
            arrays[f"b{i}.{name}.lengths"] = np.ascontiguousarray(lengths, dtype=np.int32)
    doc = {**(meta or {}), "format": FORMAT, "version": VERSION, "batches": names}
    arrays["meta"] = np.array(json.dumps(doc))
    path = Path(path)
    # Through a file object: np.savez on a name would append ".npz" behind the caller's back.
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def requests_meta(path: str | Path) -> dict:
    """The ``meta`` document of a request file (format, version, tables per batch, caller's keys)."""
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a flexemr request file (no 'meta')")
        doc = json.loads(str(z["meta"]))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: version {doc.get('version')!r} is not supported (expected {VERSION})")
    return doc


def load_requests(path: str | Path) -> list[Batch]:
    """Read the batches written by :func:`save_requests`."""
    doc = requests_meta(path)
    out: list[Batch] = []
    with np.load(path, allow_pickle=False) as z:
        for i, names in enumerate(doc["batches"]):
            dense = z[f"b{i}.dense"]
            sparse: Sparse = {}
            for name in names:
                values, lengths = z[f"b{i}.{name}.values"], z[f"b{i}.{name}.lengths"]
                if int(lengths.sum(dtype=np.int64)) != len(values) or len(lengths) != len(dense):
                    raise ValueError(f"{path}: b{i}.{name}: {len(lengths)} lengths summing to {int(lengths.sum())} "
                                     f"do not fit {len(values)} values and batch {len(dense)}")
                sparse[name] = (values, lengths)
            out.append((dense, sparse))
    return out
