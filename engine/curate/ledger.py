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

from engine.runtime.timing import StageTimes


class Ledger(StageTimes):
    """Admission counter and mailbox of transcode reports for one run; it
    also keeps the run's stage times (it is the stages' clock).

    It never holds an Arrow table: video rows travel as Arrow IPC bytes.
    Ray's Arrow serialization imports pandas, and this module imports no
    Ray Data, so the actor's process starts in under half the time (one
    start per run, ~1.5 s of CPU saved on a two-core machine)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = max(1, int(limit))
        self.in_flight: set[str] = set()
        self.high_water = 0
        self.reports: list[tuple[bytes, list[str]]] = []
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

    async def report(self, video_id: str, video_row: bytes, clip_ids: list[str]) -> None:
        """A video's transcode is done: its row (`row_bytes`) and every clip
        id it emitted."""
        cond = self._cond()
        async with cond:
            self.reports.append((video_row, clip_ids))
            self.in_flight.discard(video_id)
            cond.notify_all()

    async def drain(self) -> list[tuple[bytes, list[str]]]:
        out, self.reports = self.reports, []
        return out

    async def most_in_flight(self) -> int:
        """The most videos that were in flight at once."""
        return self.high_water


def row_bytes(row: pa.Table) -> bytes:
    """A one-row video table as Arrow IPC stream bytes (for `Ledger.report`)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, row.schema) as writer:
        writer.write_table(row)
    return sink.getvalue().to_pybytes()


def drain_reports(ledger: Any) -> list[tuple[pa.Table, list[str]]]:
    """The reports the ledger got since the last drain: (video row, clip ids)."""
    return [(pa.ipc.open_stream(row).read_all(), clip_ids) for row, clip_ids in ray.get(ledger.drain.remote())]


def report_video(ledger: Any, row: pa.Table, clip_ids: list[str]) -> Any:
    """Tell the ledger that the video of one-row table `row` is done."""
    return ledger.report.remote(row.column("video_id")[0].as_py(), row_bytes(row), clip_ids)


def start_ledger(name: str, limit: int) -> Any:
    """A ledger on the driver's node (`driver_node_strategy`)."""
    from engine.runtime.ray_session import driver_node_strategy

    actor = ray.remote(num_cpus=0, max_restarts=0)(Ledger)
    return actor.options(name=name, scheduling_strategy=driver_node_strategy()).remote(limit)


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
    ray.get([report_video(ledger, batch.slice(i, 1), []) for i in done])
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
            ray.get([report_video(self._ledger, batch.slice(i, 1), clip_ids[v]) for i, v in enumerate(video_ids)])

    Reporting.__name__ = Reporting.__qualname__ = stage_cls.__name__
    return Reporting
