"""Within one k-means cluster: rank the members, then find for each member
the most similar member ranked above it (SemDeDup, as NeMo Curator does it).

Ranking (`keep=`), with NeMo Curator's meaning:

- `hard`: farthest from the centroid first (outliers are kept), ties by id,
  both descending;
- `easy`: closest to the centroid first (prototypes are kept), ties by id,
  both ascending;
- `random`: a seeded hash of the id, so the order does not depend on the
  order rows arrive in.

In SemDeDup (`dedup.mode=semdedup`) a member whose similarity to some
higher-ranked member is >= 1 - eps is a duplicate. A cluster can also hold
boundary members of the clusters next to it (`primary` false): they are
compared with its own members, never with each other, and the pairs found at
or above a threshold come back as edges, which the task joins into
components (`dedup.mode=components`).

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
    best, where, _ = triangle_pairs(x, tile, None)
    return best, where


def triangle_pairs(x: torch.Tensor, tile: int, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor, Edges]:
    """`max_sim_to_higher_ranked`, plus every pair (j, i) with i < j (i ranked
    above) at cosine >= `threshold` (none when it is None)."""
    n = len(x)
    best = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    where = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    edges = Edges()
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
        if threshold is not None:
            rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
            edges.add(cols + s, rows, sims[rows, cols])
    return best, where, edges


def rect_pairs(q: torch.Tensor, q_rank: torch.Tensor, r: torch.Tensor, r_rank: torch.Tensor, threshold: float | None,
               tile: int = 1024) -> tuple[Best, Best, Edges]:
    """Every row of `q` against every row of `r` (two disjoint sets of unit
    rows ranked in one order: a smaller rank is ranked higher): each side's
    best higher-ranked partner on the other side, and the pairs (q index, r
    index) at cosine >= `threshold`. Tiles of `QUERY_TILE` x `tile`."""
    q_best, r_best, edges = Best(len(q), q.device), Best(len(r), r.device), Edges()
    for a in range(0, len(q), QUERY_TILE):
        qa = q[a : a + QUERY_TILE]
        rq = q_rank[a : a + QUERY_TILE, None]
        for s in range(0, len(r), tile):
            sims = (qa @ r[s : s + tile].T).float()
            above = r_rank[None, s : s + tile] < rq  # the r row ranks above the q row
            q_best.update(torch.where(above, sims, -math.inf), 1, a, s)
            r_best.update(torch.where(above, -math.inf, sims), 0, s, a)
            if threshold is not None:
                rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
                edges.add(rows + a, cols + s, sims[rows, cols])
    return q_best, r_best, edges


QUERY_TILE = 4096


class Best:
    """Running (max similarity, partner index) per row, -inf / -1 when none."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sim = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
        self.arg = torch.full((n,), -1, dtype=torch.int64, device=device)

    def update(self, sims: torch.Tensor, dim: int, start: int, partner_start: int) -> None:
        """Rows of this side lie along the other axis than `dim` of `sims`."""
        vals, idx = sims.max(dim=dim)
        mine = slice(start, start + len(vals))
        better = vals > self.sim[mine]
        self.sim[mine] = torch.where(better, vals, self.sim[mine])
        self.arg[mine] = torch.where(better, idx + partner_start, self.arg[mine])


class Edges:
    """Pairs (i, j, cosine) collected tile by tile."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, i: torch.Tensor, j: torch.Tensor, sim: torch.Tensor) -> None:
        if len(i):
            self.parts.append((i, j, sim))

    def numpy(self, i_map: np.ndarray | None = None, j_map: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, sim) as numpy, indices mapped through `i_map` / `j_map`."""
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        i, j, sim = (torch.cat(t).cpu().numpy() for t in zip(*self.parts))
        return (i if i_map is None else i_map[i]), (j if j_map is None else j_map[j]), sim.astype(np.float32)


def _merge(best_sim: np.ndarray, best_pos: np.ndarray, rows: np.ndarray, sim: np.ndarray,
           partner: np.ndarray) -> None:
    """Keep the better of the running and the new partner of each of `rows` (distinct)."""
    better = sim > best_sim[rows]
    best_sim[rows[better]] = sim[better]
    best_pos[rows[better]] = partner[better]


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
        every = np.ones(n, dtype=bool)
        max_sim, max_pos, _ = self.compare(x, ids, centroid_dist, every, every, cluster)
        return max_sim, max_pos

    def compare(self, x: np.ndarray, ids: list[str] | np.ndarray, centroid_dist: np.ndarray, primary: np.ndarray,
                new: np.ndarray, cluster: int = 0, threshold: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The members of one cluster: its own (`primary`) and boundary members
        from the clusters next to it; `new` ones were not compared before.

        Compared: new primaries with each other (the SemDeDup pass, split
        while over `max_cluster_size`), new primaries with every other member,
        and new boundary members with old primaries. Boundary members are
        never compared with each other here: they are where they belong.
        Returns per member its best higher-ranked partner (similarity, NaN
        for none; position, -1) and the pairs (i, j, cosine) at >= `threshold`."""
        n = len(x)
        ids = np.asarray(ids, dtype=object)
        dist = np.asarray(centroid_dist, dtype=np.float32)
        primary, new = np.asarray(primary, dtype=bool), np.asarray(new, dtype=bool)
        rank = np.empty(n, dtype=np.int64)
        rank[rank_members(ids, dist, self.keep, self.seed)] = np.arange(n)
        best_sim = np.full(n, -np.inf, dtype=np.float32)
        best_pos = np.full(n, -1, dtype=np.int64)
        edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        p_new = np.flatnonzero(primary & new)
        for members in self.leaves(x, p_new, cluster, depth=0):
            ranked = members[np.argsort(rank[members], kind="stable")]
            sim, pos, found = triangle_pairs(self._tensor(x[ranked]), self.tile, threshold)
            sim, pos = sim.cpu().numpy(), pos.cpu().numpy()
            hit = pos >= 0
            _merge(best_sim, best_pos, ranked[hit], sim[hit], ranked[pos[hit]])
            edges.append(found.numpy(ranked, ranked))
        s_new, p_old = np.flatnonzero(~primary & new), np.flatnonzero(primary & ~new)
        for left, right in ((p_new, np.flatnonzero(~(primary & new))), (s_new, p_old)):
            if len(left) == 0 or len(right) == 0:
                continue
            lb, rb, found = rect_pairs(self._tensor(x[left]), torch.from_numpy(rank[left]).to(self.device),
                                       self._tensor(x[right]), torch.from_numpy(rank[right]).to(self.device),
                                       threshold, self.tile)
            for side, other, b in ((left, right, lb), (right, left, rb)):
                arg = b.arg.cpu().numpy()
                hit = arg >= 0
                _merge(best_sim, best_pos, side[hit], b.sim.cpu().numpy()[hit], other[arg[hit]])
            edges.append(found.numpy(left, right))
        max_sim = np.where(best_pos >= 0, best_sim, np.nan).astype(np.float32)
        i, j, sim = (np.concatenate(parts) for parts in zip(*edges)) if edges else Edges().numpy()
        return max_sim, best_pos, (i, j, sim)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)

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
    DEDUP_PAIRWISE_SCHEMA rows out: one per new primary member, and one per
    other member that found a higher-ranked partner or a duplicate edge.

    Vectors come from the group's `vector_column` when it has one, else from
    the Lance table they were assigned from (`table`, pinned at `version`),
    fetched by `_rowid`: the shuffle that forms groups then moves ids and
    distances, not vectors. `edge_sim`: pairs at or above it are returned as
    edges (None: none, the SemDeDup mode)."""

    def __init__(self, *, table: str | None = None, version: int | None = None,
                 storage_options: dict[str, Any] | None = None, vector_column: str, dim: int, keep: str, seed: int,
                 tile: int, max_cluster_size: int, split_max_iter: int, device: str, dtype: str,
                 edge_sim: float | None, threads: int | None = None) -> None:
        self.table = table
        self.version = version
        self.storage_options = storage_options
        self.vector_column = vector_column
        self.dim = int(dim)
        self.edge_sim = None if edge_sim is None else float(edge_sim)
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
        if group.num_rows == 0:
            return DEDUP_PAIRWISE_SCHEMA.empty_table()
        return self.compare_group(group, self.vectors(group))

    def compare_group(self, group: pa.Table, x: np.ndarray) -> pa.Table:
        """`__call__` on a group whose unit vectors `x` (one per row) are at hand."""
        n = group.num_rows
        cluster = int(group.column("cluster")[0].as_py())
        ids = np.asarray(group.column("id").to_pylist(), dtype=object)
        dist = group.column("centroid_dist").to_numpy(zero_copy_only=False).astype(np.float32)
        primary = group.column("primary").to_numpy(zero_copy_only=False).astype(bool)
        new = group.column("new").to_numpy(zero_copy_only=False).astype(bool)
        max_sim, max_pos, (ei, ej, es) = self.core.compare(x, ids, dist, primary, new, cluster, self.edge_sim)
        rowid = group.column("_rowid").to_numpy().astype(np.uint64)
        has_edge = np.bincount(ei, minlength=n) > 0
        out = np.flatnonzero((primary & new) | (max_pos >= 0) | has_edge)
        # Each edge listed once, under its first member (every such member is in `out`).
        take = np.argsort(ei, kind="stable")
        counts = np.bincount(ei, minlength=n)[out]
        offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
        pos = max_pos[out]
        out_ids = ids[out]
        return pa.Table.from_arrays([
            group.column("_rowaddr").take(out).cast(pa.uint64()),
            pa.array(rowid[out]),
            pa.array(out_ids.tolist(), pa.string()),
            pa.array(np.full(len(out), cluster, np.int32)),
            pa.array(dist[out]),
            pa.array(primary[out]),
            pa.array(max_sim[out], mask=pos < 0),
            pa.array([ids[p] if p >= 0 else None for p in pos], pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(rowid[ej[take]], pa.uint64())),
            pa.ListArray.from_arrays(offsets, pa.array(es[take], pa.float32())),
        ], schema=DEDUP_PAIRWISE_SCHEMA)
