"""From the pairwise rows to decisions: one result row per considered row,
the duplicate edges, and at a given eps which rows are duplicates and which
group each belongs to.

- `components` (the default mode): the edges at cosine >= 1 - eps are joined
  into connected components (A ~ B and B ~ C put A, B and C in one group,
  whichever clusters they were compared in), and the keep rule keeps exactly
  the best-ranked member of each.
- `semdedup`: NeMo Curator's rule, a row is a duplicate when its best
  higher-ranked partner is at >= 1 - eps; its group is the tree those
  partner links form.

The ranking is the one `dedup.keep` gives inside a cluster (`rank_members`),
applied to every considered row at once: it is a total order, so it agrees
with every cluster's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from udfs.dedup.pairwise import rank_members
from udfs.schema import DEDUP_EDGE_SCHEMA, DEDUP_RESULT_SCHEMA

MODES = ("components", "semdedup")


@dataclass
class Decision:
    """What eps decides, per result row."""

    duplicate: np.ndarray  # bool
    group: np.ndarray  # int64 smallest `_rowid` of the group, -1 for a row with no near-duplicate

    def group_array(self) -> pa.Array:
        return pa.array(self.group, pa.int64(), mask=self.group < 0)


def merge_pairwise(rows: pa.Table, previous: pa.Table | None = None) -> pa.Table:
    """DEDUP_RESULT_SCHEMA rows, sorted by `_rowaddr`: one per row that was a
    primary member somewhere (or in `previous`, the results of an earlier
    run), with its best higher-ranked partner over all its appearances."""
    base_cols = ["_rowaddr", "_rowid", "id", "cluster", "centroid_dist"]
    best_cols = ["_rowid", "max_sim", "max_id"]
    prim = rows.filter(rows.column("primary"))
    parts = [prim.select(base_cols)]
    best = [rows.select(best_cols)]
    if previous is not None and previous.num_rows:
        parts.insert(0, previous.select(base_cols))
        best.insert(0, previous.select(best_cols))
    base = pa.concat_tables(parts)
    rowid = base.column("_rowid").to_numpy()
    _, first = np.unique(rowid, return_index=True)
    base = base.take(pa.array(first))  # sorted by _rowid
    cand = pa.concat_tables(best)
    sim = cand.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
    crow = cand.column("_rowid").to_numpy()
    order = np.lexsort((np.nan_to_num(sim, nan=-np.inf), crow))
    last = np.r_[crow[order][1:] != crow[order][:-1], True]
    pick = order[last]  # per row id, its best candidate
    pos = np.searchsorted(base.column("_rowid").to_numpy(), crow[pick])
    max_sim = np.full(base.num_rows, np.nan, dtype=np.float32)
    max_sim[pos] = sim[pick]
    idx = np.full(base.num_rows, -1, dtype=np.int64)
    idx[pos] = pick
    max_id = cand.column("max_id").take(pa.array(idx, mask=idx < 0))
    found = ~np.isnan(max_sim)
    out = pa.Table.from_arrays([
        base.column("_rowaddr"), base.column("_rowid"), base.column("id"), base.column("cluster"),
        base.column("centroid_dist"), pa.array(max_sim, mask=~found), max_id,
    ], schema=DEDUP_RESULT_SCHEMA)
    return out.sort_by("_rowaddr")


def pairwise_edges(rows: pa.Table, previous: pa.Table | None = None) -> pa.Table:
    """The edges listed in the pairwise rows (and `previous` ones), each pair
    once as (smaller `_rowid`, larger, cosine)."""
    counts = pc.list_value_length(rows.column("nbr_rowid")).fill_null(0).to_numpy(zero_copy_only=False)
    a = np.repeat(rows.column("_rowid").to_numpy(), counts)
    b = pc.list_flatten(rows.column("nbr_rowid")).to_numpy(zero_copy_only=False).astype(np.uint64)
    sim = pc.list_flatten(rows.column("nbr_sim")).to_numpy(zero_copy_only=False).astype(np.float32)
    if previous is not None and previous.num_rows:
        a = np.r_[previous.column("a").to_numpy(), a].astype(np.uint64)
        b = np.r_[previous.column("b").to_numpy(), b].astype(np.uint64)
        sim = np.r_[previous.column("sim").to_numpy(), sim].astype(np.float32)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-sim, hi, lo))
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    return pa.Table.from_arrays([pa.array(lo[first]), pa.array(hi[first]), pa.array(sim[first])],
                                schema=DEDUP_EDGE_SCHEMA)


def global_rank(results: pa.Table, keep: str, seed: int) -> np.ndarray:
    """Rank of every result row (0 = the one kept first) under `keep`."""
    ids = results.column("id").to_numpy(zero_copy_only=False)
    dist = results.column("centroid_dist").to_numpy(zero_copy_only=False).astype(np.float32)
    rank = np.empty(results.num_rows, dtype=np.int64)
    rank[rank_members(ids, dist, keep, seed)] = np.arange(results.num_rows)
    return rank


def decide(mode: str, results: pa.Table, edges: pa.Table | None, rank: np.ndarray | None, eps: float) -> Decision:
    if mode == "components":
        return components_at(results, edges, rank, eps)
    if mode == "semdedup":
        return semdedup_at(results, eps)
    raise ValueError(f"unknown dedup.mode={mode!r}; choose one of {list(MODES)}")


def components_at(results: pa.Table, edges: pa.Table, rank: np.ndarray, eps: float) -> Decision:
    """Exactly one kept per connected component of the edges at >= 1 - eps."""
    rowid = results.column("_rowid").to_numpy()
    keep = edges.column("sim").to_numpy() >= np.float32(1.0 - eps)
    a = _positions(rowid, edges.column("a").to_numpy()[keep])
    b = _positions(rowid, edges.column("b").to_numpy()[keep])
    return _groups(rowid, a, b, rank)


def semdedup_at(results: pa.Table, eps: float) -> Decision:
    """SemDeDup's rule; groups are the trees of the partner links at eps."""
    sim = results.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
    duplicate = np.nan_to_num(sim, nan=-np.inf) >= 1.0 - eps
    partner = pc.index_in(results.column("max_id"), value_set=results.column("id")).to_numpy(zero_copy_only=False)
    a = np.flatnonzero(duplicate)
    b = partner[a].astype(np.int64)
    rowid = results.column("_rowid").to_numpy()
    group = _groups(rowid, a, b, None).group
    return Decision(duplicate=duplicate, group=group)


def _positions(sorted_or_not: np.ndarray, ids: np.ndarray) -> np.ndarray:
    order = np.argsort(sorted_or_not, kind="stable")
    at = np.searchsorted(sorted_or_not, ids, sorter=order)
    pos = order[np.minimum(at, len(order) - 1)]
    if len(ids) and not (sorted_or_not[pos] == ids).all():
        raise ValueError("a duplicate edge names a row that is not among the results")
    return pos


def _groups(rowid: np.ndarray, a: np.ndarray, b: np.ndarray, rank: np.ndarray | None) -> Decision:
    n = len(rowid)
    if n == 0:
        return Decision(np.zeros(0, bool), np.zeros(0, np.int64))
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    size = np.bincount(label)
    smallest = np.full(len(size), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, label, rowid.astype(np.int64))
    group = np.where(size[label] > 1, smallest[label], -1)
    if rank is None:
        return Decision(np.zeros(n, bool), group)
    best = np.full(len(size), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, label, rank)
    return Decision(duplicate=rank != best[label], group=group)
