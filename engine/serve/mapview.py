"""The map panel: the stored projection, coloured by a column, answered as
points when the view holds few enough, else as bins over the view (a canvas
draws either; a million points never cross the wire)."""

from __future__ import annotations

import base64
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.serve.columns import TableColumns

TOP_CATEGORIES = 12
VIEW_CACHE = 8
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
        self._colours: dict[str, tuple[str, np.ndarray, dict[str, Any]]] = {}
        self._indexes: dict[str, tuple[list[float] | None, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._views: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.methods = [m for m in ("pca", "umap") if f"{m}_x" in projection.column_names]
        self.xy = {m: (pc.fill_null(projection.column(f"{m}_x"), float("nan")).to_numpy().astype(np.float64),
                       pc.fill_null(projection.column(f"{m}_y"), float("nan")).to_numpy().astype(np.float64))
                   for m in self.methods}

    def colour_columns(self, score_columns: list[str]) -> list[str]:
        present = [c for c in CATEGORICAL if c == "label" or self.cols.has(c)]
        return [*score_columns, *present]

    def colour(self, column: str | None, labels: pa.Table | None) -> tuple[str, np.ndarray, dict[str, Any]]:
        """(kind, per-row values, legend): numeric values (NaN: none) or
        category codes (-1: none). Cached per column (the table is a snapshot
        while served), so a pan or a colour change back is binning only."""
        if column and column != "label":
            with self._lock:
                if column in self._colours:
                    return self._colours[column]
        answer = self._colour(column, labels)
        if column and column != "label":
            with self._lock:
                self._colours[column] = answer
        return answer

    def _colour(self, column: str | None, labels: pa.Table | None) -> tuple[str, np.ndarray, dict[str, Any]]:
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

    def _index(self, method: str) -> tuple[list[float] | None, np.ndarray, np.ndarray, np.ndarray]:
        """(extent, x, y, row positions) of the projected rows, sorted by x
        once: a view's points are a binary-searched slice, filtered by y."""
        with self._lock:
            if method in self._indexes:
                return self._indexes[method]
        x, y = self.xy[method]
        at = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
        at = at[np.argsort(x[at], kind="stable")]
        xs, ys = x[at], y[at]
        extent = [float(xs[0]), float(xs[-1]), float(ys.min()), float(ys.max())] if len(at) else None
        with self._lock:
            self._indexes[method] = (extent, xs, ys, at)
        return self._indexes[method]

    def _cells(self, method: str, view: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray | None]:
        """(row positions inside `view`, their bin when binned, else None);
        the last few views are kept, so a colour change is only the colouring."""
        key = (method, view)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        _, xs, ys, pos = self._index(method)
        x0, x1, y0, y1 = view
        lo, hi = int(np.searchsorted(xs, x0, side="left")), int(np.searchsorted(xs, x1, side="right"))
        yin = (ys[lo:hi] >= y0) & (ys[lo:hi] <= y1)
        at = pos[lo:hi][yin]
        cell = None
        if len(at) > self.max_points:
            b = self.bins
            ix = np.minimum(((xs[lo:hi][yin] - x0) * (b / (x1 - x0))).astype(np.int64), b - 1)
            iy = np.minimum(((ys[lo:hi][yin] - y0) * (b / (y1 - y0))).astype(np.int64), b - 1)
            cell = ix * b + iy
        with self._lock:
            self._views[key] = (at, cell)
            while len(self._views) > VIEW_CACHE:
                self._views.popitem(last=False)
        return at, cell

    def answer(self, method: str, column: str | None, view: tuple[float, float, float, float] | None,
               labels: pa.Table | None, encoding: str = "lists") -> dict[str, Any]:
        """The view's points, or its bins past `max_points`. `encoding`:
        "lists" (JSON numbers) or "b64" (the bins' arrays as base64 typed
        arrays: cell uint32, count uint32, c float32 or int16; what the page
        asks for, a quarter of a million numbers encode in no time)."""
        if method not in self.methods:
            raise ValueError(f"no {method!r} projection; have {self.methods}")
        if encoding not in ("lists", "b64"):
            raise ValueError(f"encoding is lists or b64, not {encoding!r}")
        extent = self._index(method)[0]
        if extent is None:
            return {"method": method, "mode": "points", "n": 0, "ids": [], "x": [], "y": [], "c": [], "extent": None,
                    "methods": self.methods, "kind": "none", "legend": {}}
        x0, x1, y0, y1 = view or tuple(extent)
        if x1 <= x0:
            x1 = x0 + 1e-9
        if y1 <= y0:
            y1 = y0 + 1e-9
        at, cell = self._cells(method, (x0, x1, y0, y1))
        kind, values, legend = self.colour(column, labels)
        out: dict[str, Any] = {"method": method, "color": column, "kind": kind, "legend": legend, "n": len(at),
                               "extent": extent, "view": [x0, x1, y0, y1], "methods": self.methods}
        c = values[at]
        if cell is None:
            x, y = self.xy[method]
            out.update(mode="points", ids=self.cols.ids(at), x=np.round(x[at], 5).tolist(),
                       y=np.round(y[at], 5).tolist(),
                       c=_nullable(c.astype(np.int64) if kind == "category" else np.round(c, 5), np.isfinite(c)))
            return out
        b = self.bins
        counts = np.bincount(cell, minlength=b * b)
        used = np.flatnonzero(counts)
        if kind == "category":
            k = len(legend["categories"]) + 1
            votes = np.bincount(cell * k + np.where(c >= 0, c, k - 1).astype(np.int64), minlength=b * b * k)
            colour = votes.reshape(b * b, k)[used].argmax(axis=1)
            colour = np.where(colour == k - 1, -1, colour)
        else:
            ok = np.isfinite(c)
            total = np.bincount(cell[ok], weights=c[ok], minlength=b * b)
            n_ok = np.bincount(cell[ok], minlength=b * b)
            with np.errstate(invalid="ignore", divide="ignore"):
                colour = total[used] / n_ok[used]
        out.update(mode="bins", bins=b)
        if encoding == "b64":
            out.update(encoding="b64", cell=_b64(used.astype(np.uint32)), count=_b64(counts[used].astype(np.uint32)),
                       c=_b64(colour.astype(np.int16) if kind == "category" else colour.astype(np.float32)))
        else:
            out.update(ix=(used // b).tolist(), iy=(used % b).tolist(), count=counts[used].tolist(),
                       c=colour.tolist() if kind == "category" else _nullable(np.round(colour, 5), np.isfinite(colour)))
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


def _nullable(values: np.ndarray, valid: np.ndarray) -> list[Any]:
    """`values` as a list, None where not `valid` (JSON has no NaN)."""
    out = values.tolist()
    for i in np.flatnonzero(~valid).tolist():
        out[i] = None
    return out


def _b64(values: np.ndarray) -> str:
    """Little-endian bytes of `values`, base64 (a JS typed array reads them)."""
    return base64.b64encode(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes()).decode()
