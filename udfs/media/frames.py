"""Which frames each consumer stage gets, and how they are shaped.

Consumers (aesthetic scoring, embedding, captioning, ...) are configured as
a mapping name -> spec:

    aesthetic: {policy: sequence, fps: 1, size: 224, crop: true}
    embed:     {policy: uniform, count: 8, size: 224, crop: true}
    caption:   {policy: sequence, fps: 2}

Policies:
- `sequence`: frames at `fps` (optionally at most `max_frames`): frame
  floor(k * clip_fps / fps) for k = 0, 1, ... inside the clip;
- `middle`: the one frame num_frames // 2;
- `uniform`: `count` frames, the centre frame of each of `count` equal
  segments, floor((i + 0.5) * num_frames / count); always exactly `count`
  frames (repeats when the clip is shorter), as 8-frame video embedders need.

Every clip is decoded once for all consumers: the rate-based consumers
(and motion) share a grid at the least common multiple of their rates
(`grid_rate`); each takes every (grid / fps)-th grid point, so a 1 fps
consumer's frames are a subset of a 2 fps consumer's. Uniform/middle
indices join the union. Each needed frame is converted from YUV once per
distinct output geometry, in swscale.

Sizes: `size: null` keeps the decoded size; `size: N` scales the shorter
side to N (keeping the aspect ratio), and with `crop: true` then takes the
centre N x N; `size: [H, W]` scales to exactly H x W.

The frames travel to their consumer in the transient columns
`udfs.schema.frame_fields(name)`; the consumer drops them after use
(`drop_frame_columns`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa

from udfs.schema import frame_columns

POLICIES = ("sequence", "middle", "uniform")
INTERPOLATIONS = ("FAST_BILINEAR", "BILINEAR", "BICUBIC", "AREA", "LANCZOS")


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
    name: str
    policy: str = "sequence"
    fps: float | None = None
    count: int | None = None
    size: int | tuple[int, int] | None = None
    crop: bool = False
    max_frames: int | None = None
    interpolation: str = "BICUBIC"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"frames.{self.name}.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "sequence" and (self.fps is None or self.fps <= 0):
            raise ValueError(f"frames.{self.name}: policy 'sequence' needs fps > 0")
        if self.policy == "uniform" and (self.count is None or self.count < 1):
            raise ValueError(f"frames.{self.name}: policy 'uniform' needs count >= 1")
        if self.crop and not isinstance(self.size, int):
            raise ValueError(f"frames.{self.name}: crop needs an int size (the square side)")
        if self.interpolation.upper() not in INTERPOLATIONS:
            raise ValueError(f"frames.{self.name}.interpolation must be one of {INTERPOLATIONS}")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> FrameSpec:
        cfg = dict(cfg)
        size = cfg.pop("size", None)
        if size is not None and not isinstance(size, int):
            size = (int(size[0]), int(size[1]))
        unknown = set(cfg) - {"policy", "fps", "count", "crop", "max_frames", "interpolation"}
        if unknown:
            raise ValueError(f"frames.{name}: unknown keys {sorted(unknown)}")
        return cls(name=name, size=size, **cfg)

    @property
    def rate(self) -> Fraction | None:
        return as_fraction(self.fps) if self.policy == "sequence" else None

    def scaled_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the decoder scales to, before any centre crop."""
        if self.size is None:
            return height, width
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
        if self.crop:
            return self.size, self.size  # type: ignore[return-value]
        return self.scaled_hw(height, width)


def parse_consumers(consumers: Mapping[str, Mapping[str, Any]] | None) -> list[FrameSpec]:
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


def centre_crop(frame: np.ndarray, side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    y0, x0 = (h - side) // 2, (w - side) // 2
    return frame[y0 : y0 + side, x0 : x0 + side]


def drop_frame_columns(table: pa.Table, consumer: str) -> pa.Table:
    """Remove a consumer's transient frame columns once it has used them."""
    present = [c for c in frame_columns(consumer) if c in table.column_names]
    return table.drop_columns(present) if present else table
