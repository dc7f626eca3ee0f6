"""Which frames of a clip a consumer takes, at what size, and decoding them.

One vocabulary for every frame consumer: the clip stages (aesthetic
scoring, embedding, captioning, ...) and the training loader both describe
what they want as a `FrameSpec`, and take frames through `FrameShaper`.

Clip stages are configured as a mapping name -> spec:

    aesthetic: {policy: sequence, fps: 1, size: 224, crop: true}
    embed:     {policy: uniform, count: 8, size: 224, crop: true}
    caption:   {policy: sequence, fps: 2}

Policies:
- `sequence`: frames at `fps` (optionally at most `max_frames`): frame
  floor(k * clip_fps / fps) for k = 0, 1, ... inside the clip;
- `middle`: the one frame num_frames // 2;
- `uniform`: `count` frames, the centre frame of each of `count` equal
  segments, floor((i + 0.5) * num_frames / count); always exactly `count`
  frames (repeats when the clip is shorter), as 8-frame video embedders need;
- `window`: `count` consecutive samples `frame_stride` frames apart, or at
  `fps`, from a start drawn per sample (`window_indices`): a training
  sample. `short_clips` says what a clip shorter than the window gives:
  `skip` (raises `ShortClip`), `pad` (repeats the last frame) or `loop`.

Every clip is decoded once for all clip-stage consumers: the rate-based
consumers (and motion) share a grid at the least common multiple of their
rates (`grid_rate`); each takes every (grid / fps)-th grid point, so a 1 fps
consumer's frames are a subset of a 2 fps consumer's. Uniform/middle
indices join the union. Each needed frame is converted from YUV once per
distinct output geometry, in swscale (`FrameShaper`).

Sizes: `size: null` keeps the decoded size; `size: N` scales the shorter
side to N (keeping the aspect ratio); `size: [H, W]` scales to exactly
H x W. `crop: true` scales so the frame covers the output (N x N, or
H x W) with its aspect kept, then takes the centre.

Indices are frames in decode order, the numbering of the clip table's
`num_frames` and `caption_windows` spans. The frames travel to a clip-stage
consumer in the transient columns `udfs.schema.frame_fields(name)`; the
consumer drops them after use (`drop_frame_columns`).

PyAV is imported only where frames are decoded, so the model stages that
import this module load on machines without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from udfs.schema import frame_columns

if TYPE_CHECKING:
    import av

POLICIES = ("sequence", "middle", "uniform", "window")
# Policies a clip stage may ask for: `window` draws a start per sample.
CONSUMER_POLICIES = ("sequence", "middle", "uniform")
SHORT_CLIP_POLICIES = ("skip", "pad", "loop")
INTERPOLATIONS = ("FAST_BILINEAR", "BILINEAR", "BICUBIC", "AREA", "LANCZOS")


class SkipClip(Exception):
    """A clip a sampler does not turn into a sample (counted, not an error)."""


class ShortClip(SkipClip):
    """The clip (or caption window) has fewer frames than the spec needs."""


def as_fraction(rate: float | int | str | Fraction) -> Fraction:
    return Fraction(rate).limit_denominator(1001) if not isinstance(rate, Fraction) else rate


def lcm_rate(rates: Iterable[Fraction]) -> Fraction | None:
    """Least common multiple of rational rates: lcm(numerators)/gcd(denominators)."""
    result: Fraction | None = None
    for rate in rates:
        if result is None:
            result = rate
            continue
        num = math.lcm(result.numerator, rate.numerator)
        den = math.gcd(result.denominator, rate.denominator)
        result = Fraction(num, den)
    return result


@dataclass(frozen=True)
class FrameSpec:
    """What one consumer takes from a clip; see the module docstring."""

    name: str = "frames"
    policy: str = "sequence"
    fps: float | None = None
    count: int | None = None
    frame_stride: int | None = None
    size: int | tuple[int, int] | None = None
    crop: bool = False
    max_frames: int | None = None
    interpolation: str = "BICUBIC"
    short_clips: str = "skip"

    def __post_init__(self) -> None:
        where = f"frames.{self.name}"
        if self.policy not in POLICIES:
            raise ValueError(f"{where}.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "sequence" and (self.fps is None or self.fps <= 0):
            raise ValueError(f"{where}: policy 'sequence' needs fps > 0")
        if self.policy in ("uniform", "window") and (self.count is None or self.count < 1):
            raise ValueError(f"{where}: policy {self.policy!r} needs count >= 1, got {self.count}")
        if self.policy == "window":
            if self.fps is not None and self.frame_stride is not None:
                raise ValueError(f"{where}: give fps or frame_stride, not both")
            if self.fps is not None and self.fps <= 0:
                raise ValueError(f"{where}: fps must be positive, got {self.fps}")
            if self.frame_stride is not None and self.frame_stride < 1:
                raise ValueError(f"{where}: frame_stride must be >= 1, got {self.frame_stride}")
        elif self.frame_stride is not None:
            raise ValueError(f"{where}: frame_stride belongs to policy 'window'")
        if self.short_clips not in SHORT_CLIP_POLICIES:
            raise ValueError(f"{where}.short_clips must be one of {SHORT_CLIP_POLICIES}, got {self.short_clips!r}")
        if self.size is not None and not isinstance(self.size, int):
            size = tuple(int(v) for v in self.size)
            if len(size) != 2:
                raise ValueError(f"{where}.size must be an int or [height, width], got {self.size!r}")
            object.__setattr__(self, "size", size)
        if self.size is not None and min(self.output_size or (1,)) < 1:
            raise ValueError(f"{where}.size must be positive, got {self.size!r}")
        if self.crop and self.size is None:
            raise ValueError(f"{where}: crop needs a size")
        if self.interpolation.upper() not in INTERPOLATIONS:
            raise ValueError(f"{where}.interpolation must be one of {INTERPOLATIONS}")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> FrameSpec:
        """A clip stage's spec from its `frames.<name>` config node."""
        cfg = dict(cfg)
        unknown = set(cfg) - {"policy", "fps", "count", "size", "crop", "max_frames", "interpolation"}
        if unknown:
            raise ValueError(f"frames.{name}: unknown keys {sorted(unknown)}")
        if cfg.get("policy", "sequence") not in CONSUMER_POLICIES:
            raise ValueError(f"frames.{name}.policy must be one of {CONSUMER_POLICIES}, got {cfg['policy']!r}")
        return cls(name=name, **cfg)

    @classmethod
    def window(cls, count: int, *, fps: float | None = None, frame_stride: int | None = None,
               size: int | tuple[int, int] | None = None, short_clips: str = "skip") -> FrameSpec:
        """A training sample: `count` frames `frame_stride` apart or at `fps`
        (neither: consecutive), scaled to cover `size` and centre-cropped.
        Bilinear, as PyAV scales by default."""
        square = (size, size) if isinstance(size, int) else size
        return cls(name="sample", policy="window", count=count, fps=fps, frame_stride=frame_stride, size=square,
                   crop=square is not None, interpolation="BILINEAR", short_clips=short_clips)

    @property
    def rate(self) -> Fraction | None:
        return as_fraction(self.fps) if self.policy == "sequence" else None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(h, w) of every frame this spec gives, when it does not depend on the clip."""
        if isinstance(self.size, tuple):
            return self.size
        return (self.size, self.size) if self.crop and self.size is not None else None

    def scaled_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the decoder scales to, before any centre crop."""
        if self.size is None:
            return height, width
        if self.crop:
            out_h, out_w = self.output_size  # type: ignore[misc]
            scale = max(out_h / height, out_w / width)
            if (round(height * scale), round(width * scale)) == (height, width):
                return height, width
            # Round, never below the output: the frame must cover it.
            return max(out_h, round(height * scale)), max(out_w, round(width * scale))
        if isinstance(self.size, tuple):
            return self.size
        short = min(height, width)
        if short == self.size:
            return height, width
        # Round so the shorter side is exactly `size`.
        if height <= width:
            return self.size, max(self.size, round(width * self.size / height))
        return max(self.size, round(height * self.size / width)), self.size

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        return self.output_size if self.crop else self.scaled_hw(height, width)  # type: ignore[return-value]

    def step(self, clip_fps: float | None) -> float:
        """Clip frames between two samples of a `window`."""
        if self.frame_stride is not None:
            return float(self.frame_stride)
        if self.fps is not None:
            if not clip_fps or clip_fps <= 0:
                raise ValueError("the clip has no frame rate to resample from")
            return float(clip_fps) / float(self.fps)
        return 1.0

    def span(self, clip_fps: float | None) -> int:
        """Clip frames one `window` covers, first to last inclusive."""
        return int(round((self.count - 1) * self.step(clip_fps))) + 1  # type: ignore[operator]


def parse_consumers(consumers: Mapping[str, Mapping[str, Any]] | None) -> list[FrameSpec]:
    """The clip-stage specs of a `frames` config mapping."""
    return [FrameSpec.from_config(name, cfg) for name, cfg in (consumers or {}).items()]


def rate_indices(num_frames: int, clip_fps: Fraction, rate: Fraction, limit: int | None = None) -> list[int]:
    """floor(k * clip_fps / rate) for k = 0.. while inside the clip; unique,
    so a rate above the clip's frame rate yields every frame once."""
    out: list[int] = []
    step = clip_fps / rate
    k = 0
    while True:
        idx = math.floor(k * step)
        if idx >= num_frames:
            break
        if not out or idx != out[-1]:
            out.append(idx)
            if limit is not None and len(out) >= limit:
                break
        k += 1
    return out


def uniform_indices(num_frames: int, count: int) -> list[int]:
    if num_frames <= 0:
        return []
    return [min(num_frames - 1, math.floor((i + 0.5) * num_frames / count)) for i in range(count)]


def window_indices(spec: FrameSpec, *, lo: int, hi: int, clip_fps: float | None,
                   rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
    """A `window` spec's frame indices inside frames [lo, hi), and whether
    the range was too short. A long enough range gets a start drawn from
    `rng` (None: the first possible start); a short one follows
    `spec.short_clips`."""
    length = hi - lo
    if length < 1:
        raise ShortClip(f"empty frame range [{lo}, {hi})")
    offsets = np.round(np.arange(spec.count) * spec.step(clip_fps)).astype(np.int64)  # type: ignore[arg-type]
    span = int(offsets[-1]) + 1
    if span <= length:
        start = lo if rng is None else lo + int(rng.integers(0, length - span + 1))
        return start + offsets, False
    if spec.short_clips == "skip":
        raise ShortClip(f"needs {span} frames, range [{lo}, {hi}) has {length}")
    if spec.short_clips == "pad":
        return lo + np.minimum(offsets, length - 1), True
    return lo + offsets % length, True


@dataclass
class DecodePlan:
    """Frame indices per consumer and the union the decoder must convert."""

    grid_rate: Fraction | None
    consumer_indices: dict[str, list[int]]
    motion_indices: list[int]
    needed: dict[int, set[str]] = field(default_factory=dict)  # frame index -> consumer names


def plan_decode(
    specs: list[FrameSpec], num_frames: int, clip_fps: Fraction, motion_rate: Fraction | None = None
) -> DecodePlan:
    rates = [s.rate for s in specs if s.rate is not None]
    if motion_rate is not None:
        rates.append(motion_rate)
    grid_rate = lcm_rate(rates)
    assert grid_rate is None or all((grid_rate / r).denominator == 1 for r in rates)

    # Grid position k is time k / grid_rate, frame floor(k * clip_fps / grid_rate).
    # A consumer at `rate` takes every (grid_rate / rate)-th position k = j *
    # grid_rate / rate, i.e. frame floor(j * clip_fps / rate): computed directly,
    # which never materialises a grid finer than the consumers need.
    def from_grid(rate: Fraction, limit: int | None) -> list[int]:
        return rate_indices(num_frames, clip_fps, rate, limit)

    consumer_indices: dict[str, list[int]] = {}
    for spec in specs:
        if spec.policy == "sequence":
            consumer_indices[spec.name] = from_grid(spec.rate, spec.max_frames)  # type: ignore[arg-type]
        elif spec.policy == "middle":
            consumer_indices[spec.name] = [num_frames // 2] if num_frames > 0 else []
        else:
            consumer_indices[spec.name] = uniform_indices(num_frames, spec.count)  # type: ignore[arg-type]
    motion_indices = from_grid(motion_rate, None) if motion_rate is not None else []
    needed: dict[int, set[str]] = {}
    for name, indices in consumer_indices.items():
        for idx in indices:
            needed.setdefault(idx, set()).add(name)
    return DecodePlan(grid_rate, consumer_indices, motion_indices, needed)


def centre_crop(frame: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """The centre `size` (a side, or (h, w)) of an (H, W, ...) array."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = frame.shape[:2]
    y0, x0 = (h - out_h) // 2, (w - out_w) // 2
    return frame[y0 : y0 + out_h, x0 : x0 + out_w]


class FrameShaper:
    """Decoded frames -> RGB arrays at each spec's geometry.

    A frame several specs want is converted once per distinct (scaled size,
    interpolation); the swscale contexts are kept across frames and clips (a
    fresh one per frame costs more than the conversion). One per thread."""

    def __init__(self) -> None:
        self._reformatters: dict[tuple[int, int, str], Any] = {}

    def shape(self, frame: av.VideoFrame, specs: Iterable[FrameSpec]) -> dict[str, np.ndarray]:
        """Each spec's (h, w, 3) uint8 view of `frame`, by spec name."""
        from av.video.reformatter import VideoReformatter

        converted: dict[tuple[int, int, str], np.ndarray] = {}
        out: dict[str, np.ndarray] = {}
        for spec in specs:
            sh, sw = spec.scaled_hw(frame.height, frame.width)
            key = (sh, sw, spec.interpolation.upper())
            if key not in converted:
                reformatter = self._reformatters.setdefault(key, VideoReformatter())
                converted[key] = reformatter.reformat(
                    frame, width=sw, height=sh, format="rgb24", interpolation=key[2]).to_ndarray()
            rgb = converted[key]
            out[spec.name] = centre_crop(rgb, spec.output_size) if spec.crop else rgb  # type: ignore[arg-type]
        return out

    def shape_image(self, image: np.ndarray, spec: FrameSpec) -> np.ndarray:
        """An (H, W, 3) uint8 image shaped as `spec` shapes clip frames (an image query)."""
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        return np.ascontiguousarray(self.shape(frame, [spec])[spec.name])


def decode_frames(source: str | IO[bytes], spec: FrameSpec, indices: np.ndarray, *, threads: int = 1,
                  out: np.ndarray | None = None, shaper: FrameShaper | None = None) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a video, shaped by
    `spec`, as uint8 (T, C, H, W), written into `out` when given (e.g. a slot
    of a batch in shared memory). `source` is a path or any file-like object
    PyAV reads (a Lance `BlobFile`). Decoding stops after the last index
    needed; each frame taken is converted once and copied once into its
    place(s)."""
    import av

    from udfs.media.video import iter_frames, video_stream

    shaper = shaper or FrameShaper()
    wanted = np.asarray(indices, dtype=np.int64)
    places: dict[int, list[int]] = {}
    for pos, index in enumerate(wanted.tolist()):
        places.setdefault(index, []).append(pos)
    last = int(wanted.max())
    filled = 0
    with av.open(source, mode="r", metadata_errors="ignore") as container:
        stream = video_stream(container, threads)
        for index, frame in iter_frames(container, stream):
            if index in places:
                rgb = shaper.shape(frame, [spec])[spec.name]
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


def drop_frame_columns(table: pa.Table, consumer: str) -> pa.Table:
    """Remove a consumer's transient frame columns once it has used them."""
    present = [c for c in frame_columns(consumer) if c in table.column_names]
    return table.drop_columns(present) if present else table
