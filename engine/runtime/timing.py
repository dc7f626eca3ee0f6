"""Per-stage busy time, gathered from stage workers into one clock actor.

Ray Data runs stages concurrently, so a stage's share of the run is the time
its workers spent inside the UDF, not a slice of the wall clock. Stages stay
unaware of this: `timed` wraps the class before it goes to `map_batches`.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray

CLOCK_NAME = "reelsift_stage_clock"


class StageTimes:
    """Busy time, rows and batches per stage. Plain, so that a run's other
    bookkeeping actor (curate's ledger) can keep the times too: one actor
    fewer to start per run (a Ray worker process, ~1 s of CPU)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: {"busy_s": 0.0, "rows_in": 0, "rows_out": 0,
                                                                       "batches": 0})

    def add(self, stage: str, seconds: float, rows_in: int, rows_out: int) -> None:
        t = self.totals[stage]
        t["busy_s"] += seconds
        t["rows_in"] += rows_in
        t["rows_out"] += rows_out
        t["batches"] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self.totals.items()}


StageClock = ray.remote(num_cpus=0)(StageTimes)


def start_clock(namespace_tag: str, **options: Any) -> tuple[Any, str]:
    """A fresh clock actor for one run; returns (handle, name). `options` are
    Ray actor options (e.g. a scheduling strategy)."""
    name = f"{CLOCK_NAME}_{namespace_tag}"
    return StageClock.options(name=name, **options).remote(), name


def timed(stage_cls: type, stage_name: str, clock_name: str) -> type:
    """A subclass-free wrapper class that reports `stage_cls` call times."""

    class Timed:
        def __init__(self, **kwargs: Any) -> None:
            self._stage = stage_cls(**kwargs)
            self._clock = ray.get_actor(clock_name)

        def _report(self, seconds: float, rows_in: int, rows_out: int) -> None:
            self._clock.add.remote(stage_name, seconds, rows_in, rows_out)

        def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
            start = time.perf_counter()
            result = self._stage(batch)
            if inspect.isgenerator(result):
                return self._drain(result, batch.num_rows, start)
            self._report(time.perf_counter() - start, batch.num_rows, result.num_rows)
            return result

        def _drain(self, gen: Iterator[pa.Table], rows_in: int, start: float) -> Iterator[pa.Table]:
            # Time only the generator's own work, not the consumer's.
            busy = time.perf_counter() - start
            rows_out = 0
            while True:
                t = time.perf_counter()
                try:
                    out = next(gen)
                except StopIteration:
                    busy += time.perf_counter() - t
                    break
                busy += time.perf_counter() - t
                rows_out += out.num_rows
                yield out
            self._report(busy, rows_in, rows_out)

    # Ray Data names the operator after the class: the stage's name, not its implementation's.
    Timed.__name__ = Timed.__qualname__ = stage_name
    return Timed
