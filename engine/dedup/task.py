"""The dedup task: semantic dedup of a Lance table's embeddings.

`python -m engine task=dedup output=OUT` dedups `OUT/clips.lance`;
`dedup.table=PATH` any other Lance table (`dedup.id_column`,
`dedup.vector_column`). A full run:

1. samples `dedup.kmeans.fit_fraction` of the considered rows (`dedup.where`,
   by default the curated view) and fits k-means to them (engine.dedup.fit);
2. assigns every row to its nearest centroid, and with `dedup.mode=components`
   a row near a boundary also to the cluster across it;
3. compares members within each cluster and keeps the duplicate edges
   (2 and 3: Ray Data map_batches and groupby, engine.dedup.passes; or in
   this process when `dedup.runner` allows, engine.dedup.local);
4. decides at `dedup.eps` (engine.dedup.groups): components of the edges with
   exactly one kept each, or SemDeDup's rule with `dedup.mode=semdedup`;
5. writes CLIP_DEDUP_FIELDS into the table in one new Lance version, and its
   files under `OUT/dedup/` (engine.dedup.files).

A re-run whose only change is `dedup.eps` recomputes the eps-dependent
columns from the stored results and edges and rewrites those alone. With
`dedup.incremental=true` a table that grew since the last run has only its
new rows assigned and compared (engine.dedup.incremental).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from engine.dedup import incremental
from engine.dedup.files import DedupFiles, pruning_table
from engine.dedup.fit import fit_kmeans, resolve_n_clusters, sample_for_fit
from engine.dedup.groups import MODES, Decision, decide, global_rank, merge_pairwise, pairwise_edges
from engine.dedup.local import assign_and_compare_local, runs_locally
from engine.dedup.passes import SHUFFLES, assign_and_compare
from engine.dedup.source import DEDUP_COLUMNS, DedupSource
from engine.runtime.ray_session import cluster_resources, ensure_ray
from engine.runtime.stages import node_dict, stage_params
from engine.store import outputs
from engine.store.lance_columns import write_columns
from udfs.schema import CLIP_DEDUP_FIELDS, DEDUP_EPS_COLUMNS, DEDUP_RESULT_SCHEMA
from udfs.uris import lance_storage_options

log = logging.getLogger(__name__)

__all__ = ["run", "pruning_table", "resolve_n_clusters"]

# Keys of dedup.kmeans the engine uses itself (the rest go to KMeans).
KMEANS_ENGINE_KEYS = ("fit_fraction", "min_rows_per_cluster", "resources")
# Settings that do not change what a full run computes.
NOT_FINGERPRINTED = ("eps", "eps_table", "incremental", "runner", "local_max_gb")


class Plan:
    """The eps-related numbers of a run."""

    def __init__(self, cfg: DictConfig) -> None:
        d = cfg.dedup
        self.mode = str(d.mode)
        if self.mode not in MODES:
            raise ValueError(f"unknown dedup.mode={self.mode!r}; choose one of {list(MODES)}")
        self.eps = float(d.eps)
        sweep = [float(e) for e in d.eps_table]
        for e in (self.eps, *sweep):
            if not 0 <= e < 1:
                raise ValueError(f"dedup.eps and dedup.eps_table must be in [0, 1), got {e}")
        self.sweep = sorted({*sweep, self.eps})
        components = self.mode == "components"
        # Edges down to the largest swept eps, so any of them is decided from the stored edges.
        self.edges_eps = max(self.sweep) if components else None
        self.boundary_eps = (float(d.boundary.eps) if d.boundary.get("eps") is not None else self.eps) \
            if components else None

    @property
    def margin(self) -> float | None:
        from udfs.dedup.kmeans import boundary_margin

        return None if self.boundary_eps is None else boundary_margin(self.boundary_eps)

    @property
    def edge_sim(self) -> float | None:
        return None if self.edges_eps is None else 1.0 - self.edges_eps

    def covers(self, run: dict[str, Any]) -> bool:
        """Whether an earlier run's edges and boundary margin serve this eps."""
        if self.mode != "components":
            return True
        return (run.get("edges_eps") is not None and self.eps <= run["edges_eps"] + 1e-12
                and run.get("boundary_eps") is not None and self.eps <= run["boundary_eps"] + 1e-12)


def fingerprint(source: DedupSource, settings: dict[str, Any]) -> str:
    """Everything a dedup result depends on except eps."""
    key = {"table": source.uri, "id": source.id_column, "vector": source.vector_column, "where": source.where,
           "settings": {k: v for k, v in settings.items() if k not in NOT_FINGERPRINTED}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dedup_settings(cfg: DictConfig) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.dedup, resolve=True)
    for node in ("kmeans", "assign", "pairwise"):
        settings.get(node, {}).pop("resources", None)
    for key in ("table", "id_column", "vector_column", "where"):
        settings.pop(key, None)
    if settings.get("mode") == "components" and settings.get("boundary", {}).get("eps") is None:
        settings["boundary"] = {**settings.get("boundary", {}), "eps": None}
    return settings


# ------------------------------------------------------------------ the run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Dedup the table; returns the summary written to OUT/dedup/summary.json."""
    started = time.perf_counter()
    layout = outputs.OutputLayout(str(cfg.output))
    storage_options = outputs.storage_options(cfg)
    lance_options = lance_storage_options(storage_options)
    source = DedupSource(cfg, layout, lance_options)
    plan = Plan(cfg)
    if str(cfg.dedup.shuffle) not in SHUFFLES:
        raise ValueError(f"unknown dedup.shuffle={cfg.dedup.shuffle!r}; choose one of {sorted(SHUFFLES)}")
    files = DedupFiles(layout, storage_options)
    print_ = fingerprint(source, dedup_settings(cfg))
    previous = files.read_summary()
    timings: dict[str, float] = {}
    centroids = boundary = pruning = None
    fragments: set[int] | None = None  # None: every fragment
    signature = _jsonable(source.signature())
    if _reusable(previous, source, print_, signature, plan):
        log.info("dedup: only eps changed since the last run; rewriting %s", ", ".join(DEDUP_EPS_COLUMNS))
        results = _previous_results(source)
        edges = files.read_table("edges.parquet") if plan.mode == "components" else None
        info = {**previous["run"], "reused": True, "incremental": None}
        columns = list(DEDUP_EPS_COLUMNS)
    else:
        grown = incremental.grown_since(previous, source, print_, signature, plan) \
            if bool(cfg.dedup.incremental) else None
        if grown is not None:
            earlier = _previous_results(source)
            step = incremental.run_incremental(cfg, source, files, previous, grown, plan, earlier)
            results, edges, boundary, info, timings, fragments = (step.results, step.edges, step.boundary, step.info,
                                                                  step.timings, step.fragments)
        else:
            if bool(cfg.dedup.incremental):
                log.info("dedup.incremental: no earlier run of these settings on these rows to extend; "
                         "running in full")
            results, edges, boundary, info, timings, centroids = _compute(cfg, source, plan)
        info["reused"] = False
        pruning = pruning_table(results)
        columns = DEDUP_COLUMNS
    t = time.perf_counter()
    rank = global_rank(results, str(cfg.dedup.keep), int(cfg.dedup.seed)) if plan.mode == "components" else None
    decision = decide(plan.mode, results, edges, rank, plan.eps)
    sweep = [_sweep_row(e, results, decide(plan.mode, results, edges, rank, e) if e != plan.eps else decision)
             for e in plan.sweep]
    timings["decide_s"] = time.perf_counter() - t
    values = _table_columns(results, decision)
    t = time.perf_counter()
    fields = [f for f in CLIP_DEDUP_FIELDS if f.name in columns]
    if fragments is None:
        table = write_columns(source.dataset, values, fields, lance_options)
    else:
        from engine.dedup.writeback import replace_in_fragments

        fragments = fragments | incremental.changed_fragments(earlier, values)
        table = replace_in_fragments(source.dataset, values, fields, fragments, lance_options)
        info["incremental"]["fragments_written"] = sorted(fragments)
    timings["write_table_s"] = time.perf_counter() - t

    removed = int(decision.duplicate.sum())
    summary = {
        "table": source.uri,
        "table_version": table.version,
        "rows": source.total_rows,
        "considered": int(results.num_rows),
        "mode": plan.mode,
        "eps": plan.eps,
        "kept": int(results.num_rows - removed),
        "removed": removed,
        "groups": int(len(np.unique(decision.group[decision.group >= 0]))),
        "columns_written": columns,
        "fingerprint": print_,
        "input_signature": signature,
        # What has been deduped: the table version read, and its fragments.
        "deduped": {"version": source.version, "fragments": [int(s[0]) for s in signature]},
        "run": info,
        "config": outputs.redacted_config(cfg).get("dedup"),
    }
    t = time.perf_counter()
    summary["files"] = {**files.write_state(centroids, edges if columns == DEDUP_COLUMNS else None, boundary,
                                            pruning),
                        **files.write_decisions(results, decision.duplicate, plan.eps, sweep)}
    timings["write_files_s"] = time.perf_counter() - t
    summary["wall_s"] = {**timings, "total": time.perf_counter() - started}
    files.write_summary(summary)
    return summary


def _sweep_row(eps: float, results: pa.Table, decision: Decision) -> dict[str, Any]:
    removed = int(decision.duplicate.sum())
    return {"eps": eps, "kept": int(results.num_rows) - removed, "removed": removed, "total": int(results.num_rows)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _reusable(previous: dict[str, Any] | None, source: DedupSource, print_: str, signature: list[Any],
              plan: Plan) -> bool:
    if not previous or previous.get("fingerprint") != print_ or previous.get("table") != source.uri:
        return False
    if not set(DEDUP_COLUMNS) <= set(source.dataset.schema.names):
        return False
    if not plan.covers(previous.get("run", {})):
        log.info("dedup: eps %s is above what the last run's edges and boundary margin cover; running in full",
                 plan.eps)
        return False
    return previous.get("input_signature") == signature


def _previous_results(source: DedupSource) -> pa.Table:
    """The results stored in the table by the last run (DEDUP_RESULT_SCHEMA,
    plus its eps-dependent columns), sorted by `_rowaddr`."""
    cols = ["dedup_cluster", "dedup_centroid_dist", "dedup_max_sim", "dedup_max_id", source.id_column,
            *DEDUP_EPS_COLUMNS]
    t = source.dataset.to_table(columns=cols, filter="dedup_cluster IS NOT NULL", with_row_id=True,
                                with_row_address=True)
    out = pa.Table.from_arrays([
        t.column("_rowaddr").cast(pa.uint64()), t.column("_rowid").cast(pa.uint64()),
        t.column(source.id_column).cast(pa.string()), t.column("dedup_cluster"), t.column("dedup_centroid_dist"),
        t.column("dedup_max_sim"), t.column("dedup_max_id"),
    ], schema=DEDUP_RESULT_SCHEMA)
    for name in DEDUP_EPS_COLUMNS:
        out = out.append_column(name, t.column(name))
    return out.sort_by("_rowaddr")


def _table_columns(results: pa.Table, decision: Decision) -> pa.Table:
    return pa.table({
        "_rowaddr": results.column("_rowaddr"), "_rowid": results.column("_rowid"),
        "dedup_cluster": results.column("cluster"), "dedup_centroid_dist": results.column("centroid_dist"),
        "dedup_max_sim": results.column("max_sim"), "dedup_max_id": results.column("max_id"),
        "dedup_group": decision.group_array(), "duplicate": pa.array(decision.duplicate),
    })


def _compute(cfg: DictConfig, source: DedupSource, plan: Plan):
    """k-means fit, assignment and the pairwise pass over every considered row."""
    dcfg = cfg.dedup
    kmeans_node = node_dict(cfg.dedup, "kmeans")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    sample = sample_for_fit(source, kmeans_node, int(dcfg.seed))
    timings["sample_s"] = time.perf_counter() - t

    here = runs_locally(cfg, sample.matched, sample.dim)
    if here:
        cpus, gpus = float(os.cpu_count() or 1), 0.0  # no Ray: the passes run in this process
    else:
        ensure_ray(cfg.ray, progress_bars=bool(cfg.log.ray_progress))
        cpus, gpus = cluster_resources()
    params = {key: v for key, v in stage_params(kmeans_node).items() if key not in KMEANS_ENGINE_KEYS}
    t = time.perf_counter()
    fit = fit_kmeans(sample.x, {**params, "n_clusters": sample.k}, kmeans_node.get("resources") or {}, gpus)
    timings["fit_s"] = time.perf_counter() - t

    if here:
        out = assign_and_compare_local(cfg, source, fit.centroids, sample.dim, margin=plan.margin,
                                       edge_sim=plan.edge_sim, matched=sample.matched)
    else:
        out = assign_and_compare(cfg, source, fit.centroids, sample.dim, cpus, gpus, margin=plan.margin,
                                 edge_sim=plan.edge_sim)
    timings.update(out.phase_s)
    t = time.perf_counter()
    results = merge_pairwise(out.rows)
    edges = pairwise_edges(out.rows) if plan.mode == "components" else None
    timings["merge_s"] = time.perf_counter() - t
    sizes = np.bincount(results.column("cluster").to_numpy(), minlength=sample.k)
    info = {
        "matched_rows": sample.matched,
        "skipped": out.skipped,
        "dim": sample.dim,
        "n_clusters": sample.k,
        "fit_rows": len(sample.x),
        "fit_skipped": sample.skipped,
        "kmeans": {"backend": fit.backend, "n_iter": fit.n_iter, "inertia": fit.inertia,
                   "converged": fit.converged, "init_s": fit.init_s, "fit_s": fit.fit_s},
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                          "empty": int((sizes == 0).sum())},
        "boundary_eps": plan.boundary_eps,
        "boundary_margin": plan.margin,
        "boundary_members": int(out.boundary.num_rows),
        "edges_eps": plan.edges_eps,
        "edges": None if edges is None else int(edges.num_rows),
        "stages": out.stage_times,
        "runner": "local" if here else "ray",
        "incremental": None,
    }
    return results, edges, out.boundary, info, timings, fit.centroids
