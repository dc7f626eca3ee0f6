"""Reading the clip table for an export: the selected rows in chunks, each
with its media, so an export holds one chunk of clips in memory whatever the
table's size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np
import pyarrow as pa

from engine.store.lance_io import read_blob_bytes

BLOB_COLUMNS = ("mp4", "preview_webp")


def scalar_columns(clips: lance.LanceDataset) -> list[str]:
    return [name for name in clips.schema.names if name not in BLOB_COLUMNS]


@dataclass
class ClipChunk:
    """Up to `chunk_rows` clips: their scalar columns and the blobs asked for."""

    table: pa.Table
    blobs: dict[str, list[bytes | None]]

    def rows(self) -> Iterator[tuple[dict[str, Any], dict[str, bytes | None]]]:
        for i, row in enumerate(self.table.to_pylist()):
            yield row, {name: values[i] for name, values in self.blobs.items()}


def scan_clips(clips: lance.LanceDataset, where: str | None, *, chunk_rows: int = 64,
               blobs: tuple[str, ...] = ("mp4",), columns: list[str] | None = None) -> Iterator[ClipChunk]:
    """The rows matching `where` (None: all), `chunk_rows` at a time, in
    table order."""
    cols = columns if columns is not None else scalar_columns(clips)
    wanted = tuple(b for b in blobs if b in clips.schema.names)
    for batch in clips.to_batches(columns=cols, filter=where, with_row_id=True, batch_size=chunk_rows):
        # Lance's batch size is a target, not a cap (a filtered scan can
        # return more): the blobs are read `chunk_rows` at a time regardless.
        for start in range(0, batch.num_rows, chunk_rows):
            table = pa.Table.from_batches([batch.slice(start, chunk_rows)])
            ids = table.column("_rowid").to_pylist()
            read = {name: read_blob_bytes(clips, name, ids) for name in wanted}
            yield ClipChunk(table.drop_columns(["_rowid"]), read)


def jsonable(row: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row as JSON-ready metadata (vectors as lists, bytes dropped)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in drop or isinstance(value, (bytes, bytearray)):
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def duration_s(row: dict[str, Any]) -> float:
    """A clip's length: frames over rate, or its time span."""
    if row.get("num_frames") and row.get("fps"):
        return float(row["num_frames"]) / float(row["fps"])
    return float((row.get("end_s") or 0.0) - (row.get("start_s") or 0.0))
