"""Training data straight from the clip table.

`ClipDataset` is a PyTorch `IterableDataset` over `OUT/clips.lance`: the
curated view (or any Lance filter), each clip decoded with PyAV straight from
Lance's blob reader into `num_frames` frames at a fixed rate and size, with
its caption and any columns asked for. `engine.training.ray_data.ray_dataset` is the
same samples as a Ray Data pipeline for Ray Train users.

Order and sharding. The selected rows of one table version are put in an
order drawn from (seed, epoch); rank r of W takes every W-th clip of it from
r, and DataLoader worker k of K every K-th clip of that from k. The shares
partition the epoch, so every selected clip is seen exactly once across all
ranks x workers (shares differ by at most one clip; skipped clips make them
differ more, see docs/training_data.md). A sample's random choices (its
first frame, its caption window) come from (seed, epoch, row), so they do not
depend on who decodes it.

Resuming. Each (rank, worker) share is read in order, so its progress is one
cursor: `state_dict()` holds the epoch, the cursor and the counts, and
`load_state_dict()` makes the next iteration start there. With DataLoader
workers each worker's dataset copy holds its own cursor; torchdata's
`StatefulDataLoader` (what `ClipDataset.loader()` builds) collects them.

Processes. Lance is not fork-safe: a process forked after its parent opened
a Lance dataset hangs in Lance's runtime. The dataset opens the table lazily
in every process that reads, and a worker forked from a parent that already
had it open fails at once with a message instead of hanging. `loader()` forks
workers from a fork server that has imported torch, Lance and PyAV but never
opened a table (`worker_context()`): safe, and fast to start.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from engine.training.captions import CAPTION_MODES, pick_caption, resolve_caption
from engine.runtime.private_apis import new_shared_tensor
from udfs.media.frames import FrameShaper, FrameSpec, ShortClip, SkipClip, decode_frames, window_indices
from udfs.lance_rows import take_rows
from udfs.uris import lance_storage_options, scheme_of
from engine.store.views import reader_where

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# Columns every sample needs to be planned, whatever the user asks for.
PLAN_COLUMNS = ("clip_id", "num_frames", "fps")
COUNT_KEYS = ("samples", "short_skipped", "short_padded", "short_looped", "decode_errors", "no_caption")
# Blob reads are planned this many clips ahead of the decoder.
DEFAULT_READ_AHEAD = 8

# The pid of the process that opened a Lance dataset through this module; a
# forked child inherits the value and so knows its parent's runtime is live.
_opened_in_pid: int | None = None
_open_datasets: dict[tuple[str, int, tuple[tuple[str, str], ...]], lance.LanceDataset] = {}


def clips_uri(output: str) -> str:
    """The clip table of an output folder (or the table itself)."""
    text = str(output).rstrip("/")
    if text.endswith(".lance"):
        return text
    return f"{text}/clips.lance" if scheme_of(text) else os.path.join(text, "clips.lance")


def open_clips(uri: str, version: int | None = None,
               storage_options: dict[str, str] | None = None) -> lance.LanceDataset:
    """The clip table at `version`, opened once per process."""
    global _opened_in_pid
    if _opened_in_pid is not None and _opened_in_pid != os.getpid():
        raise RuntimeError(
            "this process was forked from one that had a Lance dataset open, and Lance is not fork-safe "
            "(it would hang): build the DataLoader with multiprocessing_context=engine.training.dataset.worker_context() "
            "(or 'forkserver' / 'spawn'), or use ClipDataset.loader(...)")
    key = (uri, -1 if version is None else int(version), tuple(sorted((storage_options or {}).items())))
    if key not in _open_datasets:
        _opened_in_pid = os.getpid()
        try:
            _open_datasets[key] = lance.dataset(uri, version=version, storage_options=storage_options)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise FileNotFoundError(f"no clip table at {uri}: run task=curate on this output first "
                                    f"({type(exc).__name__}: {exc})") from exc
    return _open_datasets[key]


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Positions 0..num_rows-1 in this epoch's order."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(num_rows)


def share_of(order: np.ndarray, *, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
    """The positions (rank, worker) reads, in order: a partition of `order`."""
    return order[rank::world_size][worker::num_workers]


def sample_rng(seed: int, epoch: int, row_id: int) -> np.random.Generator:
    """A sample's own random stream: the same whoever decodes it."""
    row_id = int(row_id)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), row_id & 0xFFFFFFFF, row_id >> 32]))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def to_sample_value(value: Any) -> Any:
    """A column value as a sample carries it: lists become tensors."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        dtype = torch.float32 if any(isinstance(v, float) for v in value) else torch.int64
        return torch.tensor(value, dtype=dtype)
    return value


class ClipSampler:
    """Rows of the clip table -> training samples; one per process.

    Shared by `ClipDataset` and the Ray Data path, so both decode the same
    frames: `sample(row, blob, epoch)` decodes one clip, raising `ShortClip`
    for a clip the spec skips and any other exception for a broken one."""

    def __init__(self, *, spec: FrameSpec, caption: str | None, columns: Sequence[str], seed: int,
                 decode_threads: int = 1, random_offsets: bool = True) -> None:
        if caption not in CAPTION_MODES or caption == "auto":
            raise ValueError(f"caption must be one of {CAPTION_MODES[:1] + CAPTION_MODES[2:]}, got {caption!r}")
        self.spec = spec
        self.caption = caption
        self.columns = tuple(columns)
        self.seed = seed
        self.decode_threads = decode_threads
        self.random_offsets = random_offsets
        self._shaper = FrameShaper()

    def read_columns(self, schema: pa.Schema) -> list[str]:
        """The scalar columns to read for each row."""
        needed = list(PLAN_COLUMNS)
        if self.caption is not None:
            needed += ["caption_windows"] if self.caption.startswith("window") else ["caption"]
            if self.caption.endswith("_enhanced"):
                needed += [] if self.caption.startswith("window") else ["caption_enhanced"]
        needed += list(self.columns)
        missing = [c for c in dict.fromkeys(needed) if c not in schema.names]
        if missing:
            hint = " (the caption stage has not run on this table: pass caption=None)" if any(
                c.startswith("caption") for c in missing) else ""
            raise ValueError(f"clip table has no column(s) {missing}{hint}")
        return list(dict.fromkeys(needed))

    def sample(self, row: dict[str, Any], blob: Any, *, epoch: int, row_id: int, counts: dict[str, int],
               out: torch.Tensor | None = None) -> dict[str, Any]:
        rng = sample_rng(self.seed, epoch, row_id) if self.random_offsets else None
        num_frames = int(row["num_frames"] or 0)
        text, (lo, hi) = pick_caption(row, self.caption, num_frames, rng)
        if self.caption is not None and text is None:
            counts["no_caption"] += 1
            raise SkipClip("no caption")
        try:
            indices, short = window_indices(self.spec, lo=lo, hi=min(hi, num_frames), clip_fps=row.get("fps"), rng=rng)
        except ShortClip:
            counts["short_skipped"] += 1
            raise
        if blob is None:
            raise ValueError("clip has no media")
        frames = decode_frames(blob, self.spec, indices, threads=self.decode_threads,
                               out=None if out is None else out.numpy(), shaper=self._shaper)
        if short:
            counts["short_padded" if self.spec.short_clips == "pad" else "short_looped"] += 1
        sample: dict[str, Any] = {
            "clip_id": row["clip_id"],
            "frames": out if out is not None else torch.from_numpy(frames),
            "frame_indices": torch.from_numpy(indices),
        }
        if self.caption is not None:
            sample["caption"] = text
            sample["caption_frames"] = torch.tensor([lo, hi], dtype=torch.int64)
        for name in self.columns:
            sample[name] = to_sample_value(row.get(name))
        counts["samples"] += 1
        return sample


class ClipDataset(IterableDataset):
    """Clips of a reelsift output as training samples.

    Each sample is a dict: `frames` uint8 (T, C, H, W), `frame_indices`
    (the clip frames taken), `clip_id`, `caption` and `caption_frames` (the
    [start, end) clip frames the caption describes) unless `caption=None`,
    and every column in `columns` (lists such as `embedding` as tensors).

    `where` is a Lance filter (default: the curated view; `"all"`: every
    row); clips rejected in the UI (`labels.lance`) are left out of either
    unless `include_rejected`. `caption`: `"auto"` (the clip's caption when the table has
    captions, else none), `"clip"`, `"clip_enhanced"`, `"window"` (a random
    caption window, whose frames the sample is taken from),
    `"window_enhanced"` or None; asking for captions the table lacks raises. `short_clips`: `"skip"`, `"pad"` (repeat the last frame) or
    `"loop"`. Rank and world size come from torch.distributed when it is
    initialised, else 0 and 1, unless given. `version` pins a table version
    (default: the latest when the dataset is made, kept in `state_dict()`).
    `storage_options` are the output's object-store credentials in pyarrow
    form, as in the engine's config.

    `batch_size` makes the dataset yield collated batches itself (frames
    (B, T, C, H, W)): each clip is decoded straight into its slot of the
    batch, in shared memory inside a DataLoader worker, so a batch crosses to
    the trainer without another copy. Use it with `batch_size=None` in the
    DataLoader (`loader()` does). A share's last batch may be smaller.
    """

    def __init__(
        self,
        output: str,
        *,
        where: str | None = None,
        num_frames: int = 16,
        fps: float | None = None,
        frame_stride: int | None = None,
        size: int | tuple[int, int] | None = None,
        columns: Sequence[str] = (),
        caption: str | None = "auto",
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        short_clips: str = "skip",
        version: int | None = None,
        storage_options: dict[str, Any] | None = None,
        decode_threads: int = 1,
        read_ahead: int = DEFAULT_READ_AHEAD,
        batch_size: int | None = None,
        include_rejected: bool = False,
    ) -> None:
        super().__init__()
        self.uri = clips_uri(output)
        self.storage_options = lance_storage_options(storage_options)
        self.spec = FrameSpec.window(num_frames, fps=fps, frame_stride=frame_stride, size=size,
                                     short_clips=short_clips)
        self.shuffle = shuffle
        self.seed = int(seed)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.rank, self.world_size = (rank, world_size) if rank is not None else dist_rank_world()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.read_ahead = max(1, int(read_ahead))
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        # Resolved once, here, so every worker (and a resumed run) reads the
        # same rows; this also checks the filter and the columns early.
        table = open_clips(self.uri, version, self.storage_options)
        self.sampler = ClipSampler(spec=self.spec, caption=resolve_caption(caption, table.schema.names),
                                   columns=columns, seed=seed, decode_threads=decode_threads)
        self.version = int(table.version)
        self.where = reader_where(where, table.schema, self.uri, self.storage_options, include_rejected)
        self.read_columns = self.sampler.read_columns(table.schema)
        self.num_clips = table.count_rows(filter=self.where)
        # Shared memory, so persistent DataLoader workers see set_epoch.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._pending: dict[str, Any] | None = None
        self._iterator: _ClipIterator | None = None

    # ------------------------------------------------------------ epochs, state
    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Order the next iteration by (seed, `epoch`). A state loaded for
        another epoch is dropped."""
        if self._pending is not None and self._pending["epoch"] != epoch:
            log.warning("set_epoch(%d) drops the loaded state of epoch %d", epoch, self._pending["epoch"])
            self._pending = None
        self._epoch.value = int(epoch)

    def __len__(self) -> int:
        """Clips this rank reads per epoch (an upper bound on its samples:
        skipped clips are not yielded). A batching dataset has no fixed
        length: its batches depend on the number of workers."""
        if self.batch_size is not None:
            raise TypeError("a ClipDataset made with batch_size has no fixed length; use num_clips")
        return self.clips_per_rank

    @property
    def clips_per_rank(self) -> int:
        return max(0, math.ceil((self.num_clips - self.rank) / self.world_size))

    @property
    def counts(self) -> dict[str, int]:
        """What this process's latest iteration yielded and skipped."""
        return dict(self._iterator.counts) if self._iterator else dict.fromkeys(COUNT_KEYS, 0)

    def state_dict(self) -> dict[str, Any]:
        """Where this process's iteration stands: enough to resume it exactly."""
        it = self._iterator
        if self._pending is not None and (it is None or it.epoch != self._pending["epoch"] or not it.started):
            return dict(self._pending)
        worker, num_workers = _worker_slot()
        state = self._identity()
        state.update(epoch=self.epoch, worker=worker, num_workers=num_workers, cursor=0,
                     counts=dict.fromkeys(COUNT_KEYS, 0))
        if it is not None and it.epoch == self.epoch:
            state.update(worker=it.worker, num_workers=it.num_workers, cursor=it.cursor, counts=dict(it.counts))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue from `state` (same seed, filter,
        sharding and number of workers; the state's table version is used)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a ClipDataset state (format {state.get('format')!r})")
        mine = self._identity()
        for key in ("uri", "where", "seed", "shuffle", "rank", "world_size"):
            if state[key] != mine[key]:
                raise ValueError(f"state was saved with {key}={state[key]!r}, this dataset has {mine[key]!r}")
        if state["version"] != self.version:
            log.info("resuming on table version %d (this dataset opened %d)", state["version"], self.version)
            self.version = int(state["version"])
        self._epoch.value = int(state["epoch"])
        self._pending = dict(state)

    def _identity(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "uri": self.uri, "version": self.version, "where": self.where,
                "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size}

    # ---------------------------------------------------------------- iterating
    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_slot()
        epoch = self.epoch
        cursor, counts = 0, dict.fromkeys(COUNT_KEYS, 0)
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == epoch:
            if (pending["worker"], pending["num_workers"]) != (worker, num_workers):
                raise ValueError(f"state was saved by worker {pending['worker']} of {pending['num_workers']}; "
                                 f"this is worker {worker} of {num_workers}: resume with the same num_workers")
            cursor, counts = int(pending["cursor"]), {**counts, **pending["counts"]}
        table = open_clips(self.uri, self.version, self.storage_options)
        row_ids = _selected_row_ids(table, self.where)
        share = share_of(epoch_order(len(row_ids), seed=self.seed, epoch=epoch, shuffle=self.shuffle),
                         rank=self.rank, world_size=self.world_size, worker=worker, num_workers=num_workers)
        self._iterator = _ClipIterator(self, table, row_ids[share], epoch=epoch, worker=worker,
                                       num_workers=num_workers, cursor=cursor, counts=counts)
        return self._iterator

    # ------------------------------------------------------------ DataLoader
    def loader(self, batch_size: int | None = None, num_workers: int = 0, *, multiprocessing_context: Any = None,
               **kwargs: Any) -> Any:
        """A torchdata `StatefulDataLoader` over this dataset: its
        `state_dict()` holds every worker's cursor, so a run resumes exactly
        with `load_state_dict()`. A dataset made with `batch_size` batches
        itself (the loader then passes its batches through); otherwise the
        loader collates `batch_size` samples (default 1). Workers come from
        `worker_context()` unless `multiprocessing_context` says otherwise;
        other keyword arguments go to the loader."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        if self.batch_size is not None:
            if batch_size not in (None, self.batch_size):
                raise ValueError(f"this dataset makes batches of {self.batch_size}; "
                                 f"leave the loader's batch_size unset (got {batch_size})")
            batch_size = None
        elif batch_size is None:
            batch_size = 1
        if num_workers > 0:
            kwargs["multiprocessing_context"] = multiprocessing_context or worker_context()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on newer torch
            return StatefulDataLoader(self, batch_size=batch_size, num_workers=num_workers, **kwargs)

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_iterator"] = None
        # Shared memory travels only to processes being started (DataLoader
        # workers); anywhere else the epoch goes as a plain number.
        if multiprocessing.context.get_spawning_popen() is None:
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        epoch = state["_epoch"]
        if isinstance(epoch, int):
            state["_epoch"] = multiprocessing.RawValue("q", epoch)
        self.__dict__.update(state)


def worker_context() -> Any:
    """The multiprocessing context for DataLoader workers: a fork server
    that has imported this module (and torch, Lance, PyAV) once but never
    opened a table, so workers start in a fraction of a second and are
    fork-safe; spawn where there is no fork server."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


_selections: dict[tuple[str, int, str | None], np.ndarray] = {}


def _selected_row_ids(table: lance.LanceDataset, where: str | None) -> np.ndarray:
    """Row ids of the selected rows, sorted: the epoch order's positions.
    A version never changes, so each process scans it once per filter."""
    key = (table.uri, int(table.version), where)
    if key not in _selections:
        ids = table.to_table(columns=[], filter=where, with_row_id=True).column("_rowid")
        _selections[key] = np.sort(ids.to_numpy().astype(np.uint64, copy=False))
    return _selections[key]


class _ClipIterator:
    """One (rank, worker) share of an epoch, read in order. `cursor` counts
    the clips already consumed (yielded or skipped), never those read ahead."""

    def __init__(self, dataset: ClipDataset, table: lance.LanceDataset, row_ids: np.ndarray, *, epoch: int,
                 worker: int, num_workers: int, cursor: int, counts: dict[str, int]) -> None:
        self.dataset = dataset
        self.table = table
        self.row_ids = row_ids
        self.epoch = epoch
        self.worker = worker
        self.num_workers = num_workers
        self.cursor = cursor
        self.counts = counts
        self.started = False
        self._ahead: deque[tuple[int, dict[str, Any], Any]] = deque()
        self._next_read = cursor

    def __iter__(self) -> _ClipIterator:
        return self

    def __len__(self) -> int:
        return len(self.row_ids)

    def _read_ahead(self) -> None:
        end = min(len(self.row_ids), self._next_read + self.dataset.read_ahead)
        ids = [int(i) for i in self.row_ids[self._next_read : end]]
        self._next_read = end
        rows = take_rows(self.table, ids, self.dataset.read_columns).to_pylist()
        try:
            blobs: list[Any] = self.table.take_blobs("mp4", ids=ids)
        except Exception as exc:  # noqa: BLE001 - one bad read must not end the epoch; decode each on its own
            log.warning("batched blob read failed (%s); reading clips one by one", exc)
            blobs = [_lazy_blob(self.table, i) for i in ids]
        self._ahead.extend(zip(ids, rows, blobs))

    def __next__(self) -> dict[str, Any]:
        self.started = True
        batch_size = self.dataset.batch_size
        if batch_size is None:
            sample = self._next_sample(None)
            if sample is None:
                raise StopIteration
            return sample
        spec = self.dataset.spec
        frames = _batch_frames((batch_size, spec.count, 3, *spec.output_size)) if spec.output_size else None
        samples: list[dict[str, Any]] = []
        while len(samples) < batch_size:
            sample = self._next_sample(None if frames is None else frames[len(samples)])
            if sample is None:
                break
            samples.append(sample)
        if not samples:
            raise StopIteration
        if frames is None:
            return default_collate(samples)
        for sample in samples:
            del sample["frames"]
        batch = default_collate(samples)
        batch["frames"] = frames[: len(samples)]
        return batch

    def _next_sample(self, out: torch.Tensor | None) -> dict[str, Any] | None:
        """The next sample of the share (decoded into `out` if given), or
        None at its end; skipped clips are counted on the way."""
        sampler = self.dataset.sampler
        while self.cursor < len(self.row_ids):
            if not self._ahead:
                self._read_ahead()
            row_id, row, blob = self._ahead.popleft()
            self.cursor += 1
            try:
                if callable(blob):
                    blob = blob()
                return sampler.sample(row, blob, epoch=self.epoch, row_id=row_id, counts=self.counts, out=out)
            except SkipClip:
                continue
            except Exception as exc:  # noqa: BLE001 - a broken clip is counted and skipped, the epoch goes on
                self.counts["decode_errors"] += 1
                log.warning("skipping clip %s: %s: %s", row.get("clip_id"), type(exc).__name__, exc)
        return None


def _batch_frames(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 batch; in shared memory inside a DataLoader worker (as
    torch's own collate does), so it is not copied again on its way out."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return new_shared_tensor(shape, torch.uint8)


def _lazy_blob(table: lance.LanceDataset, row_id: int) -> Any:
    return lambda: table.take_blobs("mp4", ids=[row_id])[0]
