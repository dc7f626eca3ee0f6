"""Scene-aware split stages: per-frame transition scores -> clip spans.

Both stages take a video-table batch (needs `uri`, `fps`, `num_frames`,
`error`) and append `span_start_frames`, `span_end_frames` (list<int64>,
source frame indices, end exclusive), `scene_detector` and
`transition_probs` (one float32 per decoded frame; see each detector for
its scale). Rows whose `error` is already set get empty span lists and null
scene columns; a video that fails to decode gets its `error` set to
"scene detection failed: ..." while the other rows carry on.

Frame counts come from decoding, not from the probe's `num_frames`: spans
must only name frames that exist, and probes of real files over- or
under-count. For well-formed files the two agree.

Frames are decoded and scored `chunk_frames` at a time, windows overlapping
by what the detector needs (TransNetV2: its 100-frame windows; content: the
gradual window), and only the per-frame scores are kept: a task's memory
does not grow with video length, and the scores are those of the whole
video at once.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from udfs.schema import VIDEO_SCENE_FIELDS, VIDEO_SPAN_FIELDS
from udfs.split.content_detector import ContentScorer
from udfs.split.scene_decode import iter_small, iter_small_cpu
from udfs.split.scene_rules import LONG_SCENE_MODES, plan_spans
from udfs.media.video import decode_errors

log = logging.getLogger(__name__)

ERROR_PREFIX = "scene detection failed: "
_OUTPUT_FIELDS = VIDEO_SPAN_FIELDS + VIDEO_SCENE_FIELDS


def _prefetched(fn: Callable[[Any], Any], items: list[Any], workers: int, ahead: int) -> Iterator[Any]:
    """fn(item) for each item in order, computed up to `ahead` items early
    on `workers` threads (PyAV and NVDEC release the GIL while decoding), so
    decoding the next videos overlaps with inference on the current ones.
    A video that cannot be decoded gets its exception in place of the
    result; any other exception is raised."""
    bad_input = decode_errors()

    def safe(item: Any) -> Any:
        try:
            return fn(item)
        except bad_input as exc:  # recorded on the video's row by the caller
            return exc

    if workers <= 0:
        for item in items:
            yield safe(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scene-decode") as pool:
        queue: collections.deque[Future[Any]] = collections.deque()
        it = iter(items)
        for item in it:
            queue.append(pool.submit(safe, item))
            if len(queue) > ahead:
                break
        while queue:
            yield queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(safe, nxt))


def _streamed(open_chunks: Callable[[Any], Iterable[Any]], items: list[Any], workers: int, ahead: int,
              queue_chunks: int = 2) -> Iterator[Iterator[Any]]:
    """Per item, in order, an iterator over the chunks of `open_chunks(item)`,
    decoded on `workers` threads while the caller consumes earlier items: up
    to `ahead` items beyond the current one are started, each holding at most
    `queue_chunks` chunks that wait for the caller (so memory is bounded by
    chunks, not videos). A decode error (`decode_errors()`) comes out as the
    iterator's last item, an exception instance; any other exception is
    raised in the caller. Leaving early stops the decoding threads."""
    bad_input = decode_errors()
    if workers <= 0:
        def inline(item: Any) -> Iterator[Any]:
            try:
                yield from open_chunks(item)
            except bad_input as exc:
                yield exc

        for item in items:
            yield inline(item)
        return

    stop = threading.Event()
    end = object()

    def produce(item: Any, out: queue.Queue, left: threading.Event) -> None:
        def put(value: Any) -> bool:
            while not (stop.is_set() or left.is_set()):
                try:
                    out.put(value, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for chunk in open_chunks(item):
                if not put(("chunk", chunk)):
                    return
            put(("end", end))
        except bad_input as exc:
            put(("chunk", exc))
            put(("end", end))
        except BaseException as exc:  # raised in the caller's thread
            put(("raise", exc))

    def consume(out: queue.Queue, left: threading.Event) -> Iterator[Any]:
        try:
            while True:
                kind, value = out.get()
                if kind == "raise":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:  # closed early: its producer stops instead of waiting on a full queue
            left.set()

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scene-decode")
    try:
        started: collections.deque[tuple[queue.Queue, threading.Event]] = collections.deque()
        it = iter(items)

        def start_next() -> None:
            nxt = next(it, end)
            if nxt is not end:
                q: queue.Queue = queue.Queue(maxsize=max(1, queue_chunks))
                left = threading.Event()
                pool.submit(produce, nxt, q, left)
                started.append((q, left))

        for _ in range(1 + max(0, ahead)):
            start_next()
        while started:
            q, left = started.popleft()
            start_next()
            yield consume(q, left)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class _SceneSplit:
    """Shared table handling and span rules; subclasses produce scores."""

    detector_name = ""

    def __init__(
        self,
        *,
        threshold: float,
        min_scene_s: float,
        max_scene_s: float | None,
        long_scene_mode: str,
        crop_s: float,
        decode_threads: int,
        decode_workers: int,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if long_scene_mode not in LONG_SCENE_MODES:
            raise ValueError(f"long_scene_mode must be one of {LONG_SCENE_MODES}, got {long_scene_mode!r}")
        self.rules = dict(min_scene_s=float(min_scene_s), max_scene_s=None if max_scene_s is None else float(max_scene_s),
                          long_scene_mode=long_scene_mode, crop_s=float(crop_s))
        self.threshold = float(threshold)
        self.decode_threads = int(decode_threads)
        self.decode_workers = int(decode_workers)
        self.storage_options = storage_options

    def score_videos(self, videos: list[tuple[str, float]]) -> Iterable[np.ndarray | BaseException]:
        """Per (uri, fps), in order: (N,) float32 scores or the exception."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("uri").to_pylist()
        fps_col = batch.column("fps").to_pylist()
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
        todo = [i for i, err in enumerate(errors) if err is None]
        starts: list[list[int]] = [[] for _ in uris]
        ends: list[list[int]] = [[] for _ in uris]
        detector: list[str | None] = [None] * batch.num_rows
        probs: list[list[float] | None] = [None] * batch.num_rows
        new_errors = list(errors)

        videos = [(uris[i], fps_col[i]) for i in todo]
        for i, result in zip(todo, self.score_videos(videos)):
            fps = fps_col[i]
            if isinstance(result, BaseException):
                problem = f"cannot decode the video: {type(result).__name__}: {result}"
            elif fps is None or not fps > 0:
                problem = f"unusable fps {fps!r}"
            elif len(result) == 0:
                problem = "no frames decoded"
            else:
                problem = None
            if problem is not None:
                log.warning("scene detection failed for %s: %s", uris[i], problem)
                new_errors[i] = f"{ERROR_PREFIX}{problem}"
                continue
            spans = plan_spans(result, float(fps), threshold=self.threshold, **self.rules)
            starts[i] = [s for s, _ in spans]
            ends[i] = [e for _, e in spans]
            detector[i] = self.detector_name
            probs[i] = np.asarray(result, dtype=np.float32).tolist()

        out = batch.drop_columns([f.name for f in _OUTPUT_FIELDS if f.name in batch.column_names])
        values = {"span_start_frames": starts, "span_end_frames": ends, "scene_detector": detector,
                  "transition_probs": probs}
        for field in _OUTPUT_FIELDS:
            out = out.append_column(field, pa.array(values[field.name], type=field.type))
        if "error" in out.column_names:
            index = out.column_names.index("error")
            out = out.set_column(index, out.schema.field(index), pa.array(new_errors, type=out.schema.field(index).type))
        else:
            out = out.append_column(pa.field("error", pa.string()), pa.array(new_errors, type=pa.string()))
        return out


class TransNetV2Split(_SceneSplit):
    """`split=transnetv2`: TransNetV2 shot-transition probabilities (0-1,
    calibrated; a transition where > threshold) -> spans.

    Put it on an actor pool (the model loads once per actor). Frames are
    decoded at 48x27, `chunk_frames` at a time, on `decode_workers` threads
    ahead of inference (NVDEC + GPU resize when on CUDA and `gpu_decode`,
    PyAV otherwise or on any GPU decode error); windows of all videos in the
    batch share model batches.
    """

    detector_name = "transnetv2"

    def __init__(
        self,
        *,
        threshold: float,
        min_scene_s: float,
        max_scene_s: float | None,
        long_scene_mode: str,
        crop_s: float,
        weights: str | None,
        device: str,
        batch_size: int,
        precision: str,
        gpu_decode: bool,
        interpolation: str,
        decode_threads: int,
        decode_workers: int,
        prefetch_videos: int,
        chunk_frames: int,
        torch_threads: int | None,
        storage_options: dict[str, Any] | None,
    ) -> None:
        super().__init__(threshold=threshold, min_scene_s=min_scene_s, max_scene_s=max_scene_s,
                         long_scene_mode=long_scene_mode, crop_s=crop_s, decode_threads=decode_threads,
                         decode_workers=decode_workers, storage_options=storage_options)
        import torch

        from udfs.split.transnetv2 import TransNetV2Predictor

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.predictor = TransNetV2Predictor(weights=weights, device=device, batch_size=batch_size,
                                             precision=precision)
        self.use_gpu_decode = bool(gpu_decode) and self.predictor.device.type == "cuda"
        self.interpolation = interpolation
        self.prefetch_videos = int(prefetch_videos)
        self.chunk_frames = int(chunk_frames)

    def _decode(self, video: tuple[str, float]) -> Iterator[Any]:
        return iter_small(video[0], 48, 27, use_gpu=self.use_gpu_decode, threads=self.decode_threads,
                          interpolation=self.interpolation, chunk_frames=self.chunk_frames,
                          storage_options=self.storage_options)

    def score_videos(self, videos: list[tuple[str, float]]) -> Iterable[np.ndarray | BaseException]:
        streams = _streamed(self._decode, videos, self.decode_workers, self.prefetch_videos)
        for _, result in self.predictor.predict_many(enumerate(streams)):
            yield result


class ContentSplit(_SceneSplit):
    """`split=content`: fast CPU-only detector (colour-histogram and luma
    changes, see udfs/split/content_detector.py for the score scale) -> spans."""

    detector_name = "content"

    def __init__(
        self,
        *,
        threshold: float,
        min_scene_s: float,
        max_scene_s: float | None,
        long_scene_mode: str,
        crop_s: float,
        width: int,
        height: int,
        gradual_s: float | None,
        interpolation: str,
        chunk_frames: int,
        decode_threads: int,
        decode_workers: int,
        storage_options: dict[str, Any] | None,
    ) -> None:
        super().__init__(threshold=threshold, min_scene_s=min_scene_s, max_scene_s=max_scene_s,
                         long_scene_mode=long_scene_mode, crop_s=crop_s, decode_threads=decode_threads,
                         decode_workers=decode_workers, storage_options=storage_options)
        self.width, self.height = int(width), int(height)
        self.gradual_s = gradual_s
        self.interpolation = interpolation
        self.chunk_frames = int(chunk_frames)

    def _score(self, video: tuple[str, float]) -> np.ndarray:
        uri, fps = video
        scorer = ContentScorer(float(fps or 0) or 25.0, gradual_s=self.gradual_s)
        for chunk in iter_small_cpu(uri, self.width, self.height, threads=self.decode_threads,
                                    interpolation=self.interpolation, chunk_frames=self.chunk_frames,
                                    storage_options=self.storage_options):
            scorer.feed(chunk)
        return scorer.finish()

    def score_videos(self, videos: list[tuple[str, float]]) -> Iterable[np.ndarray | BaseException]:
        return _prefetched(self._score, videos, self.decode_workers, max(1, self.decode_workers))
