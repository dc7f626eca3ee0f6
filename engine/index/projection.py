"""The 2-D map of the clip embeddings: PCA always, UMAP when umap-learn is
installed, stored beside the table (`OUT/clips.map.parquet`).

Both are fitted on a seeded sample (`fit_rows`) and every row is projected
in scan order, batch by batch, so memory holds the sample, not the vectors.
The file records the table version and the ids in scan order: a file whose
version differs but whose ids are the table's (dedup or index added a
version, no row changed) is still the map; one whose rows differ is stale
and recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from udfs.uris import arrow_fs, scheme_of

log = logging.getLogger(__name__)

BATCH_ROWS = 65536
# Rows re-projected to tell a map whose table kept its ids but changed its
# vectors (a curate re-run with another model) from one still current.
CHECK_ROWS = 32


def projection_uri(table_uri: str) -> str:
    """OUT/clips.lance -> OUT/clips.map.parquet."""
    root = str(table_uri).rstrip("/")
    return (root[:-len(".lance")] if root.endswith(".lance") else root) + ".map.parquet"


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, x / norm, np.nan)


def _vectors(batch: pa.Table | pa.RecordBatch, column: str, dim: int) -> np.ndarray:
    """Unit vectors of a batch; NaN rows where the vector is null."""
    col = batch.column(column)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    out = np.full((len(col), dim), np.nan, dtype=np.float32)
    if valid.any():
        flat = pc.list_flatten(pc.filter(col, pa.array(valid))).to_numpy(zero_copy_only=False)
        out[valid] = flat.reshape(-1, dim)
    return _unit(out)


def compute(ds: lance.LanceDataset, vector_column: str, id_column: str, *, fit_rows: int, seed: int,
            umap: str | bool) -> pa.Table:
    """(id, pca_x, pca_y[, umap_x, umap_y]) of every row, in scan order."""
    dim = ds.schema.field(vector_column).type.list_size
    n = ds.count_rows()
    rng = np.random.default_rng(seed)
    sample_at = np.sort(rng.choice(n, size=min(n, fit_rows), replace=False)) if n else np.array([], np.int64)
    sample = _vectors(ds.take(sample_at, columns=[vector_column]), vector_column, dim) if n else np.zeros((0, dim))
    sample = sample[~np.isnan(sample).any(axis=1)].astype(np.float64)
    if len(sample) < 2:
        raise ValueError(f"{vector_column}: fewer than two vectors to project")
    mean = sample.mean(axis=0)
    # The top two eigenvectors of the sample covariance (dim x dim: cheap for any row count).
    _, vecs = np.linalg.eigh(np.cov((sample - mean).T))
    axes = vecs[:, ::-1][:, :2]
    reducer = None
    if umap is True or (umap == "auto" and umap_available()):
        import umap as umap_lib

        reducer = umap_lib.UMAP(n_components=2, random_state=seed).fit(sample)
    ids, xs, ys, us, vs = [], [], [], [], []
    for batch in ds.to_batches(columns=[id_column, vector_column], batch_size=BATCH_ROWS):
        v = _vectors(batch, vector_column, dim)
        ok = ~np.isnan(v).any(axis=1)
        p = np.full((len(v), 2), np.nan)
        p[ok] = (v[ok] - mean) @ axes
        ids.append(batch.column(id_column))
        xs.append(p[:, 0])
        ys.append(p[:, 1])
        if reducer is not None:
            u = np.full((len(v), 2), np.nan)
            if ok.any():
                u[ok] = reducer.transform(v[ok])
            us.append(u[:, 0])
            vs.append(u[:, 1])
    columns: dict[str, Any] = {"id": pa.chunked_array(ids, pa.string()) if ids else pa.array([], pa.string()),
                               "pca_x": np.concatenate(xs).astype(np.float32),
                               "pca_y": np.concatenate(ys).astype(np.float32)}
    if reducer is not None:
        columns.update(umap_x=np.concatenate(us).astype(np.float32), umap_y=np.concatenate(vs).astype(np.float32))
    meta = {"table_version": version_key(ds), "vector_column": vector_column, "fit_rows": str(len(sample)),
            "seed": str(seed), "pca": json.dumps({"mean": mean.tolist(), "axes": axes.T.tolist()})}
    return pa.table(columns).replace_schema_metadata(meta)


def version_key(ds: lance.LanceDataset) -> str:
    """The table version and when it was written: a table overwritten by a
    fresh curate counts its versions from 1 again."""
    when = next((str(v["timestamp"]) for v in ds.versions() if v["version"] == ds.version), "")
    return f"{ds.version}@{when}"


def _check_rows(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, CHECK_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)


def _read(uri: str, storage_options: dict[str, Any] | None) -> pa.Table | None:
    try:
        if scheme_of(uri):
            fs, path = arrow_fs(uri, storage_options)
            return pq.read_table(path, filesystem=fs)
        return pq.read_table(uri)
    except (OSError, ValueError, pa.ArrowException):
        return None


def _write(table: pa.Table, uri: str, storage_options: dict[str, Any] | None) -> None:
    if scheme_of(uri):
        fs, path = arrow_fs(uri, storage_options)
        pq.write_table(table, path, filesystem=fs)
    else:
        tmp = uri + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, uri)  # a reader never sees half a file


def is_current(stored: pa.Table, ds: lance.LanceDataset, vector_column: str, id_column: str) -> bool:
    """Whether `stored` is the map of `ds`: made at its version, or at
    another with the same ids in the same order whose sampled vectors still
    project where the map put them."""
    meta = {k.decode(): v.decode() for k, v in (stored.schema.metadata or {}).items()}
    if meta.get("vector_column") != vector_column or "id" not in stored.column_names:
        return False
    if meta.get("table_version") == version_key(ds):
        return True
    ids = ds.to_table(columns=[id_column]).column(id_column)
    if len(ids) != stored.num_rows or not ids.cast(pa.string()).equals(stored.column("id")):
        return False
    try:
        pca = json.loads(meta["pca"])
        mean, axes = np.asarray(pca["mean"]), np.asarray(pca["axes"]).T
    except (KeyError, ValueError):
        return False
    at = _check_rows(stored.num_rows)
    dim = ds.schema.field(vector_column).type.list_size
    v = _vectors(ds.take(at, columns=[vector_column]), vector_column, dim)
    if v.shape[1] != len(mean):
        return False
    again = (v - mean) @ axes
    kept = np.c_[stored.column("pca_x").take(pa.array(at)).to_numpy(zero_copy_only=False),
                 stored.column("pca_y").take(pa.array(at)).to_numpy(zero_copy_only=False)]
    return bool(np.allclose(again, kept, atol=1e-4, equal_nan=True))


def ensure(ds: lance.LanceDataset, table_uri: str, *, vector_column: str, id_column: str, fit_rows: int, seed: int,
           umap: str | bool, storage_options: dict[str, Any] | None, write: bool) -> tuple[pa.Table, str]:
    """The map of `ds` and where it came from ("stored" or "computed"); a
    computed map is stored unless `write` is false. `storage_options` in
    pyarrow's form."""
    uri = projection_uri(table_uri)
    stored = _read(uri, storage_options)
    wants_umap = umap is True or (umap == "auto" and umap_available())
    if stored is not None and is_current(stored, ds, vector_column, id_column) and \
            (not wants_umap or "umap_x" in stored.column_names):  # umap-learn installed since: project again
        return stored, "stored"
    log.info("map: projecting %s (%s)", vector_column, "stale" if stored is not None else "first use")
    table = compute(ds, vector_column, id_column, fit_rows=fit_rows, seed=seed, umap=umap)
    if write:
        _write(table, uri, storage_options)
    return table, "computed"


def for_index(ds: lance.LanceDataset, *, vector_column: str, id_column: str, node: Any,
              storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """task=index's map step: the projection beside the table, made or
    confirmed current; `node` is the `serve.map` config node."""
    import time

    if not node.get("on_index", True):
        return {"status": "skipped", "reason": "serve.map.on_index=false (the UI projects on first use)"}
    if vector_column not in ds.schema.names:
        return {"status": "skipped", "reason": f"the table has no {vector_column!r} column"}
    started = time.perf_counter()
    try:
        table, source = ensure(ds, ds.uri, vector_column=vector_column, id_column=id_column,
                               fit_rows=int(node.fit_rows), seed=int(node.seed), umap=node.umap,
                               storage_options=storage_options, write=True)
    except ValueError as exc:
        return {"status": "skipped", "reason": str(exc)}
    methods = [m for m in ("pca", "umap") if f"{m}_x" in table.column_names]
    return {"status": source, "path": projection_uri(ds.uri), "rows": table.num_rows, "methods": methods,
            "wall_s": round(time.perf_counter() - started, 2)}
