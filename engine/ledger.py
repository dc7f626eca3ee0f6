"""What is in flight in a streaming curate run, and who learns of it.

The curate job is one Ray Data stream: inputs -> probe -> split -> transcode
-> clip stages -> fragment writers -> driver. Two things cannot ride in that
stream, so they go through one small actor, the `Ledger`, on the driver's node:

- Admission. Input chunks enter the stream only when the ledger admits
  them, so at most `limit` videos are between admission and the end of
  their transcode. Probe and split therefore never run far ahead of the
  encoders: the first clips come out within seconds of the start, and
  memory does not grow with the number of inputs.
- Video rows. The transcode step (wrapped by `reporting`) tells the ledger,
  for each video it finished, the video's row (probe and split columns) and
  the ids of every clip row it emitted. The driver drains these reports and,
  once the writers have written every listed clip, commits the video whole.

Retried tasks re-report the same facts, so every report is idempotent.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from engine.schema import video_id_for


@ray.remote(num_cpus=0, max_restarts=0)
class Ledger:
    """Admission counter and mailbox of transcode reports for one run."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.in_flight: set[str] = set()
        self.high_water = 0
        self.reports: list[tuple[pa.Table, list[str]]] = []
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def admit(self, video_ids: list[str]) -> None:
        """Wait until these videos fit under the limit, then count them in.
        A chunk larger than the limit enters alone, so nothing waits forever."""
        cond = self._cond()
        async with cond:
            new = [v for v in video_ids if v not in self.in_flight]  # a retried read re-admits
            await cond.wait_for(lambda: not self.in_flight or len(self.in_flight) + len(new) <= self.limit)
            self.in_flight.update(new)
            self.high_water = max(self.high_water, len(self.in_flight))

    async def report(self, video_row: pa.Table, clip_ids: list[str]) -> None:
        """A video's transcode is done: its row and every clip id it emitted."""
        cond = self._cond()
        async with cond:
            self.reports.append((video_row, clip_ids))
            for video_id in video_row.column("video_id").to_pylist():
                self.in_flight.discard(video_id)
            cond.notify_all()

    async def drain(self) -> list[tuple[pa.Table, list[str]]]:
        out, self.reports = self.reports, []
        return out

    async def most_in_flight(self) -> int:
        """The most videos that were in flight at once."""
        return self.high_water


def start_ledger(name: str, limit: int) -> Any:
    """A ledger on the driver's node (`driver_node_strategy`)."""
    from engine.ray_session import driver_node_strategy

    return Ledger.options(name=name, scheduling_strategy=driver_node_strategy()).remote(limit)


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


def report_uncut(batch: pa.Table, *, ledger_name: str) -> pa.Table:
    """Ray Data step between split and transcode: videos with nothing to cut
    (an error, no spans) are reported to the ledger as done with no clips and
    leave the stream, so they cost no transcode task."""
    spans = batch.column("span_start_frames").to_pylist()
    errors = batch.column("error").to_pylist()
    keep = [bool(s) and e is None for s, e in zip(spans, errors)]
    if all(keep):
        return batch
    ledger = ray.get_actor(ledger_name)
    done = [i for i, k in enumerate(keep) if not k]
    ray.get([ledger.report.remote(batch.slice(i, 1), []) for i in done])
    return batch.filter(pa.array(keep))


def reporting(stage_cls: type, ledger_name: str) -> type:
    """`stage_cls` (the transcoder: video rows in, clip rows out) wrapped so
    that the ledger learns each video's row and its clip ids.

    The transcoder gets its whole batch at once (it may transcode the videos
    of a batch concurrently), so the reports go out when the batch is done:
    before its task can finish, so the driver always has them by the time
    the stream ends."""

    class Reporting:
        def __init__(self, **kwargs: Any) -> None:
            self._stage = stage_cls(**kwargs)
            self._ledger = ray.get_actor(ledger_name)

        def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
            video_ids = batch.column("video_id").to_pylist()
            clip_ids: dict[str, list[str]] = {v: [] for v in video_ids}
            result = self._stage(batch)
            for part in (result if inspect.isgenerator(result) or isinstance(result, Iterator) else [result]):
                for video_id, clip_id in zip(part.column("video_id").to_pylist(), part.column("clip_id").to_pylist()):
                    clip_ids[video_id].append(clip_id)
                yield part
            ray.get([self._ledger.report.remote(batch.slice(i, 1), clip_ids[v]) for i, v in enumerate(video_ids)])

    Reporting.__name__ = Reporting.__qualname__ = stage_cls.__name__
    return Reporting
