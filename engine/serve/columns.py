"""The clip table's small columns, read once per served version and kept as
arrays, so the workbench's panels answer from memory (the table is a
snapshot while it is served: the searcher holds one version)."""

from __future__ import annotations

import threading
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class TableColumns:
    """Columns of one table version by name, in scan order, read on first use."""

    def __init__(self, dataset: lance.LanceDataset, id_column: str) -> None:
        self.dataset = dataset
        self.id_column = id_column
        self.names = tuple(dataset.schema.names)
        self._cache: dict[str, pa.ChunkedArray] = {}
        self._lock = threading.Lock()
        self._ids: tuple[np.ndarray, np.ndarray] | None = None

    def has(self, *names: str) -> bool:
        return all(n in self.names for n in names)

    def table(self, names: list[str] | tuple[str, ...]) -> pa.Table:
        missing = [n for n in names if n not in self._cache]
        if missing:
            read = self.dataset.to_table(columns=missing)
            with self._lock:
                for n in missing:
                    self._cache[n] = read.column(n)
        return pa.table({n: self._cache[n] for n in names})

    def row_ids(self) -> np.ndarray:
        """Lance's `_rowid` of every row (what dedup's edges name rows by)."""
        if "_rowid" not in self._cache:
            read = self.dataset.to_table(columns=[self.id_column], with_row_id=True)
            with self._lock:
                self._cache["_rowid"] = read.column("_rowid")
        return self._cache["_rowid"].to_numpy().astype(np.uint64)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table([name]).column(name)

    def numeric(self, name: str) -> np.ndarray:
        """A numeric or bool column as float64, null -> NaN."""
        col = self.column(name)
        if pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.int8())
        return pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy()

    @property
    def rows(self) -> int:
        return len(self.column(self.id_column))

    def durations(self) -> np.ndarray:
        """Clip length in seconds (0 where unknown)."""
        if not self.has("start_s", "end_s"):
            return np.zeros(self.rows)
        d = self.numeric("end_s") - self.numeric("start_s")
        return np.where(np.isfinite(d), d, 0.0)

    def ok(self) -> np.ndarray:
        """Rows without an error (the only ones a filter judges)."""
        if not self.has("error"):
            return np.ones(self.rows, dtype=bool)
        return pc.is_null(self.column("error")).to_numpy(zero_copy_only=False)

    def ids(self, positions: np.ndarray) -> list[str]:
        col = self.column(self.id_column)
        return pc.take(col, pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()

    def positions(self, clip_ids: list[str]) -> np.ndarray:
        """Row position of each id in `clip_ids`, -1 for an id the table lacks
        (a binary search of the sorted ids: no hash set of a million strings)."""
        if self._ids is None:
            binary = pc.cast(self.column(self.id_column), pa.binary()).to_numpy(zero_copy_only=False)
            raw = np.array(binary, dtype="S")
            order = np.argsort(raw, kind="stable")
            with self._lock:
                self._ids = (raw[order], order)
        sorted_ids, order = self._ids
        wanted = np.array([str(c).encode() for c in clip_ids], dtype="S") if clip_ids else np.array([], "S1")
        at = np.searchsorted(sorted_ids, wanted)
        at_c = np.minimum(at, len(sorted_ids) - 1)
        found = (at < len(sorted_ids)) & (sorted_ids[at_c] == wanted) if len(sorted_ids) else np.zeros(len(wanted), bool)
        return np.where(found, order[at_c], -1)


def jsonable_values(values: list[Any]) -> list[Any]:
    return [None if isinstance(v, float) and not np.isfinite(v) else v for v in values]


def finite_number(name: str, raw: str, error: type[ValueError] = ValueError) -> float:
    """`raw` (a request parameter) as a finite float, else `error` naming `name`."""
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name}: {raw!r} is not a number") from None
    if not np.isfinite(value):
        raise error(f"{name}: {raw!r} is not a finite number")
    return value
