"""Training frames from one clip: which frames, decoded how.

`FrameSpec` says what a trainer asked for (count, rate or stride, size, what
to do with clips that are too short); `plan_indices` turns it into the clip
frames to take; `decode_frames` decodes exactly those from the clip's mp4
(any file-like object PyAV can read, e.g. a Lance `BlobFile`) and resizes
them in swscale, aspect kept, centre-cropped. `ClipDataset` and the Ray Data
path both sample through here, so they yield the same frames.

Indices are clip frames in decode order, the same numbering as the clip
table's `num_frames` and `caption_windows` spans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import av
import numpy as np

from udfs.media.video import iter_frames, video_stream

SHORT_CLIP_POLICIES = ("skip", "pad", "loop")


class SkipClip(Exception):
    """A clip the sampler does not turn into a sample (counted, not an error)."""


class ShortClip(SkipClip):
    """The clip (or caption window) has fewer frames than the spec needs."""


@dataclass(frozen=True)
class FrameSpec:
    """`num_frames` frames `frame_stride` apart, or at `fps` (clip frames
    `clip_fps / fps` apart); neither means consecutive frames. `size` is
    (height, width) or one int for a square; None keeps the clip's size."""

    num_frames: int = 16
    fps: float | None = None
    frame_stride: int | None = None
    size: tuple[int, int] | None = None
    short_clips: str = "skip"
    decode_threads: int = 1

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and self.frame_stride is not None:
            raise ValueError("give fps or frame_stride, not both")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.frame_stride is not None and self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.short_clips not in SHORT_CLIP_POLICIES:
            raise ValueError(f"short_clips must be one of {SHORT_CLIP_POLICIES}, got {self.short_clips!r}")
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be an int or (height, width), got {self.size!r}")
            object.__setattr__(self, "size", size)

    def step(self, clip_fps: float | None) -> float:
        """Clip frames between two sampled frames."""
        if self.frame_stride is not None:
            return float(self.frame_stride)
        if self.fps is not None:
            if not clip_fps or clip_fps <= 0:
                raise ValueError("the clip has no frame rate to resample from")
            return float(clip_fps) / float(self.fps)
        return 1.0

    def span(self, clip_fps: float | None) -> int:
        """Clip frames one sample covers, first to last inclusive."""
        return int(round((self.num_frames - 1) * self.step(clip_fps))) + 1


def plan_indices(spec: FrameSpec, *, lo: int, hi: int, clip_fps: float | None,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
    """Clip frame indices to sample from frames [lo, hi), and whether the
    range was too short. A long enough range gets a start drawn from `rng`
    (None: the first possible start); a short one follows `spec.short_clips`:
    `skip` raises `ShortClip`, `pad` repeats the last frame, `loop` wraps."""
    length = hi - lo
    if length < 1:
        raise ShortClip(f"empty frame range [{lo}, {hi})")
    step = spec.step(clip_fps)
    offsets = np.round(np.arange(spec.num_frames) * step).astype(np.int64)
    span = int(offsets[-1]) + 1
    if span <= length:
        start = lo if rng is None else lo + int(rng.integers(0, length - span + 1))
        return start + offsets, False
    if spec.short_clips == "skip":
        raise ShortClip(f"needs {span} frames, range [{lo}, {hi}) has {length}")
    if spec.short_clips == "pad":
        return lo + np.minimum(offsets, length - 1), True
    return lo + offsets % length, True


def resize_geometry(width: int, height: int, size: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, crop x, crop y): scale so the frame
    covers `size` with its aspect kept, then crop the centre."""
    if size is None:
        return width, height, 0, 0
    out_h, out_w = size
    scale = max(out_w / width, out_h / height)
    sw = max(out_w, math.ceil(width * scale - 1e-6))
    sh = max(out_h, math.ceil(height * scale - 1e-6))
    return sw, sh, (sw - out_w) // 2, (sh - out_h) // 2


def decode_frames(source: str | IO[bytes], indices: np.ndarray, size: tuple[int, int] | None = None, *,
                  threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a video as uint8
    (T, C, H, W), written into `out` when given (e.g. a slot of a batch in
    shared memory). Decoding stops after the last index needed; each frame
    taken is converted to RGB and resized once, and copied once, into its
    place(s)."""
    wanted = np.asarray(indices, dtype=np.int64)
    places: dict[int, list[int]] = {}
    for pos, index in enumerate(wanted.tolist()):
        places.setdefault(index, []).append(pos)
    last = int(wanted.max())
    filled = 0
    with av.open(source, mode="r", metadata_errors="ignore") as container:
        stream = video_stream(container, threads)
        geometry: tuple[int, int, int, int] | None = None
        for index, frame in iter_frames(container, stream):
            if index in places:
                if geometry is None:
                    geometry = resize_geometry(frame.width, frame.height, size)
                sw, sh, x, y = geometry
                rgb = frame.to_ndarray(format="rgb24", width=sw, height=sh)
                if size is not None:
                    rgb = rgb[y : y + size[0], x : x + size[1]]
                if out is None:
                    out = np.empty((len(wanted), 3, rgb.shape[0], rgb.shape[1]), dtype=np.uint8)
                chw = rgb.transpose(2, 0, 1)
                for pos in places[index]:
                    out[pos] = chw
                filled += 1
            if index >= last:
                break
    if filled < len(places):
        raise ValueError(f"video ended before frame {last} ({filled} of {len(places)} frames decoded)")
    assert out is not None
    return out


def pick_caption(row: dict[str, Any], mode: str | None, num_frames: int,
                 rng: np.random.Generator | None) -> tuple[str | None, tuple[int, int]]:
    """The caption a sample carries and the clip frames it describes.

    `clip` / `clip_enhanced`: the clip's caption over the whole clip;
    `window` / `window_enhanced`: one caption window, drawn from `rng`
    (the first without one). Enhanced captions fall back to the plain one."""
    whole = (0, int(num_frames))
    if mode is None:
        return None, whole
    enhanced = mode.endswith("_enhanced")
    if mode.startswith("clip"):
        text = (row.get("caption_enhanced") if enhanced else None) or row.get("caption")
        return text, whole
    windows = [w for w in (row.get("caption_windows") or []) if w and (w.get("caption") or w.get("caption_enhanced"))]
    if not windows:
        return None, whole
    w = windows[0] if rng is None else windows[int(rng.integers(0, len(windows)))]
    text = (w.get("caption_enhanced") if enhanced else None) or w.get("caption")
    return text, (int(w["start_frame"]), int(w["end_frame"]))


CAPTION_MODES = (None, "clip", "clip_enhanced", "window", "window_enhanced")
