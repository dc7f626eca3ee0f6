"""The run's input URIs as a Ray Data datasource whose reads wait for the
ledger's admission (`engine.curate.ledger`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from udfs.schema import video_id_for


class InputChunks(Datasource):
    """The run's input URIs as read tasks, one per chunk the driver put in the
    object store; each read waits for the ledger to admit its videos.

    The driver streams the listing into chunks as it walks it, so it holds
    object references, never the listing; per-block metadata is known here,
    so creating the dataset runs no tasks."""

    def __init__(self, chunks: list[tuple[Any, int]], ledger_name: str) -> None:
        self.chunks = chunks
        self.ledger_name = ledger_name

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(n for _, n in self.chunks) * 200

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        schema = pa.schema([pa.field("uri", pa.string())])
        return [
            ReadTask(_reader(ref, self.ledger_name), BlockMetadata(num_rows=n, size_bytes=n * 200, exec_stats=None,
                                                                   input_files=None), schema=schema)
            for ref, n in self.chunks
        ]


def _reader(ref: Any, ledger_name: str):
    def read() -> Iterator[pa.Table]:
        table = ray.get(ref)
        ledger = ray.get_actor(ledger_name)
        ray.get(ledger.admit.remote([video_id_for(u) for u in table.column("uri").to_pylist()]))
        yield table

    return read
