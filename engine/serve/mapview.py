"""The map panel: the stored projection, coloured by a column, answered as
points when the view holds few enough, else as bins over the view (a canvas
draws either; a million points never cross the wire)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.serve.columns import TableColumns

TOP_CATEGORIES = 12
# Categorical however they are typed: a cluster number or a video id is a name, not a quantity.
CATEGORICAL = ("passed", "duplicate", "cut_inside", "camera_motion", "video_id", "dedup_cluster", "label")


def missing_reason(vector_column: str | None) -> str | None:
    if vector_column is None:
        return ("the table has no embedding column: the map projects clip embeddings (curate with "
                "embed=clip, or a table with a vector column)")
    return None


class MapView:
    def __init__(self, cols: TableColumns, projection: pa.Table, max_points: int, bins: int) -> None:
        self.cols = cols
        self.max_points = max_points
        self.bins = bins
        self.methods = [m for m in ("pca", "umap") if f"{m}_x" in projection.column_names]
        self.xy = {m: (pc.fill_null(projection.column(f"{m}_x"), float("nan")).to_numpy().astype(np.float64),
                       pc.fill_null(projection.column(f"{m}_y"), float("nan")).to_numpy().astype(np.float64))
                   for m in self.methods}

    def colour_columns(self, score_columns: list[str]) -> list[str]:
        present = [c for c in CATEGORICAL if c == "label" or self.cols.has(c)]
        return [*score_columns, *present]

    def colour(self, column: str | None, labels: pa.Table | None) -> tuple[str, np.ndarray, dict[str, Any]]:
        """(kind, per-row values, legend): numeric values (NaN: none) or category codes (-1: none)."""
        n = self.cols.rows
        if not column:
            return "none", np.zeros(n), {}
        if column == "label":
            codes = np.full(n, -1, dtype=np.int64)
            if labels is not None and labels.num_rows:
                at = self.cols.positions(labels.column("clip_id").to_pylist())
                kinds = labels.column("label").to_pylist()
                for pos, kind in zip(at, kinds):
                    if pos >= 0 and kind in ("accept", "reject"):
                        codes[pos] = 0 if kind == "accept" else 1
            return "category", codes, {"categories": ["accept", "reject"]}
        if not self.cols.has(column):
            raise ValueError(f"no column {column!r} to colour by")
        col = self.cols.column(column)
        if column in CATEGORICAL or not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            text = pc.cast(col, pa.string())
            counts = pc.value_counts(pc.drop_null(text)).to_pylist()
            top = [c["values"] for c in sorted(counts, key=lambda c: (-c["counts"], c["values"]))[:TOP_CATEGORIES]]
            idx = pc.index_in(text, value_set=pa.array(top, pa.string()))
            codes = pc.fill_null(idx, len(top)).to_numpy().astype(np.int64)
            codes[pc.is_null(text).to_numpy(zero_copy_only=False)] = -1
            categories = top + (["other"] if len(counts) > len(top) else [])
            legend: dict[str, Any] = {"categories": categories}
            if column == "video_id" and self.cols.has("source_uri"):
                # A video id is a hash: the legend names each by its source file.
                sources = self.cols.column("source_uri")
                firsts = [int(np.argmax(codes == k)) for k in range(len(top))]
                legend["names"] = [os.path.basename(str(u or v)) for u, v in
                                   zip(pc.take(sources, pa.array(firsts, pa.int64())).to_pylist(), top)]
                legend["names"] += categories[len(top):]
            return "category", codes, legend
        values = self.cols.numeric(column)
        finite = values[np.isfinite(values)]
        legend = {"min": float(finite.min()), "max": float(finite.max())} if len(finite) else {"min": 0, "max": 1}
        return "numeric", values, legend

    def answer(self, method: str, column: str | None, view: tuple[float, float, float, float] | None,
               labels: pa.Table | None) -> dict[str, Any]:
        if method not in self.methods:
            raise ValueError(f"no {method!r} projection; have {self.methods}")
        x, y = self.xy[method]
        valid = np.isfinite(x) & np.isfinite(y)
        if not valid.any():
            return {"method": method, "mode": "points", "n": 0, "points": [], "extent": None}
        extent = [float(x[valid].min()), float(x[valid].max()), float(y[valid].min()), float(y[valid].max())]
        x0, x1, y0, y1 = view or extent
        if x1 <= x0 or y1 <= y0:
            x1, y1 = x0 + 1e-9, y0 + 1e-9
        inside = valid & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        at = np.flatnonzero(inside)
        kind, values, legend = self.colour(column, labels)
        out: dict[str, Any] = {"method": method, "color": column, "kind": kind, "legend": legend, "n": len(at),
                               "extent": extent, "view": [x0, x1, y0, y1], "methods": self.methods}
        if len(at) <= self.max_points:
            c = values[at]
            out.update(mode="points", ids=self.cols.ids(at), x=np.round(x[at], 5).tolist(),
                       y=np.round(y[at], 5).tolist(),
                       c=[None if not np.isfinite(v) else (int(v) if kind == "category" else round(float(v), 5))
                          for v in c])
            return out
        b = self.bins
        ix = np.minimum(((x[at] - x0) / (x1 - x0) * b).astype(np.int64), b - 1)
        iy = np.minimum(((y[at] - y0) / (y1 - y0) * b).astype(np.int64), b - 1)
        cell = ix * b + iy
        counts = np.bincount(cell, minlength=b * b)
        used = np.flatnonzero(counts)
        c = values[at]
        if kind == "category":
            k = len(legend["categories"]) + 1
            votes = np.bincount(cell * k + np.where(c >= 0, c, k - 1).astype(np.int64), minlength=b * b * k)
            colour = votes.reshape(b * b, k)[used].argmax(axis=1)
            colour = np.where(colour == k - 1, -1, colour).tolist()
        else:
            ok = np.isfinite(c)
            total = np.bincount(cell[ok], weights=c[ok], minlength=b * b)
            n_ok = np.bincount(cell[ok], minlength=b * b)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = total[used] / n_ok[used]
            colour = [None if not np.isfinite(v) else round(float(v), 5) for v in mean]
        out.update(mode="bins", bins=b, ix=(used // b).tolist(), iy=(used % b).tolist(),
                   count=counts[used].tolist(), c=colour)
        return out

    def select(self, method: str, polygon: list[tuple[float, float]]) -> np.ndarray:
        """Row positions inside `polygon` (even-odd rule; a box is four corners)."""
        if method not in self.methods:
            raise ValueError(f"no {method!r} projection; have {self.methods}")
        if len(polygon) < 3:
            raise ValueError("a selection needs at least three corners")
        x, y = self.xy[method]
        px = np.array([p[0] for p in polygon])
        py = np.array([p[1] for p in polygon])
        box = np.isfinite(x) & (x >= px.min()) & (x <= px.max()) & (y >= py.min()) & (y <= py.max())
        at = np.flatnonzero(box)
        xs, ys = x[at], y[at]
        inside = np.zeros(len(at), dtype=bool)
        j = len(polygon) - 1
        for i in range(len(polygon)):
            xi, yi, xj, yj = px[i], py[i], px[j], py[j]
            crosses = (yi > ys) != (yj > ys)
            with np.errstate(invalid="ignore", divide="ignore"):
                xcross = (xj - xi) * (ys - yi) / (yj - yi) + xi
            inside ^= crosses & (xs < xcross)
            j = i
        return at[inside]
