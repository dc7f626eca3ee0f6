"""The duplicates panel: what an eps would remove, from what task=dedup
stored (nothing is recomputed, no vector is read).

Which rule counts depends on the mode dedup ran with (OUT/dedup/summary.json):

- `components` (dedup's default): the duplicate edges of OUT/dedup/edges.parquet
  at cosine >= 1 - eps are joined into connected components and exactly the
  best-ranked member of each is kept (`engine.dedup.groups.components_at`).
  The components of the edges above any threshold are those of the maximum
  spanning forest's edges above it, and walking that forest's edges from the
  most similar down (Kruskal) each one merges two groups and removes exactly
  one row: the worse-ranked of the two groups' kept members. So the rows
  removed at eps are those of the forest edges at >= 1 - eps, in that order:
  any eps is a binary search over a precomputed list.
- `semdedup`, or a table whose dedup files are not beside it: NeMo's rule, a
  row is removed when its best higher-ranked partner (`dedup_max_id`) is at
  `dedup_max_sim` >= 1 - eps; the rows sorted by similarity once make any eps
  a binary search too.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.serve.columns import TableColumns
from engine.store import outputs
from udfs.uris import arrow_fs, scheme_of

log = logging.getLogger(__name__)

REQUIRED = ("dedup_max_sim", "dedup_max_id")
HISTOGRAM_BINS = 50
MARGIN = 4


def missing_reason(cols: TableColumns) -> str | None:
    """Why there is no duplicates page (None: there is one)."""
    lacking = [c for c in REQUIRED if not cols.has(c)]
    if lacking:
        return (f"the table has no {', '.join(lacking)} column{'s' if len(lacking) > 1 else ''}: "
                "run `python -m engine task=dedup output=OUT` first")
    return None


@dataclass
class DedupRun:
    """What the last task=dedup on this output left in OUT/dedup/."""

    summary: dict[str, Any] | None
    edges: pa.Table | None
    note: str | None  # why the components rule cannot be used (None: it can, or the run was semdedup)

    @property
    def mode(self) -> str:
        return "components" if self.edges is not None else "semdedup"


def _same_table(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = str(u).rstrip("/")
        return os.path.normpath(u[len("file://"):] if u.startswith("file://") else u) if not scheme_of(u) or \
            u.startswith("file://") else u
    return norm(a) == norm(b)


def load_run(layout: outputs.OutputLayout | None, table_uri: str,
             storage_options: dict[str, Any] | None) -> DedupRun:
    """OUT/dedup/summary.json and edges.parquet, read only (nothing is
    created: the server may be read-only); `storage_options` in pyarrow's form."""
    if layout is None:
        return DedupRun(None, None, "the table was opened without its output folder (no dedup/ files)")
    summary_path, edges_path = layout.path("dedup", "summary.json"), layout.path("dedup", "edges.parquet")
    fs = None
    if scheme_of(summary_path):
        fs, summary_path = arrow_fs(summary_path, storage_options)
        edges_path = arrow_fs(edges_path, storage_options)[1]
    try:
        if fs is None:
            with open(summary_path) as fh:
                summary = json.load(fh)
        else:
            with fs.open_input_stream(summary_path) as fh:
                summary = json.loads(fh.read().decode())
    except (OSError, ValueError):
        return DedupRun(None, None, "no dedup/summary.json beside the table")
    if summary.get("table") and not _same_table(summary["table"], table_uri):
        return DedupRun(summary, None, f"dedup/summary.json is of another table ({summary['table']})")
    if summary.get("mode") != "components":
        return DedupRun(summary, None, None)
    try:
        edges = pq.read_table(edges_path, filesystem=fs)
    except (OSError, ValueError):
        return DedupRun(summary, None, "dedup ran with mode=components but dedup/edges.parquet is missing")
    return DedupRun(summary, edges, None)


class Duplicates:
    def __init__(self, cols: TableColumns, run: DedupRun | None = None) -> None:
        self.cols = cols
        self.run = run or DedupRun(None, None, None)
        self.mode = self.run.mode
        self._lock = threading.Lock()
        self._ready = False
        self._partner: np.ndarray | None = None
        self._histogram: dict[str, Any] | None = None

    # ------------------------------------------------------------ the data
    def _prepare(self) -> None:
        with self._lock:
            if self._ready:
                return
            sim = self.cols.numeric("dedup_max_sim")
            self.sim = sim
            self.dur = self.cols.durations()
            at = np.flatnonzero(~np.isnan(sim))
            self.order = at[np.argsort(sim[at], kind="stable")]
            self.sorted = sim[self.order]
            self.cum_s = np.concatenate([[0.0], np.cumsum(self.dur[self.order])])
            self.considered = int(pc.sum(pc.is_valid(self.cols.column("dedup_cluster"))).as_py() or 0) \
                if self.cols.has("dedup_cluster") else None
            self.stored = int(pc.sum(pc.fill_null(self.cols.column("duplicate"), False)).as_py() or 0) \
                if self.cols.has("duplicate") else None
            self.max_eps = 2.0
            if self.mode == "components":
                try:
                    self._prepare_forest()
                except ValueError as exc:  # edges that do not fit this table: count by SemDeDup's rule
                    log.warning("duplicates: %s; counting by dedup_max_sim", exc)
                    self.mode, self.run.note = "semdedup", str(exc)
            self._ready = True

    def _prepare_forest(self) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import minimum_spanning_tree

        from engine.dedup.groups import global_rank

        summary = self.run.summary or {}
        config = summary.get("config") or {}
        edges = self.run.edges
        rowids = self.cols.row_ids()
        order = np.argsort(rowids, kind="stable")
        n = len(rowids)

        def positions(ids: np.ndarray) -> np.ndarray:
            at = np.minimum(np.searchsorted(rowids, ids, sorter=order), max(0, n - 1))
            pos = order[at] if n else at
            if len(ids) and (not n or not (rowids[pos] == ids).all()):
                raise ValueError("dedup/edges.parquet names rows this table version does not have "
                                 "(the table changed since task=dedup)")
            return pos

        a = positions(edges.column("a").to_numpy().astype(np.uint64))
        b = positions(edges.column("b").to_numpy().astype(np.uint64))
        s = edges.column("sim").to_numpy().astype(np.float32)
        considered = np.flatnonzero(pc.is_valid(self.cols.column("dedup_cluster")).to_numpy(zero_copy_only=False))
        rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        ranked = pa.table({"id": pc.take(self.cols.column(self.cols.id_column), pa.array(considered)).cast(pa.string()),
                           "centroid_dist": pc.take(self.cols.column("dedup_centroid_dist"), pa.array(considered))})
        rank[considered] = global_rank(ranked, str(config.get("keep", "hard")), int(config.get("seed", 0)))
        # The maximum spanning forest: weights 2 - sim are positive (csgraph drops zeros).
        graph = coo_matrix((2.0 - s.astype(np.float64), (a, b)), shape=(n, n)).tocsr()
        forest = minimum_spanning_tree(graph).tocoo()
        fa, fb = forest.row.astype(np.int64), forest.col.astype(np.int64)
        fs = (2.0 - forest.data).astype(np.float32)
        walk = np.lexsort((fb, fa, -fs))  # most similar first
        fa, fb, fs = fa[walk], fb[walk], fs[walk]
        parent = list(range(n))
        best = rank.tolist()
        best_row = list(range(n))
        removed_row = np.empty(len(fa), dtype=np.int64)
        kept_row = np.empty(len(fa), dtype=np.int64)
        for i, (u, v) in enumerate(zip(fa.tolist(), fb.tolist())):
            while parent[u] != u:
                parent[u] = parent[parent[u]]
                u = parent[u]
            while parent[v] != v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            # A forest has no cycle: u and v are two groups; the worse one's kept row goes.
            win, lose = (u, v) if best[u] < best[v] else (v, u)
            removed_row[i], kept_row[i] = best_row[lose], best_row[win]
            parent[lose] = win
        self.f_a, self.f_b, self.f_sim = fa, fb, fs
        self.f_removed, self.f_kept = removed_row, kept_row
        self.f_cum_s = np.concatenate([[0.0], np.cumsum(self.dur[removed_row])])
        self.f_asc = fs[::-1].copy()
        self.max_eps = float(summary.get("run", {}).get("edges_eps") or summary.get("eps") or 0.0)
        self.boundary_eps = summary.get("run", {}).get("boundary_eps")

    def partners(self) -> np.ndarray:
        """Row position of each row's `dedup_max_id`, -1 where none."""
        if self._partner is None:
            ids = self.cols.column("dedup_max_id")
            valid = np.flatnonzero(pc.is_valid(ids).to_numpy(zero_copy_only=False))
            partner = np.full(len(ids), -1, dtype=np.int64)
            if len(valid):
                partner[valid] = self.cols.positions(pc.take(ids, valid).to_pylist())
            self._partner = partner
        return self._partner

    # ------------------------------------------------------------ counting
    def _forest_cut(self, eps: float) -> int:
        """Forest edges at cosine >= 1 - eps (dedup compares in float32)."""
        return len(self.f_asc) - int(np.searchsorted(self.f_asc, np.float32(1.0 - eps), side="left"))

    def cut(self, eps: float) -> int:
        """Index in the ascending similarities of the first removed row (semdedup)."""
        return int(np.searchsorted(self.sorted, 1.0 - eps, side="left"))

    def removed(self, eps: float) -> tuple[int, float]:
        """Rows removed at `eps`, and their seconds."""
        self._prepare()
        if self.mode == "components":
            k = self._forest_cut(eps)
            return k, float(self.f_cum_s[k])
        at = self.cut(eps)
        return len(self.sorted) - at, float(self.cum_s[-1] - self.cum_s[at])

    def removed_positions(self, eps: float) -> np.ndarray:
        """Row positions of the rows removed at `eps`."""
        self._prepare()
        if self.mode == "components":
            return np.sort(self.f_removed[:self._forest_cut(eps)])
        return np.sort(self.order[self.cut(eps):])

    # ------------------------------------------------------------- showing
    def _pairs(self, positions: np.ndarray) -> list[dict[str, Any]]:
        partner = self.partners()[positions]
        ids = self.cols.ids(positions)
        partner_ids = self.cols.ids(np.maximum(partner, 0))
        return [{"clip_id": a, "partner": b if p >= 0 else None, "sim": float(s)}
                for a, b, p, s in zip(ids, partner_ids, partner, self.sim[positions])]

    def _merges(self, edges: np.ndarray) -> list[dict[str, Any]]:
        """Forest edges as the row each removes and the kept row it joins."""
        gone, kept = self.cols.ids(self.f_removed[edges]), self.cols.ids(self.f_kept[edges])
        return [{"clip_id": g, "partner": k, "sim": float(s)} for g, k, s in zip(gone, kept, self.f_sim[edges])]

    def groups(self, eps: float, limit: int, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(number of groups, the `limit` largest from `offset`) at `eps`:
        each its kept member and the removed ones with the similarity at
        which each goes."""
        self._prepare()
        if self.mode == "components":
            return self._forest_groups(eps, limit, offset)
        # The links at this eps are the rows from the cut up (sorted once by
        # similarity): the groups are the components of those links alone, so
        # the work is the size of the answer, not of the table.
        at = self.cut(eps)
        rows = self.order[at:]
        partner = self.partners()[rows]
        linked = partner >= 0
        rows, partner = rows[linked], partner[linked]
        if not len(rows):
            return 0, []
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        k = len(rows)
        nodes, inverse = np.unique(np.r_[rows, partner], return_inverse=True)
        graph = coo_matrix((np.ones(k, np.int8), (inverse[:k], inverse[k:])), shape=(len(nodes), len(nodes)))
        count, label = connected_components(graph, directed=False)
        sizes = np.bincount(label, minlength=count)
        # Each row links to one higher-ranked row, so a group is a tree whose
        # root (the kept clip) is the one member without a link of its own.
        is_root = np.ones(len(nodes), dtype=bool)
        is_root[inverse[:k]] = False
        root_of = np.full(count, -1, dtype=np.int64)
        root_of[label[is_root]] = nodes[is_root]
        # A cycle (partners that name each other: not what dedup writes) has no root; show its smallest row.
        cyclic = np.flatnonzero(root_of < 0)
        if len(cyclic):
            first = np.full(count, len(nodes), dtype=np.int64)
            np.minimum.at(first, label, np.arange(len(nodes)))
            root_of[cyclic] = nodes[first[cyclic]]
        rank = np.lexsort((root_of, -sizes))[offset:offset + limit]
        edge_group = label[inverse[:k]]
        out = []
        for g in rank:
            members = rows[edge_group == g]
            members = members[np.argsort(-self.sim[members], kind="stable")]
            out.append({"kept": self.cols.ids([root_of[g]])[0], "size": int(sizes[g]), "removed": self._pairs(members)})
        return int(count), out

    def _forest_groups(self, eps: float, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        k = self._forest_cut(eps)
        if not k:
            return 0, []
        # Only the rows the k edges touch: the graph is as small as the answer.
        nodes, inverse = np.unique(np.r_[self.f_a[:k], self.f_b[:k]], return_inverse=True)
        graph = coo_matrix((np.ones(k, np.int8), (inverse[:k], inverse[k:])), shape=(len(nodes), len(nodes)))
        count, label = connected_components(graph, directed=False)
        edge_group = label[inverse[:k]]
        sizes = np.bincount(label, minlength=count)
        rank = np.lexsort((np.arange(count), -sizes))[offset:offset + limit]
        out = []
        for g in rank:
            edges = np.flatnonzero(edge_group == g)  # in descending similarity already
            gone = set(self.f_removed[edges].tolist())
            kept = next(int(r) for r in nodes[label == g] if int(r) not in gone)
            merges = self._merges(edges)
            kept_id = self.cols.ids([kept])[0]
            out.append({"kept": kept_id, "size": int(sizes[g]),
                        "removed": [{**m, "partner": kept_id} for m in merges]})
        return int(count), out

    def histogram(self) -> dict[str, Any]:
        """dedup_max_sim's histogram (of the table, at no eps: kept once)."""
        self._prepare()
        if self._histogram is None:
            self._histogram = self._histogram_of(self.sorted)
        return self._histogram

    @staticmethod
    def _histogram_of(v: np.ndarray) -> dict[str, Any]:
        if not len(v):
            return {"lo": None, "hi": None, "counts": []}
        lo = float(v[0])
        counts, _ = np.histogram(v, bins=HISTOGRAM_BINS, range=(lo, max(1.0, float(v[-1]))))
        return {"lo": lo, "hi": max(1.0, float(v[-1])), "counts": counts.tolist()}

    def command(self, eps: float, output: str, defaults: dict[str, Any] | None) -> str:
        """The task=dedup line that applies `eps`: the run's own settings
        where they differ from this config's, so it is an eps-only re-run."""
        parts = ["python", "-m", "engine", "task=dedup", f"output={output}", f"dedup.eps={eps:g}"]
        ran = (self.run.summary or {}).get("config") or {}
        for key, value in sorted(_flat(ran).items()):
            if key in ("dedup.eps", "dedup.table") or key not in _flat(defaults or {}):
                continue
            if _flat(defaults or {})[key] != value:
                parts.append(f"{key}={_cli(value)}")
        return " ".join(shlex.quote(p) for p in parts)

    def answer(self, eps: float, output: str, *, groups: int = 0, offset: int = 0,
               defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        self._prepare()
        if not (0.0 <= eps <= self.max_eps + 1e-12):
            raise ValueError(f"eps={eps} is outside [0, {self.max_eps:g}]" + (
                ": the stored duplicate edges reach that far (dedup.eps_table's largest); a larger eps "
                "needs task=dedup with it in dedup.eps_table" if self.mode == "components" else ""))
        removed, removed_s = self.removed(eps)
        out: dict[str, Any] = {
            "eps": eps, "threshold": 1.0 - eps, "mode": self.mode, "max_eps": self.max_eps, "note": self.run.note,
            "rows": len(self.sim), "considered": self.considered,
            "with_partner": len(self.sorted), "removed": removed, "removed_s": removed_s,
            "stored_duplicates": self.stored, "total_s": float(self.dur.sum()),
            "command": self.command(eps, output, defaults),
        }
        # The rows on either side of the cut: the last to go at this eps (kept
        # with a smaller one), the next to go with a larger one.
        if self.mode == "components":
            k = self._forest_cut(eps)
            out["margin_removed"] = self._merges(np.arange(max(0, k - MARGIN), k)[::-1])
            out["margin_kept"] = self._merges(np.arange(k, min(len(self.f_sim), k + MARGIN)))
            be = self.boundary_eps
            if be is not None and eps > be + 1e-12:
                out["note"] = (f"eps above the boundary eps dedup ran with ({be:g}): pairs across clusters "
                               "may be missing here, and the command runs dedup in full")
        else:
            at = self.cut(eps)
            out["margin_removed"] = self._pairs(self.order[at:at + MARGIN])
            out["margin_kept"] = self._pairs(self.order[max(0, at - MARGIN):at][::-1])
        if groups:
            out["group_count"], out["groups"] = self.groups(eps, groups, offset)
        return out


def _flat(node: dict[str, Any], prefix: str = "dedup.") -> dict[str, Any]:
    """A dedup config node as {"dedup.key.sub": value}."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _cli(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli(v) for v in value) + "]"
    return str(value)
