"""k-means for task=dedup: how many clusters, which rows it is fitted on,
and where the fit runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from engine.dedup.source import DedupSource
from udfs.lance_rows import take_rows


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
    m = fit_sample_size(len(row_ids), k, float(kmeans_node["fit_fraction"]), int(kmeans_node["min_rows_per_cluster"]))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(row_ids, m, replace=False)) if m < len(row_ids) else row_ids
    column = take_rows(source.dataset, picked.tolist(), [source.vector_column]).column(source.vector_column)
    dim = source.fixed_dim or common_length(column)
    x, reason = vectors_from_arrow(column, dim)
    if len(x) == 0:
        raise ValueError(f"no usable vectors in {source.uri}.{source.vector_column}: a sample of {m} rows had "
                         f"only {reason_counts(reason)}")
    return FitSample(matched=len(row_ids), k=min(k, len(x)), x=x, dim=dim, skipped=reason_counts(reason))


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


def common_length(column: pa.ChunkedArray) -> int:
    lengths = pc.drop_null(pc.list_value_length(column)).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        raise ValueError("every sampled vector is null: nothing to dedup")
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[np.argmax(counts)])


def reason_counts(reason: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.asarray([r for r in reason if r is not None], dtype=object).astype(str),
                               return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
