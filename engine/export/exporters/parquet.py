"""Every column but the media blobs as one Parquet file, for SQL engines and
dataframes. Written chunk by chunk: memory stays one chunk whatever the size."""

from __future__ import annotations

from typing import Any

import lance
import pyarrow as pa
import pyarrow.parquet as pq

from engine.export.exporters.rows import scalar_columns
from engine.export.exporters.target import ExportTarget

FILE_NAME = "clips.parquet"
CHUNK_ROWS = 65536


def write_parquet(clips: lance.LanceDataset, target: ExportTarget, where: str | None,
                  file_name: str = FILE_NAME) -> dict[str, Any]:
    """`file_name` under `target` (schema metadata, e.g. the embedding
    model, kept); returns where it went and its row count."""
    columns = scalar_columns(clips)
    schema = pa.schema([clips.schema.field(c) for c in columns], metadata=clips.schema.metadata)
    rows = 0
    with target.open(file_name) as sink, pq.ParquetWriter(sink, schema) as writer:
        for batch in clips.to_batches(columns=columns, filter=where, batch_size=CHUNK_ROWS):
            writer.write_table(pa.Table.from_batches([batch]).cast(schema))
            rows += batch.num_rows
    return {"path": target.uri(file_name), "rows": rows}
