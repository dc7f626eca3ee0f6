"""Within one k-means cluster: rank the members, then find for each member
the most similar member ranked above it (SemDeDup, as NeMo Curator does it).

Ranking (`keep=`), with NeMo Curator's meaning:

- `hard`: farthest from the centroid first (outliers are kept), ties by id,
  both descending;
- `easy`: closest to the centroid first (prototypes are kept), ties by id,
  both ascending;
- `random`: a seeded hash of the id, so the order does not depend on the
  order rows arrive in.

A member whose similarity to some higher-ranked member is >= 1 - eps is a
duplicate; the top-ranked member of a group of near-duplicates is kept.

The similarity pass is a tiled matmul: for columns [s, e) of the ranked
matrix only rows [0, e) are multiplied, so memory is O(N * tile) and the work
is the upper triangle, never an N x N matrix.

A cluster larger than `max_cluster_size` is split with k-means into
sub-clusters that are compared separately (ranks still come from the
distance to the top-level centroid), recursively, so the pairwise pass stays
bounded however unbalanced the top-level clustering is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from udfs.schema import DEDUP_PAIRWISE_SCHEMA
from udfs.dedup.kmeans import KMeans, assign, set_threads
from udfs.dedup.vectors import pick_device, pick_dtype, take_vectors, vectors_from_arrow

KEEP = ("hard", "easy", "random")

# Levels of sub-k-means before an oversized (e.g. all-identical) group is
# compared as it is.
MAX_SPLIT_DEPTH = 3


def random_keys(ids: list[str], seed: int) -> np.ndarray:
    """A seeded, order-independent pseudo-random key per id."""
    key = int(seed).to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little")
                     for i in ids], dtype=np.uint64)


def rank_members(ids: list[str] | np.ndarray, centroid_dist: np.ndarray, keep: str = "hard",
                 seed: int = 0) -> np.ndarray:
    """Positions of the members, best-ranked (the one kept) first."""
    if keep not in KEEP:
        raise ValueError(f"unknown keep={keep!r}; choose one of {list(KEEP)}")
    ids_arr = np.asarray(ids, dtype=object).astype(str)
    if keep == "random":
        return np.lexsort((ids_arr, random_keys(list(ids_arr), seed)))
    # easy: (distance, id) ascending; hard: both descending, i.e. the reverse.
    order = np.lexsort((ids_arr, np.asarray(centroid_dist, dtype=np.float32)))
    return order[::-1].copy() if keep == "hard" else order


def max_sim_to_higher_ranked(x: torch.Tensor, tile: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranked unit rows `x`: (max cosine similarity to any earlier row,
    its position), as float32 / int64; (-inf, -1) for row 0.

    Columns [s, e) are multiplied with rows [0, e) only: O(N * tile) memory
    and the upper triangle's work."""
    n = len(x)
    best = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    where = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    for s in range(0, n, tile):
        e = min(n, s + tile)
        if e <= 1:
            continue
        sims = (x[:e] @ x[s:e].T).float()  # rows: candidates; columns: members s..e-1
        # Member s + j may only match rows ranked above it (row i < s + j).
        sims[s:e].masked_fill_(torch.ones((e - s, e - s), dtype=torch.bool, device=x.device).tril_(), -math.inf)
        vals, idx = sims.max(dim=0)
        best[s:e] = vals
        where[s:e] = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    return best, where


class SemDedupCluster:
    """The SemDeDup pass over one cluster, on numpy arrays.

    `SemDedupCluster(keep="hard", device="cuda")(x, ids, centroid_dist)`
    returns, per member (input order), the highest cosine similarity to a
    higher-ranked member (NaN for the top-ranked) and that member's position
    (-1). `x` holds unit rows."""

    def __init__(self, *, keep: str = "hard", seed: int = 0, tile: int = 1024, max_cluster_size: int = 50_000,
                 split_max_iter: int = 20, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> None:
        if keep not in KEEP:
            raise ValueError(f"unknown keep={keep!r}; choose one of {list(KEEP)}")
        if max_cluster_size < 2:
            raise ValueError(f"max_cluster_size must be >= 2, got {max_cluster_size}")
        self.keep = keep
        self.seed = int(seed)
        self.tile = int(tile)
        self.max_cluster_size = int(max_cluster_size)
        self.split_max_iter = int(split_max_iter)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        set_threads(threads)
        # Sub-clusters the split could not bring under max_cluster_size.
        self.oversized = 0
        self.splits = 0

    def __call__(self, x: np.ndarray, ids: list[str] | np.ndarray, centroid_dist: np.ndarray,
                 cluster: int = 0) -> tuple[np.ndarray, np.ndarray]:
        n = len(x)
        ids = np.asarray(ids, dtype=object)
        dist = np.asarray(centroid_dist, dtype=np.float32)
        max_sim = np.full(n, np.nan, dtype=np.float32)
        max_pos = np.full(n, -1, dtype=np.int64)
        for members in self.leaves(x, np.arange(n), cluster, depth=0):
            order = members[rank_members(ids[members], dist[members], self.keep, self.seed)]
            xt = torch.from_numpy(np.ascontiguousarray(x[order], dtype=np.float32)).to(self.device, self.dtype)
            sim, pos = (t.cpu().numpy() for t in max_sim_to_higher_ranked(xt, self.tile))
            found = pos >= 0
            max_sim[order[found]] = sim[found]
            max_pos[order[found]] = order[pos[found]]
        return max_sim, max_pos

    def leaves(self, x: np.ndarray, members: np.ndarray, cluster: int, depth: int) -> Iterator[np.ndarray]:
        """Sets of member positions compared together: the whole cluster, or
        its sub-clusters while it is over `max_cluster_size`."""
        if len(members) <= self.max_cluster_size:
            yield members
            return
        if depth >= MAX_SPLIT_DEPTH:
            self.oversized += 1
            yield members
            return
        # Aim for half-full sub-clusters, so most land under the limit at once.
        k = min(len(members), max(2, math.ceil(2 * len(members) / self.max_cluster_size)))
        sub = x[members]
        km = KMeans(n_clusters=k, max_iter=self.split_max_iter, seed=self.seed + 7919 * cluster + depth,
                    backend="torch", device=self.device, dtype=self.dtype)
        labels = assign(sub, km.fit(sub).centroids, device=self.device, dtype=self.dtype)[0]
        self.splits += 1
        if len(np.unique(labels)) == 1:  # k-means cannot cut it (identical rows)
            self.oversized += 1
            yield members
            return
        for label in np.unique(labels):
            yield from self.leaves(x, members[labels == label], cluster, depth + 1)


class ClusterPairwise:
    """Group UDF: the rows of one cluster (DEDUP_ASSIGN_SCHEMA columns) in,
    DEDUP_PAIRWISE_SCHEMA rows out.

    Vectors come from the group's `vector_column` when it has one, else from
    the Lance table they were assigned from (`table`, pinned at `version`),
    fetched by `_rowid`: the shuffle that forms groups then moves ids and
    distances, not vectors."""

    def __init__(self, *, table: str | None = None, version: int | None = None,
                 storage_options: dict[str, Any] | None = None, vector_column: str = "vector", dim: int,
                 keep: str = "hard", seed: int = 0, tile: int = 1024, max_cluster_size: int = 50_000,
                 split_max_iter: int = 20, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> None:
        self.table = table
        self.version = version
        self.storage_options = storage_options
        self.vector_column = vector_column
        self.dim = int(dim)
        self.core = SemDedupCluster(keep=keep, seed=seed, tile=tile, max_cluster_size=max_cluster_size,
                                    split_max_iter=split_max_iter, device=device, dtype=dtype, threads=threads)
        self._dataset = None

    def dataset(self):
        if self._dataset is None:
            import lance

            self._dataset = lance.dataset(self.table, version=self.version, storage_options=self.storage_options)
        return self._dataset

    def vectors(self, group: pa.Table) -> np.ndarray:
        if self.vector_column in group.column_names:
            column = group.column(self.vector_column)
        else:
            if self.table is None:
                raise ValueError(f"group has no {self.vector_column!r} column and no table to fetch it from")
            column = take_vectors(self.dataset(), group.column("_rowid").to_numpy(), self.vector_column)
        x, reason = vectors_from_arrow(column, self.dim)
        if len(x) != group.num_rows:
            bad = next(r for r in reason if r is not None)
            raise ValueError(f"cluster rows changed since assignment ({bad}): was the table modified mid-run?")
        return x

    def __call__(self, group: pa.Table) -> pa.Table:
        n = group.num_rows
        if n == 0:
            return DEDUP_PAIRWISE_SCHEMA.empty_table()
        cluster = int(group.column("cluster")[0].as_py())
        ids = np.asarray(group.column("id").to_pylist(), dtype=object)
        dist = group.column("centroid_dist").to_numpy(zero_copy_only=False).astype(np.float32)
        max_sim, max_pos = self.core(self.vectors(group), ids, dist, cluster)
        return pa.Table.from_arrays([
            group.column("_rowaddr").cast(pa.uint64()),
            group.column("_rowid").cast(pa.uint64()),
            pa.array(ids.tolist(), pa.string()),
            pa.array(np.full(n, cluster, np.int32)),
            pa.array(dist),
            pa.array(max_sim, mask=max_pos < 0),
            pa.array([ids[p] if p >= 0 else None for p in max_pos], pa.string()),
        ], schema=DEDUP_PAIRWISE_SCHEMA)
