"""task=dedup's assignment and pairwise passes in this process, without Ray.

On one machine Ray Data costs more than it gives here: its read tasks, the
groupby that forms clusters and the per-cluster fetch of vectors by row id
took 2x the hand-written faiss + numpy loop on 200,000 x 768 rows
(docs/dedup.md), while the passes themselves are one Lance scan and a few
matmuls per cluster. So when Ray would run on this machine anyway and the
considered vectors fit in `dedup.local_max_gb`, the task scans the table
once, assigns each batch with the same KMeansAssign stage, keeps the unit
vectors in one float32 matrix, and calls the same ClusterPairwise stage on
each cluster's rows with their vectors at hand. The results are the Ray
passes' (tests/test_dedup.py runs both on one table).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from engine.dedup.passes import FACT_COLUMNS, PassOutput, assigned_facts
from engine.dedup.source import DedupSource
from udfs.schema import DEDUP_ASSIGN_SCHEMA, DEDUP_PAIRWISE_SCHEMA

log = logging.getLogger(__name__)

RUNNERS = ("auto", "local", "ray")

# Rows per scanned batch: big enough that the matmul dominates, small
# enough that a batch's copy stays a few hundred MB at 768 dimensions.
SCAN_ROWS = 65536


def vector_bytes(rows: int, dim: int) -> int:
    return int(rows) * int(dim) * 4


def runs_locally(cfg: DictConfig, matched: int, dim: int) -> bool:
    """Whether `dedup.runner` puts the passes in this process: `local`
    always; `auto` when no Ray cluster is named (ray.address,
    $RAY_ADDRESS), no dedup step asks for a GPU, this is not an incremental
    step, and the considered vectors fit in `dedup.local_max_gb`."""
    dcfg = cfg.dedup
    runner = str(dcfg.get("runner") or "auto")
    if runner not in RUNNERS:
        raise ValueError(f"unknown dedup.runner={runner!r}; choose one of {list(RUNNERS)}")
    if runner != "auto":
        return runner == "local"
    if cfg.ray.get("address") or os.environ.get("RAY_ADDRESS"):
        return False
    for node in ("kmeans", "assign", "pairwise"):
        if float((dcfg[node].get("resources") or {}).get("num_gpus") or 0) > 0:
            return False
    return vector_bytes(matched, dim) <= float(dcfg.local_max_gb) * 1e9


def assign_and_compare_local(cfg: DictConfig, source: DedupSource, centroids: np.ndarray, dim: int, *,
                             margin: float | None, edge_sim: float | None, matched: int) -> PassOutput:
    """The two passes of engine.dedup.passes.assign_and_compare over every
    row `where` selects, here: the same stages, the same PassOutput."""
    from udfs.dedup.kmeans import KMeansAssign
    from udfs.dedup.pairwise import ClusterPairwise
    from udfs.dedup.vectors import checked_rows

    dcfg = cfg.dedup
    phase_s: dict[str, float] = {}
    t = time.perf_counter()
    assign = KMeansAssign(centroids=centroids, id_column=source.id_column, vector_column=source.vector_column,
                          device=str(dcfg.assign.device), dtype=str(dcfg.assign.dtype), margin=margin,
                          extra=int(dcfg.boundary.clusters), threads=None)
    # Unit vectors of the usable rows in scan order; `slot` of an assignment
    # row is its vector's row here.
    x = np.empty((max(1, matched), dim), dtype=np.float32)
    filled = 0
    parts: list[pa.Table] = []
    slots: list[np.ndarray] = []
    busy = 0.0
    scanner = source.dataset.scanner(columns=[source.id_column, source.vector_column], filter=source.where,
                                     with_row_id=True, with_row_address=True, batch_size=SCAN_ROWS)
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        b = time.perf_counter()
        table = pa.Table.from_batches([batch])
        out, rows = assign.memberships(table)
        mat, norms, reason = checked_rows(table.column(source.vector_column), dim)
        ok = np.equal(reason, None)
        if filled + len(mat) > len(x):
            raise RuntimeError(f"{source.uri} gained rows while dedup read it: run again")
        np.divide(mat, norms[:, None], out=x[filled : filled + len(mat)])
        slot = np.full(table.num_rows, -1, dtype=np.int64)
        slot[ok] = np.arange(filled, filled + len(mat))
        filled += len(mat)
        parts.append(out)
        slots.append(slot[rows])
        busy += time.perf_counter() - b
    assigned = pa.concat_tables([DEDUP_ASSIGN_SCHEMA.empty_table(), *parts])
    slot = np.concatenate(slots) if slots else np.zeros(0, np.int64)
    skipped, boundary, count, _ = assigned_facts(assigned.select(FACT_COLUMNS))
    phase_s["assign_s"] = time.perf_counter() - t
    stage_times: dict[str, Any] = {"dedup_assign": {"busy_s": busy, "rows_in": int(filled + sum(skipped.values())),
                                                    "rows_out": assigned.num_rows, "batches": len(parts)}}

    t = time.perf_counter()
    pairwise = ClusterPairwise(table=None, vector_column=source.vector_column, dim=dim, seed=int(dcfg.seed),
                               keep=str(dcfg.keep), edge_sim=edge_sim, threads=None,
                               **{k: v for k, v in _node(dcfg.pairwise).items() if k != "resources"})
    cluster = assigned.column("cluster").to_numpy()
    member = np.flatnonzero(cluster >= 0)
    order = member[np.argsort(cluster[member], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, np.diff(cluster[order]) != 0, True]) if len(order) else np.zeros(1, int)
    results = [DEDUP_PAIRWISE_SCHEMA.empty_table()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        results.append(pairwise.compare_group(assigned.take(pa.array(rows)), x[slot[rows]]))
    rows_out = pa.concat_tables(results)
    phase_s["pairwise_s"] = time.perf_counter() - t
    stage_times["dedup_pairwise"] = {"busy_s": phase_s["pairwise_s"], "rows_in": int(len(order)),
                                     "rows_out": rows_out.num_rows, "batches": int(len(bounds) - 1)}
    log.info("dedup: assigned and compared %d rows in this process (dedup.runner)", count)
    return PassOutput(rows=rows_out, boundary=boundary, assigned=count, skipped=skipped, old_rows=0,
                      stage_times=stage_times, phase_s=phase_s)


def _node(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
