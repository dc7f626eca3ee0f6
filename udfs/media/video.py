"""Opening and decoding videos with PyAV, shared by every frame-consuming stage.

Frames are indexed by decode order of the video stream (presentation order
after the decoder's reordering), which is what the split stages' frame spans
refer to. Timestamps are not trusted for indexing: many real files have
gaps, edit lists or variable frame rates.

PyAV is imported inside the functions that decode: the frame packing
helpers below are pure numpy, and the model stages that use them must import
on machines without PyAV (a GPU box running `scripts/gpu_check.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.uris import av_source

if TYPE_CHECKING:
    import av

# Decoder threads: FFmpeg's frame+slice threading; 0 lets it pick per core.
DEFAULT_DECODE_THREADS = 0


@contextlib.contextmanager
def open_video(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[av.container.InputContainer]:
    import av

    source = av_source(uri, storage_options)
    container = av.open(source, mode="r", metadata_errors="ignore")
    try:
        yield container
    finally:
        container.close()
        if hasattr(source, "close"):
            source.close()


def video_stream(container: av.container.InputContainer, threads: int = DEFAULT_DECODE_THREADS) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.thread_count = threads
    return stream


def decode_errors() -> tuple[type[BaseException], ...]:
    """What decoding a broken, truncated or unreadable video raises: bad
    input, recorded on its row. Anything else is a bug and fails the block."""
    # RuntimeError: NVDEC; MemoryError: a video too long for its frames to fit.
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, RuntimeError, MemoryError)
    try:
        import av
    except ImportError:  # a GPU box decoding with NVDEC only
        return errors
    return (av.error.FFmpegError, *errors)  # FFmpegError subclasses only Exception


def frame_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The nominal frame rate used to turn frame indices into seconds."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    raise ValueError("video stream has no usable frame rate")


def iter_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for every decoded frame of the stream, in order."""
    index = 0
    for frame in container.decode(stream):
        yield index, frame
        index += 1


def decode_rgb(
    uri: str,
    width: int,
    height: int,
    *,
    start_frame: int = 0,
    end_frame: int | None = None,
    step: int = 1,
    threads: int = DEFAULT_DECODE_THREADS,
) -> np.ndarray:
    """Decode frames [start, end) every `step`-th, resized to (height, width, 3) uint8.

    The resize runs in swscale on the decoded planes, so full-size RGB frames
    are never materialised.
    """
    out: list[np.ndarray] = []
    with open_video(uri) as container:
        stream = video_stream(container, threads)
        for index, frame in iter_frames(container, stream):
            if index < start_frame:
                continue
            if end_frame is not None and index >= end_frame:
                break
            if (index - start_frame) % step == 0:
                out.append(frame.to_ndarray(format="rgb24", width=width, height=height))
    if not out:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(out)


def decode_rgb_bytes(data: bytes, width: int | None = None, height: int | None = None, step: int = 1) -> np.ndarray:
    """Decode an in-memory clip (e.g. the clip table's mp4) to RGB frames."""
    import io

    import av

    out: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = video_stream(container)
        for index, frame in iter_frames(container, stream):
            if index % step == 0:
                kwargs = {} if width is None else {"width": width, "height": height}
                out.append(frame.to_ndarray(format="rgb24", **kwargs))
    if not out:
        h = height or 0
        w = width or 0
        return np.zeros((0, h, w, 3), dtype=np.uint8)
    return np.stack(out)


def pack_frames(frames: np.ndarray, indices: list[int] | np.ndarray) -> tuple[list[bytes], list[int], list[int]]:
    """(N, H, W, 3) uint8 frames -> values for a consumer's transient frame
    columns (see `udfs.schema.frame_fields`)."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) frames, got {frames.shape}")
    return [f.tobytes() for f in frames], [int(i) for i in indices], [int(frames.shape[1]), int(frames.shape[2])]


def unpack_frames(frames: list[bytes] | None, hw: list[int] | None) -> np.ndarray:
    """Inverse of `pack_frames`: (N, H, W, 3) uint8 (N may be 0)."""
    if not frames or hw is None:
        h, w = (hw or (0, 0))
        return np.zeros((0, h, w, 3), dtype=np.uint8)
    h, w = int(hw[0]), int(hw[1])
    return np.frombuffer(b"".join(frames), dtype=np.uint8).reshape(len(frames), h, w, 3)


def encode_frames(out: av.container.OutputContainer, stream: av.video.stream.VideoStream,
                  frames: Iterable[av.VideoFrame], rate: Fraction) -> None:
    """Encode `frames` as consecutive frames at `rate`, mux them, flush."""
    for i, frame in enumerate(frames):
        frame.pts = i
        frame.time_base = 1 / rate
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
