"""task=dedup dedup.incremental=true: a table deduped before that has grown
since has only its new rows assigned (to the stored centroids, boundary
rule included) and compared: with each other, and with the earlier rows of
the clusters they reach (those clusters' own members and their boundary
members, OUT/dedup/boundary.parquet). The stored edges and results join the
new ones, so groups at eps are decided over the whole grown table.

Pairs between two earlier rows were compared by the earlier run; pairs
with a new row are compared here under the same boundary rule, so the
groups are those of a full run on the grown table with the same centroids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig

from engine.dedup.files import BOUNDARY_SCHEMA, DedupFiles
from engine.dedup.groups import merge_pairwise, pairwise_edges
from engine.dedup.passes import assign_and_compare
from engine.dedup.source import DEDUP_COLUMNS, DedupSource
from engine.runtime.ray_session import cluster_resources, ensure_ray
from udfs.schema import DEDUP_ASSIGN_SCHEMA, DEDUP_RESULT_SCHEMA

log = logging.getLogger(__name__)


@dataclass
class Grown:
    """The fragments added since the last run (all after its last one)."""

    first_new_fragment: int
    fragments: set[int]

    @property
    def filter(self) -> str:
        return f"_rowaddr >= {self.first_new_fragment << 32}"


@dataclass
class Step:
    results: pa.Table
    edges: pa.Table | None
    boundary: pa.Table
    info: dict[str, Any]
    timings: dict[str, float]
    fragments: set[int]


def grown_since(previous: dict[str, Any] | None, source: DedupSource, print_: str, signature: list[Any],
                plan: Any) -> Grown | None:
    """The new fragments, when the table is the last run's plus fragments
    appended after it (the earlier ones unchanged); None otherwise."""
    if not previous or previous.get("fingerprint") != print_ or previous.get("table") != source.uri:
        return None
    if not set(DEDUP_COLUMNS) <= set(source.dataset.schema.names) or not plan.covers(previous.get("run", {})):
        return None
    current = {int(s[0]): s for s in signature}
    before = previous.get("input_signature") or []
    if not before or any(current.get(int(s[0])) != s for s in before):
        return None
    last = max(int(s[0]) for s in before)
    new = {fid for fid in current if fid not in {int(s[0]) for s in before}}
    if not new or min(new) <= last:
        return None
    return Grown(first_new_fragment=last + 1, fragments=new)


def run_incremental(cfg: DictConfig, source: DedupSource, files: DedupFiles, previous: dict[str, Any], grown: Grown,
                    plan: Any, prev_results: pa.Table) -> Step:
    timings: dict[str, float] = {}
    centroids = files.read_centroids()
    prev_edges = files.read_table("edges.parquet") if plan.mode == "components" else None
    prev_boundary = files.read_table("boundary.parquet")
    if prev_boundary is None:
        prev_boundary = BOUNDARY_SCHEMA.empty_table()
    if plan.mode == "components" and prev_edges is None:
        raise FileNotFoundError(f"{files.path('edges.parquet')} is missing: run task=dedup once without "
                                "dedup.incremental")
    ensure_ray(cfg.ray, progress_bars=bool(cfg.log.ray_progress))
    cpus, gpus = cluster_resources()
    base = prev_results.select(DEDUP_RESULT_SCHEMA.names)

    def old_members(clusters: np.ndarray) -> pa.Table:
        return earlier_members(base, prev_boundary, clusters)

    out = assign_and_compare(cfg, source, centroids, int(previous["run"]["dim"]), cpus, gpus, margin=plan.margin,
                             edge_sim=plan.edge_sim, extra_filter=grown.filter, old_members=old_members)
    timings.update(out.phase_s)
    t = time.perf_counter()
    results = merge_pairwise(out.rows, base)
    edges = pairwise_edges(out.rows, prev_edges) if plan.mode == "components" else None
    boundary = pa.concat_tables([prev_boundary.cast(BOUNDARY_SCHEMA), out.boundary])
    timings["merge_s"] = time.perf_counter() - t
    info = dict(previous["run"])
    skipped = dict(info.get("skipped") or {})
    for reason, n in out.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + n
    info.update(skipped=skipped, boundary_members=int(boundary.num_rows),
                edges=None if edges is None else int(edges.num_rows),
                matched_rows=int(info.get("matched_rows", 0)) + out.assigned + sum(out.skipped.values()),
                stages=out.stage_times)
    info["incremental"] = {"previous_version": (previous.get("deduped") or {}).get("version"),
                           "new_fragments": sorted(grown.fragments), "new_rows": out.assigned,
                           "earlier_rows_compared": out.old_rows}
    return Step(results=results, edges=edges, boundary=boundary, info=info, timings=timings,
                fragments=set(grown.fragments))


def earlier_members(results: pa.Table, boundary: pa.Table, clusters: np.ndarray) -> pa.Table:
    """DEDUP_ASSIGN_SCHEMA rows (`new` false) of the earlier rows in
    `clusters`: their own members, and boundary members from next door."""
    wanted = pa.array(clusters.astype(np.int32))
    own = results.filter(pc.is_in(results.column("cluster"), value_set=wanted))
    near = boundary.filter(pc.is_in(boundary.column("cluster"), value_set=wanted))
    where = pc.index_in(near.column("_rowid"), value_set=results.column("_rowid"))
    if near.num_rows and where.null_count:
        raise ValueError("OUT/dedup/boundary.parquet names rows the table no longer has: run without "
                         "dedup.incremental")
    near_rows = results.take(where)
    parts = []
    for rows, cluster, dist, primary in ((own, own.column("cluster"), own.column("centroid_dist"), True),
                                         (near_rows, near.column("cluster"), near.column("centroid_dist"), False)):
        n = rows.num_rows
        parts.append(pa.Table.from_arrays([
            rows.column("_rowaddr"), rows.column("_rowid"), rows.column("id"), cluster.cast(pa.int32()),
            dist.cast(pa.float32()), pa.nulls(n, pa.string()), pa.array(np.full(n, primary)),
            pa.array(np.zeros(n, bool)),
        ], schema=DEDUP_ASSIGN_SCHEMA))
    return pa.concat_tables(parts)


def changed_fragments(previous: pa.Table, values: pa.Table) -> set[int]:
    """Fragments holding an earlier row whose dedup values differ from what
    the table holds (`previous`: the table's values, with `_rowaddr`)."""
    addr = values.column("_rowaddr").to_numpy()
    old_addr = previous.column("_rowaddr").to_numpy()
    pos = np.searchsorted(addr, old_addr)
    pos = np.minimum(pos, max(0, len(addr) - 1))
    present = (addr[pos] == old_addr) if len(addr) else np.zeros(len(old_addr), bool)
    changed = ~present
    pairs = {"dedup_cluster": "cluster", "dedup_centroid_dist": "centroid_dist", "dedup_max_sim": "max_sim",
             "dedup_max_id": "max_id", "dedup_group": "dedup_group", "duplicate": "duplicate"}
    for new_name, old_name in pairs.items():
        new_col = values.column(new_name).take(pa.array(pos[present]))
        old_col = previous.column(old_name).filter(pa.array(present))
        same = pc.fill_null(pc.equal(new_col, old_col), False).to_numpy(zero_copy_only=False)
        both_null = (pc.is_null(new_col).to_numpy(zero_copy_only=False)
                     & pc.is_null(old_col).to_numpy(zero_copy_only=False))
        idx = np.flatnonzero(present)
        changed[idx[~(same | both_null)]] = True
    return {int(f) for f in np.unique(old_addr[changed] >> np.uint64(32))}
