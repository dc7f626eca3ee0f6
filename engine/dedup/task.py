"""The dedup task: semantic dedup (SemDeDup) of a Lance table's embeddings.

`python -m engine task=dedup output=OUT` dedups `OUT/clips.lance`;
`dedup.table=PATH` any other Lance table (`dedup.id_column`,
`dedup.vector_column`). The run:

1. samples `dedup.kmeans.fit_fraction` of the considered rows (`dedup.where`,
   by default the curated view) and fits k-means to them in one Ray task
   (on a GPU when `dedup.kmeans.resources.num_gpus` asks for one);
2. assigns every row to its nearest centroid with Ray Data `map_batches` on
   an actor pool (`udfs.dedup.kmeans.KMeansAssign`); rows with unusable
   vectors are counted and left out;
3. groups the rows by cluster (a Ray Data groupby that moves ids and
   distances, not vectors) and runs `udfs.dedup.pairwise.ClusterPairwise`
   once per cluster: rank the members (`dedup.keep`), then each one's most
   similar higher-ranked member, fetched from the table by row id;
4. writes `dedup_cluster`, `dedup_centroid_dist`, `dedup_max_sim`,
   `dedup_max_id` and `duplicate` into the table in one new Lance version
   (engine.store.lance_columns), and its files under `OUT/dedup/`.

A re-run whose only change is `dedup.eps` (same table data, same settings)
recomputes `duplicate` from `dedup_max_sim` and rewrites that column alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig, OmegaConf
from ray.data.context import ShuffleStrategy
from ray.data.expressions import col

from engine.store import outputs
from engine.store.lance_columns import base_signature, write_columns
from engine.runtime.ray_session import cluster_resources, ensure_ray
from udfs.schema import CLIP_DEDUP_FIELDS, DEDUP_PAIRWISE_SCHEMA
from engine.runtime.stages import StageStep, actor_pool, apply_stage, check_gpus, node_dict, stage_params
from engine.runtime.timing import start_clock, timed
from udfs.uris import arrow_fs, lance_storage_options, scheme_of
from udfs.lance_rows import take_rows
from engine.store.views import CURATED

log = logging.getLogger(__name__)

DEDUP_COLUMNS = [f.name for f in CLIP_DEDUP_FIELDS]
# Keys of dedup.kmeans the engine uses itself (the rest go to KMeans).
KMEANS_ENGINE_KEYS = ("fit_fraction", "min_rows_per_cluster", "resources")
SHUFFLES = {"sort": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, "hash": ShuffleStrategy.SHUFFLE_V2}


# ------------------------------------------------------------------ the source table
class DedupSource:
    """The table dedup reads, pinned at the version it was opened at."""

    def __init__(self, cfg: DictConfig, layout: outputs.OutputLayout, lance_options: dict[str, str] | None) -> None:
        dcfg = cfg.dedup
        self.storage_options = lance_options
        if dcfg.get("table"):
            self.uri = str(dcfg.table)
            try:
                self.dataset = lance.dataset(self.uri, storage_options=lance_options)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise FileNotFoundError(f"dedup.table: no Lance dataset at {self.uri} ({type(exc).__name__}: {exc})")
        else:
            self.uri = layout.clips
            self.dataset = layout.open_clips(lance_options)
        self.version = self.dataset.version
        self.id_column = str(dcfg.id_column)
        self.vector_column = str(dcfg.vector_column)
        names = self.dataset.schema.names
        if self.vector_column not in names:
            hint = ("run curate with embed=clip (or embed=cosmos_embed1)" if not dcfg.get("table")
                    else "set dedup.vector_column")
            raise ValueError(f"{self.uri} has no embedding column {self.vector_column!r} (columns: {names}): {hint}")
        if self.id_column not in names:
            raise ValueError(f"{self.uri} has no id column {self.id_column!r} (columns: {names}): set dedup.id_column")
        from udfs.dedup.vectors import check_vector_type, vector_dim

        vtype = self.dataset.schema.field(self.vector_column).type
        try:
            check_vector_type(vtype)
        except TypeError as exc:
            raise ValueError(f"{self.uri}: column {self.vector_column!r}: {exc}") from None
        self.fixed_dim = vector_dim(vtype)
        self.where = self._where(dcfg.get("where"))
        self.total_rows = self.dataset.count_rows()

    def _where(self, where: str | None) -> str | None:
        if where:
            return str(where)
        names = self.dataset.schema.names
        return CURATED if {"passed", "error"} <= set(names) else None

    def matching_row_ids(self) -> np.ndarray:
        """`_rowid` of every row `where` selects (scalar columns only)."""
        try:
            table = self.dataset.to_table(columns=[], filter=self.where, with_row_id=True)
        except Exception as exc:  # noqa: BLE001 - Lance's SQL errors come in several types
            raise ValueError(f"dedup.where={self.where!r} is not a valid filter on {self.uri}: {exc}") from exc
        return table.column("_rowid").to_numpy()

    def signature(self) -> list[Any]:
        return base_signature(self.dataset, DEDUP_COLUMNS)


# ------------------------------------------------------------------ settings
def resolve_n_clusters(setting: Any, rows: int) -> int:
    """`auto`: sqrt(rows), which balances assignment (rows x k) against the
    pairwise pass (rows^2 / k); never more clusters than rows."""
    if setting in (None, "auto"):
        return max(1, min(rows, round(math.sqrt(rows))))
    k = int(setting)
    if k < 1:
        raise ValueError(f"dedup.kmeans.n_clusters must be >= 1 or auto, got {setting}")
    return min(k, rows)


def fit_sample_size(rows: int, k: int, fit_fraction: float, min_rows_per_cluster: int) -> int:
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"dedup.kmeans.fit_fraction must be in (0, 1], got {fit_fraction}")
    return min(rows, max(math.ceil(fit_fraction * rows), k * int(min_rows_per_cluster)))


def fingerprint(source: DedupSource, settings: dict[str, Any]) -> str:
    """Everything a dedup result depends on except eps."""
    key = {"table": source.uri, "id": source.id_column, "vector": source.vector_column, "where": source.where,
           "settings": {k: v for k, v in settings.items() if k not in ("eps", "eps_table")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dedup_settings(cfg: DictConfig) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.dedup, resolve=True)
    for node in ("kmeans", "assign", "pairwise"):
        settings.get(node, {}).pop("resources", None)
    for key in ("table", "id_column", "vector_column", "where"):
        settings.pop(key, None)
    return settings


# ------------------------------------------------------------------ the run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Dedup the table; returns the summary written to OUT/dedup/summary.json."""
    started = time.perf_counter()
    layout = outputs.OutputLayout(str(cfg.output))
    storage_options = outputs.storage_options(cfg)
    lance_options = lance_storage_options(storage_options)
    source = DedupSource(cfg, layout, lance_options)
    eps = float(cfg.dedup.eps)
    if not 0 <= eps < 1:
        raise ValueError(f"dedup.eps must be in [0, 1), got {eps}")
    if str(cfg.dedup.shuffle) not in SHUFFLES:
        raise ValueError(f"unknown dedup.shuffle={cfg.dedup.shuffle!r}; choose one of {sorted(SHUFFLES)}")
    files = DedupFiles(layout, storage_options)
    settings = dedup_settings(cfg)
    print_ = fingerprint(source, settings)
    previous = files.read_summary()
    timings: dict[str, float] = {}
    if _reusable(previous, source, print_):
        log.info("dedup: only eps changed since the last run; rewriting `duplicate`")
        results, info = _previous_results(source), dict(previous["run"])
        info["reused"] = True
        columns = ["duplicate"]
    else:
        results, info, timings = _compute(cfg, source)
        info["reused"] = False
        columns = DEDUP_COLUMNS
    duplicate = _duplicates(results, eps)
    values = results.append_column("duplicate", pa.array(duplicate))
    values = _table_columns(values)
    t = time.perf_counter()
    table = write_columns(source.dataset, values, [f for f in CLIP_DEDUP_FIELDS if f.name in columns], lance_options)
    timings["write_table_s"] = time.perf_counter() - t

    summary = {
        "table": source.uri,
        "table_version": table.version,
        "rows": source.total_rows,
        "considered": int(results.num_rows),
        "eps": eps,
        "kept": int(results.num_rows - duplicate.sum()),
        "removed": int(duplicate.sum()),
        "columns_written": columns,
        "fingerprint": print_,
        "input_signature": _jsonable(source.signature()),
        "run": info,
        "config": outputs.redacted_config(cfg).get("dedup"),
    }
    t = time.perf_counter()
    summary["files"] = files.write(results, duplicate, eps, [float(e) for e in cfg.dedup.eps_table], info)
    timings["write_files_s"] = time.perf_counter() - t
    summary["wall_s"] = {**timings, "total": time.perf_counter() - started}
    files.write_summary(summary)
    return summary


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _reusable(previous: dict[str, Any] | None, source: DedupSource, print_: str) -> bool:
    if not previous or previous.get("fingerprint") != print_ or previous.get("table") != source.uri:
        return False
    if not set(DEDUP_COLUMNS) <= set(source.dataset.schema.names):
        return False
    return previous.get("input_signature") == _jsonable(source.signature())


def _previous_results(source: DedupSource) -> pa.Table:
    """The pairwise results stored in the table by the last run."""
    cols = ["dedup_cluster", "dedup_centroid_dist", "dedup_max_sim", "dedup_max_id", source.id_column]
    t = source.dataset.to_table(columns=cols, filter="dedup_cluster IS NOT NULL", with_row_id=True,
                                with_row_address=True)
    return pa.Table.from_arrays([
        t.column("_rowaddr").cast(pa.uint64()), t.column("_rowid").cast(pa.uint64()),
        t.column(source.id_column).cast(pa.string()), t.column("dedup_cluster"), t.column("dedup_centroid_dist"),
        t.column("dedup_max_sim"), t.column("dedup_max_id"),
    ], schema=DEDUP_PAIRWISE_SCHEMA)


def _duplicates(results: pa.Table, eps: float) -> np.ndarray:
    sim = results.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
    return np.nan_to_num(sim, nan=-np.inf) >= 1.0 - eps


def _table_columns(values: pa.Table) -> pa.Table:
    names = {"cluster": "dedup_cluster", "centroid_dist": "dedup_centroid_dist", "max_sim": "dedup_max_sim",
             "max_id": "dedup_max_id"}
    return values.rename_columns([names.get(n, n) for n in values.column_names])


@dataclass
class FitSample:
    """The rows k-means is fitted on, and what was decided from them."""

    matched: int  # rows `where` selects
    k: int
    x: np.ndarray  # (m, dim) unit rows
    dim: int
    skipped: dict[str, int]  # unusable sampled rows by reason


def sample_for_fit(source: DedupSource, kmeans_node: dict[str, Any], seed: int) -> FitSample:
    row_ids = source.matching_row_ids()
    if len(row_ids) == 0:
        raise ValueError(f"nothing to dedup: no row of {source.uri} matches dedup.where={source.where!r}")
    from udfs.dedup.vectors import vectors_from_arrow

    k = resolve_n_clusters(kmeans_node.get("n_clusters"), len(row_ids))
    m = fit_sample_size(len(row_ids), k, float(kmeans_node.get("fit_fraction", 0.1)),
                        int(kmeans_node.get("min_rows_per_cluster", 40)))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(row_ids, m, replace=False)) if m < len(row_ids) else row_ids
    column = take_rows(source.dataset, picked.tolist(), [source.vector_column]).column(source.vector_column)
    dim = source.fixed_dim or _common_length(column)
    x, reason = vectors_from_arrow(column, dim)
    if len(x) == 0:
        raise ValueError(f"no usable vectors in {source.uri}.{source.vector_column}: a sample of {m} rows had "
                         f"only {_counts(reason)}")
    return FitSample(matched=len(row_ids), k=min(k, len(x)), x=x, dim=dim, skipped=_counts(reason))


def _compute(cfg: DictConfig, source: DedupSource) -> tuple[pa.Table, dict[str, Any], dict[str, float]]:
    """k-means fit, assignment and the pairwise pass; the DEDUP_PAIRWISE_SCHEMA rows."""
    dcfg = cfg.dedup
    kmeans_node = node_dict(cfg.dedup, "kmeans")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    sample = sample_for_fit(source, kmeans_node, int(dcfg.seed))
    timings["sample_s"] = time.perf_counter() - t

    ensure_ray(cfg.ray, progress_bars=bool(cfg.log.ray_progress))
    cpus, gpus = cluster_resources()
    params = {key: v for key, v in stage_params(kmeans_node).items() if key not in KMEANS_ENGINE_KEYS}
    t = time.perf_counter()
    fit = fit_kmeans(sample.x, {**params, "n_clusters": sample.k}, kmeans_node.get("resources") or {}, gpus)
    timings["fit_s"] = time.perf_counter() - t

    results, skipped, stage_times, phase_s = assign_and_compare(cfg, source, fit.centroids, sample.dim, cpus, gpus)
    timings.update(phase_s)
    sizes = np.bincount(results.column("cluster").to_numpy(), minlength=sample.k)
    info = {
        "matched_rows": sample.matched,
        "skipped": skipped,
        "dim": sample.dim,
        "n_clusters": sample.k,
        "fit_rows": len(sample.x),
        "fit_skipped": sample.skipped,
        "kmeans": {"backend": fit.backend, "n_iter": fit.n_iter, "inertia": fit.inertia,
                   "converged": fit.converged, "init_s": fit.init_s, "fit_s": fit.fit_s},
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                          "empty": int((sizes == 0).sum())},
        "stages": stage_times,
        "centroids": fit.centroids,
    }
    return results.sort_by("_rowaddr"), info, timings


def assign_and_compare(cfg: DictConfig, source: DedupSource, centroids: np.ndarray, dim: int, cpus: float,
                       gpus: float) -> tuple[pa.Table, dict[str, int], dict[str, Any], dict[str, float]]:
    """Every row to its nearest centroid (map_batches on an actor pool), then
    one pairwise call per cluster (groupby + map_groups). Returns the
    pairwise rows, skipped rows by reason, stage busy times, phase seconds."""
    from udfs.dedup.kmeans import KMeansAssign
    from udfs.dedup.pairwise import ClusterPairwise

    dcfg = cfg.dedup
    assign_step = StageStep.from_node("dedup_assign", KMeansAssign, dcfg.assign, params={
        "centroids": centroids, "id_column": source.id_column, "vector_column": source.vector_column})
    pair_step = StageStep.from_node("dedup_pairwise", ClusterPairwise, dcfg.pairwise, params={
        "table": source.uri, "version": source.version, "storage_options": source.storage_options,
        "vector_column": source.vector_column, "dim": dim, "seed": int(dcfg.seed), "keep": str(dcfg.keep)})
    check_gpus([assign_step, pair_step], gpus)
    for step in (assign_step, pair_step):
        # Torch threads = the CPUs each worker was given, not every core.
        step.params.setdefault("threads", max(1, int(step.num_cpus)))
    phase_s: dict[str, float] = {}
    clock, clock_name = start_clock(uuid.uuid4().hex[:12])
    try:
        t = time.perf_counter()
        scan = {"with_row_id": True, "with_row_address": True}
        if source.where:
            scan["filter"] = source.where  # Lance SQL, applied by Lance's scanner
        data = ray.data.read_lance(source.uri, version=source.version, columns=[source.id_column, source.vector_column],
                                   storage_options=source.storage_options, scanner_options=scan)
        assigned = apply_stage(data, assign_step, clock_name, cpus, gpus).materialize()
        skipped = _skip_counts(assigned)
        phase_s["assign_s"] = time.perf_counter() - t

        t = time.perf_counter()
        k = len(centroids)
        clustered = assigned.filter(expr=col("cluster") >= 0)
        # Sort-based shuffle by default: it runs as plain tasks, where the hash
        # shuffle starts aggregator actors (seconds of overhead on small runs).
        clustered.context.shuffle_strategy = SHUFFLES[str(dcfg.shuffle)]
        partitions = int(dcfg.get("shuffle_partitions") or max(1, min(k, 4 * int(cpus))))
        pairs = clustered.groupby("cluster", num_partitions=partitions).map_groups(
            timed(ClusterPairwise, pair_step.name, clock_name), fn_constructor_kwargs=pair_step.params,
            batch_format="pyarrow", compute=actor_pool(pair_step, cpus, gpus), num_cpus=pair_step.num_cpus,
            num_gpus=pair_step.num_gpus or None)
        results = pa.concat_tables([DEDUP_PAIRWISE_SCHEMA.empty_table(), *ray.get(pairs.to_arrow_refs())])
        phase_s["pairwise_s"] = time.perf_counter() - t
        stage_times = ray.get(clock.snapshot.remote())
    finally:
        ray.kill(clock)
    return results, skipped, stage_times, phase_s


def fit_kmeans(x: np.ndarray, params: dict[str, Any], resources: dict[str, Any], cluster_gpus: float):
    """The k-means fit: in this process on CPU (no worker to start; the fit
    is a barrier, so it may use every core here), or as one Ray task on a
    GPU worker when `resources.num_gpus` asks for one."""
    num_gpus = float(resources.get("num_gpus") or 0)
    threads = int(resources.get("num_cpus") or 0) or None
    if num_gpus <= 0:
        return _fit_kmeans(x, params, threads)
    if cluster_gpus <= 0:
        raise RuntimeError("dedup.kmeans asks for a GPU but the cluster has none; "
                           "set dedup.kmeans.resources.num_gpus=0 to fit on CPU")
    remote = ray.remote(num_cpus=float(resources.get("num_cpus") or 1), num_gpus=num_gpus)(_fit_kmeans)
    return ray.get(remote.remote(ray.put(x), params, threads))


def _fit_kmeans(x: np.ndarray, params: dict[str, Any], threads: int | None):
    from udfs.dedup.kmeans import KMeans

    return KMeans(**params, threads=threads).fit(x)


def _common_length(column: pa.ChunkedArray) -> int:
    lengths = pc.drop_null(pc.list_value_length(column)).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        raise ValueError("every sampled vector is null: nothing to dedup")
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[np.argmax(counts)])


def _counts(reason: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.asarray([r for r in reason if r is not None], dtype=object).astype(str),
                               return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def _skip_counts(assigned: ray.data.Dataset) -> dict[str, int]:
    skipped = assigned.filter(expr=col("cluster") < 0).select_columns(["skip"])
    tables = ray.get(skipped.to_arrow_refs())
    if not tables:
        return {}
    counts = pc.value_counts(pa.concat_tables(tables).column("skip").combine_chunks())
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


# ------------------------------------------------------------------ OUT/dedup/
class DedupFiles:
    """The task's files under OUT/dedup/."""

    def __init__(self, layout: outputs.OutputLayout, storage_options: dict[str, Any] | None) -> None:
        self.root = layout.path("dedup")
        self.storage_options = storage_options
        self.remote = bool(scheme_of(self.root))
        self.fs, self.base = arrow_fs(self.root, storage_options) if self.remote else (None, self.root)
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _open(self, path: str, mode: str = "wb"):
        if self.fs is not None:
            return self.fs.open_output_stream(path) if "w" in mode else self.fs.open_input_stream(path)
        return open(path, mode)

    def read_summary(self) -> dict[str, Any] | None:
        try:
            with self._open(self.path("summary.json"), "rb") as fh:
                return json.loads(fh.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        with self._open(self.path("summary.json")) as fh:
            fh.write(json.dumps(summary, indent=2, default=str).encode())

    def write(self, results: pa.Table, duplicate: np.ndarray, eps: float, eps_table: list[float],
              info: dict[str, Any]) -> dict[str, str]:
        written: dict[str, str] = {}
        centroids = info.pop("centroids", None)
        if centroids is not None:
            buf = io.BytesIO()
            np.save(buf, centroids)
            with self._open(self.path("centroids.npy")) as fh:
                fh.write(buf.getvalue())
        written["centroids"] = self.path("centroids.npy")
        if not info.get("reused"):
            written["pruning"] = self._write_parquet(pruning_table(results), "pruning.parquet")
        else:
            written["pruning"] = self.path("pruning.parquet")
        ids = pc.filter(results.column("id"), pa.array(duplicate)).combine_chunks()
        dup = pa.table({"id": ids.take(pc.array_sort_indices(ids))})
        dup = dup.replace_schema_metadata({"eps": str(eps)})
        if self.fs is None:
            shutil.rmtree(self.path("duplicates"), ignore_errors=True)
            os.makedirs(self.path("duplicates"), exist_ok=True)
        else:
            self.fs.delete_dir_contents(self.path("duplicates"), missing_dir_ok=True)
        written["duplicates"] = self._write_parquet(dup, "duplicates", "duplicates.parquet")
        rows = summary_table(results, sorted({*eps_table, eps}))
        with self._open(self.path("dedup_summary.csv")) as fh:
            fh.write(("eps,kept,removed,total\n" + "".join(
                f"{r['eps']},{r['kept']},{r['removed']},{r['total']}\n" for r in rows)).encode())
        written["summary_csv"] = self.path("dedup_summary.csv")
        return written

    def _write_parquet(self, table: pa.Table, *parts: str) -> str:
        path = self.path(*parts)
        pq.write_table(table, path, filesystem=self.fs)
        return path


def pruning_table(results: pa.Table) -> pa.Table:
    """NeMo Curator / Cosmos-Curate's pairwise result: id, max_id,
    cosine_sim_score, one row per considered member; a cluster's top-ranked
    member points at itself with score 0, and scores are clamped at 0, as
    NeMo's upper-triangle max produces them."""
    sim = results.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
    top = np.isnan(sim)
    score = np.where(top, 0.0, np.maximum(sim, 0.0)).astype(np.float32)
    max_id = pc.if_else(pa.array(top), results.column("id"), results.column("max_id"))
    return pa.table({"id": results.column("id"), "max_id": max_id, "cosine_sim_score": pa.array(score)})


def summary_table(results: pa.Table, eps_values: list[float]) -> list[dict[str, Any]]:
    """Kept / removed at each eps, so users can pick eps from their data."""
    sim = results.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
    sim = np.nan_to_num(sim, nan=-np.inf)
    total = int(results.num_rows)
    rows = []
    for eps in eps_values:
        removed = int((sim >= 1.0 - eps).sum())
        rows.append({"eps": eps, "kept": total - removed, "removed": removed, "total": total})
    return rows
