"""The task's files under OUT/dedup/: what a later eps-only or incremental
run needs (summary.json, centroids, edges, boundary members) and what users
read (duplicates/, pruning.parquet, dedup_summary.csv)."""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.store import outputs
from udfs.uris import arrow_fs, scheme_of

# OUT/dedup/boundary.parquet: every boundary membership (a row also compared
# in `cluster`, across the bisector it is near), for incremental runs.
BOUNDARY_SCHEMA = pa.schema([pa.field("_rowid", pa.uint64()), pa.field("cluster", pa.int32()),
                             pa.field("centroid_dist", pa.float32())])


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

    def read_centroids(self) -> np.ndarray:
        with self._open(self.path("centroids.npy"), "rb") as fh:
            return np.load(io.BytesIO(fh.read()))

    def read_table(self, name: str) -> pa.Table | None:
        try:
            return pq.read_table(self.path(name), filesystem=self.fs)
        except (FileNotFoundError, OSError):
            return None

    def write_state(self, centroids: np.ndarray | None, edges: pa.Table | None, boundary: pa.Table | None,
                    pruning: pa.Table | None) -> dict[str, str]:
        """What later runs read back; None: unchanged (an eps-only run)."""
        written = {"centroids": self.path("centroids.npy")}
        if centroids is not None:
            buf = io.BytesIO()
            np.save(buf, centroids)
            with self._open(self.path("centroids.npy")) as fh:
                fh.write(buf.getvalue())
        for key, table in (("edges", edges), ("boundary", boundary), ("pruning", pruning)):
            written[key] = self.path(f"{key}.parquet")
            if table is not None:
                self._write_parquet(table, f"{key}.parquet")
        return written

    def write_decisions(self, results: pa.Table, duplicate: np.ndarray, eps: float,
                        sweep: list[dict[str, Any]]) -> dict[str, str]:
        written: dict[str, str] = {}
        ids = pc.filter(results.column("id"), pa.array(duplicate)).combine_chunks()
        dup = pa.table({"id": ids.take(pc.array_sort_indices(ids))})
        dup = dup.replace_schema_metadata({"eps": str(eps)})
        if self.fs is None:
            shutil.rmtree(self.path("duplicates"), ignore_errors=True)
            os.makedirs(self.path("duplicates"), exist_ok=True)
        else:
            self.fs.delete_dir_contents(self.path("duplicates"), missing_dir_ok=True)
        written["duplicates"] = self._write_parquet(dup, "duplicates", "duplicates.parquet")
        with self._open(self.path("dedup_summary.csv")) as fh:
            fh.write(("eps,kept,removed,total\n" + "".join(
                f"{r['eps']},{r['kept']},{r['removed']},{r['total']}\n" for r in sweep)).encode())
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
