"""The two Ray Data passes of task=dedup: every row to its nearest centroid
(and, near a boundary, to the cluster across it), then one pairwise call
per cluster."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from omegaconf import DictConfig
from ray.data.context import ShuffleStrategy
from ray.data.expressions import col

from engine.dedup.files import BOUNDARY_SCHEMA
from engine.dedup.source import DedupSource
from engine.runtime.stages import StageStep, actor_pool, apply_stage, check_gpus, worker_slots
from engine.runtime.timing import start_clock, timed
from udfs.schema import DEDUP_ASSIGN_SCHEMA, DEDUP_PAIRWISE_SCHEMA

SHUFFLES = {"sort": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, "hash": ShuffleStrategy.SHUFFLE_V2}


@dataclass
class PassOutput:
    rows: pa.Table  # DEDUP_PAIRWISE_SCHEMA
    boundary: pa.Table  # BOUNDARY_SCHEMA: the boundary memberships of the rows assigned
    assigned: int  # rows assigned (primary memberships)
    skipped: dict[str, int]
    old_rows: int  # memberships of earlier rows that joined the pairwise pass (incremental)
    stage_times: dict[str, Any]
    phase_s: dict[str, float]


def assign_and_compare(cfg: DictConfig, source: DedupSource, centroids, dim: int, cpus: float, gpus: float, *,
                       margin: float | None, edge_sim: float | None, extra_filter: str | None = None,
                       old_members: Callable[[np.ndarray], pa.Table] | None = None) -> PassOutput:
    """Rows `where` (and `extra_filter`) selects to their nearest centroid
    (map_batches on an actor pool), then one pairwise call per cluster
    (groupby + map_groups). `old_members(clusters)`: DEDUP_ASSIGN_SCHEMA rows
    of an earlier run (`new` false) in the clusters the new rows reached,
    which join those clusters' calls."""
    from udfs.dedup.kmeans import KMeansAssign
    from udfs.dedup.pairwise import ClusterPairwise

    dcfg = cfg.dedup
    assign_step = StageStep.from_node("dedup_assign", KMeansAssign, dcfg.assign, params={
        "centroids": centroids, "id_column": source.id_column, "vector_column": source.vector_column,
        "margin": margin, "extra": int(dcfg.boundary.clusters)})
    pair_step = StageStep.from_node("dedup_pairwise", ClusterPairwise, dcfg.pairwise, params={
        "table": source.uri, "version": source.version, "storage_options": source.storage_options,
        "vector_column": source.vector_column, "dim": dim, "seed": int(dcfg.seed), "keep": str(dcfg.keep),
        "edge_sim": edge_sim})
    check_gpus([assign_step, pair_step], gpus)
    for step in (assign_step, pair_step):
        # Torch threads = the CPUs each worker was given, not every core.
        step.params.setdefault("threads", max(1, int(step.num_cpus)))
    phase_s: dict[str, float] = {}
    clock, clock_name = start_clock(uuid.uuid4().hex[:12])
    try:
        t = time.perf_counter()
        scan: dict[str, Any] = {"with_row_id": True, "with_row_address": True}
        where = " AND ".join(f"({w})" for w in (source.where, extra_filter) if w)
        if where:
            scan["filter"] = where  # Lance SQL, applied by Lance's scanner
        data = ray.data.read_lance(source.uri, version=source.version, columns=[source.id_column, source.vector_column],
                                   storage_options=source.storage_options, scanner_options=scan,
                                   override_num_blocks=read_blocks(source, assign_step, cpus, gpus))
        assigned = apply_stage(data, assign_step, clock_name, cpus, gpus).materialize()
        skipped, boundary, count, touched = _assigned_facts(assigned)
        phase_s["assign_s"] = time.perf_counter() - t

        t = time.perf_counter()
        k = len(centroids)
        clustered = assigned.filter(expr=col("cluster") >= 0)
        old = old_members(touched) if old_members is not None else None
        if old is not None and old.num_rows:
            clustered = clustered.union(ray.data.from_arrow(old.cast(DEDUP_ASSIGN_SCHEMA)))
        # Sort-based shuffle by default: it runs as plain tasks, where the hash
        # shuffle starts aggregator actors (seconds of overhead on small runs).
        clustered.context.shuffle_strategy = SHUFFLES[str(dcfg.shuffle)]
        partitions = int(dcfg.get("shuffle_partitions") or max(1, min(k, 4 * int(cpus))))
        pairs = clustered.groupby("cluster", num_partitions=partitions).map_groups(
            timed(ClusterPairwise, pair_step.name, clock_name), fn_constructor_kwargs=pair_step.params,
            batch_format="pyarrow", compute=actor_pool(pair_step, cpus, gpus), num_cpus=pair_step.num_cpus,
            num_gpus=pair_step.num_gpus or None)
        rows = pa.concat_tables([DEDUP_PAIRWISE_SCHEMA.empty_table(), *ray.get(pairs.to_arrow_refs())])
        phase_s["pairwise_s"] = time.perf_counter() - t
        stage_times = ray.get(clock.snapshot.remote())
    finally:
        ray.kill(clock)
    return PassOutput(rows=rows, boundary=boundary, assigned=count, skipped=skipped,
                      old_rows=0 if old is None else old.num_rows, stage_times=stage_times, phase_s=phase_s)


def read_blocks(source: DedupSource, step: StageStep, cpus: float, gpus: float) -> int | None:
    """How many blocks the read makes: one per fragment when there are at
    least as many fragments as assignment workers. Ray Data fuses the read
    with the assignment tasks only when it does not split the read's blocks
    further (its default asks for ~200 blocks), and fused, the vectors go
    from Lance into the matmul instead of through the object store. With
    fewer fragments (small tables) the split gives the workers more to share."""
    fragments = len(source.dataset.get_fragments())
    return fragments if fragments >= max(1, worker_slots(step, cpus, gpus)) else None


def _assigned_facts(assigned: ray.data.Dataset) -> tuple[dict[str, int], pa.Table, int, np.ndarray]:
    """(skipped rows by reason, boundary memberships, primary rows assigned,
    clusters reached) from the small columns of the assignment."""
    tables = ray.get(assigned.select_columns(FACT_COLUMNS).to_arrow_refs())
    # A read task whose fragment has no selected row (an incremental run's
    # filter) can hand on an empty block in the read's own schema.
    tables = [t for t in tables if t.num_rows]
    return assigned_facts(pa.concat_tables([DEDUP_ASSIGN_SCHEMA.empty_table().select(FACT_COLUMNS), *tables]))


FACT_COLUMNS = ["_rowid", "cluster", "centroid_dist", "skip", "primary"]


def assigned_facts(t: pa.Table) -> tuple[dict[str, int], pa.Table, int, np.ndarray]:
    """`_assigned_facts` of a table of assignment rows (FACT_COLUMNS at least)."""
    primary = t.column("primary")
    skipped_rows = t.filter(pc.less(t.column("cluster"), 0))
    counts = pc.value_counts(skipped_rows.column("skip").combine_chunks()) if skipped_rows.num_rows else []
    skipped = {str(v["values"]): int(v["counts"]) for v in (counts.to_pylist() if len(counts) else [])}
    boundary = t.filter(pc.invert(primary)).select(["_rowid", "cluster", "centroid_dist"]).cast(BOUNDARY_SCHEMA)
    clusters = t.column("cluster").to_numpy(zero_copy_only=False)
    return (skipped, boundary, int(pc.sum(primary.cast(pa.int64())).as_py() or 0),
            np.unique(clusters[clusters >= 0]))
