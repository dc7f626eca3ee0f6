"""The cheap quality signals, as numpy over luma planes (uint8, H x W).

- Bars: a row or column is black when its mean luma is at most `limit`
  (FFmpeg cropdetect's test, whose default limit is 24); a frame's bars are
  the black rows and columns from each edge inwards, and a clip's are the
  median over its sampled frames that are not black all over, so a subtitle
  in the bar or a fade to black does not move them.
- Sharpness: the variance of the 4-neighbour Laplacian of luma, at a fixed
  analysis size (the shorter side scaled to `quality.sharpness.size`), so a
  4K and a 480p copy of the same shot score alike. Inside the bars only.
- Exposure: mean and standard deviation of luma in 0-1; a frame is black
  when nearly all its pixels are (FFmpeg blackdetect's rule), frozen when
  its mean absolute difference to the sampled frame before is tiny
  (freezedetect's).
- Scene change: FFmpeg's `scene` score between consecutive frames,
  min(MAFD, |MAFD - previous MAFD|) / 100 over luma, which rises at a cut
  and stays low through steady motion, where MAFD is high on every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bars:
    top: int
    bottom: int
    left: int
    right: int

    def fraction(self, height: int, width: int) -> float:
        """Share of an H x W frame the bars cover."""
        inner = max(0, height - self.top - self.bottom) * max(0, width - self.left - self.right)
        return 1.0 - inner / float(height * width)


def _edge_run(means: np.ndarray, limit: float) -> int:
    """How many leading entries of `means` are black (at most `limit`)."""
    bright = np.flatnonzero(means > limit)
    return int(bright[0]) if len(bright) else len(means)


def frame_bars(luma: np.ndarray, limit: float) -> Bars | None:
    """The bars of one frame, or None when the whole frame is black."""
    rows = luma.mean(axis=1, dtype=np.float32)
    top = _edge_run(rows, limit)
    if top == len(rows):
        return None
    bottom = _edge_run(rows[::-1], limit)
    cols = luma[top:len(rows) - bottom].mean(axis=0, dtype=np.float32)
    return Bars(top, bottom, _edge_run(cols, limit), _edge_run(cols[::-1], limit))


def clip_bars(frames: list[Bars | None]) -> Bars | None:
    """The bars stable over a clip: per edge, the median over the frames that
    are not black (None when every sampled frame is)."""
    seen = [b for b in frames if b is not None]
    if not seen:
        return None
    edges = np.array([[b.top, b.bottom, b.left, b.right] for b in seen])
    # The lower median: a bar is never reported wider than half the frames saw it.
    med = np.sort(edges, axis=0)[(len(seen) - 1) // 2]
    return Bars(*(int(v) for v in med))


def laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a luma plane (0-255 scale)."""
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    y = luma.astype(np.float32)
    lap = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def inside(luma: np.ndarray, bars: Bars | None, height: int, width: int) -> np.ndarray:
    """The part of `luma` (a scaled copy of an H x W frame) inside `bars`."""
    if bars is None:
        return luma
    sy, sx = luma.shape[0] / height, luma.shape[1] / width
    y0, y1 = int(np.ceil(bars.top * sy)), luma.shape[0] - int(np.ceil(bars.bottom * sy))
    x0, x1 = int(np.ceil(bars.left * sx)), luma.shape[1] - int(np.ceil(bars.right * sx))
    if y1 - y0 < 3 or x1 - x0 < 3:
        return luma
    return luma[y0:y1, x0:x1]


def black_luma(black_level: float) -> float:
    """The luma (0-255, limited range) at or below which a pixel is black."""
    return 16.0 + black_level * (235.0 - 16.0)


def is_black(luma: np.ndarray, black_level: float, black_share: float) -> bool:
    return float(np.mean(luma <= black_luma(black_level))) >= black_share


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two luma planes of one size (0-255)."""
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


@dataclass(frozen=True)
class Exposure:
    brightness: float
    contrast: float
    black_frame_ratio: float
    frozen_frame_ratio: float | None


def exposure(frames: list[np.ndarray], black_level: float, black_share: float, frozen_delta: float) -> Exposure | None:
    """A clip's exposure signals from its sampled luma planes (None: none sampled).
    The frozen share is over the frames that have one before them (None with one frame)."""
    if not frames:
        return None
    brightness = float(np.mean([f.mean() for f in frames])) / 255.0
    contrast = float(np.mean([f.std() for f in frames])) / 255.0
    black = float(np.mean([is_black(f, black_level, black_share) for f in frames]))
    frozen = None
    if len(frames) > 1:
        frozen = float(np.mean([mean_abs_diff(a, b) / 255.0 < frozen_delta for a, b in zip(frames, frames[1:])]))
    return Exposure(brightness, contrast, black, frozen)


class SceneChange:
    """FFmpeg's scene score over a stream of luma planes, one at a time."""

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None
        self._prev_mafd: float | None = None
        self.max_score = 0.0
        self.pairs = 0

    def add(self, luma: np.ndarray) -> None:
        if self._prev is not None and self._prev.shape == luma.shape:
            mafd = mean_abs_diff(luma, self._prev)
            diff = abs(mafd - self._prev_mafd) if self._prev_mafd is not None else mafd
            self.max_score = max(self.max_score, min(1.0, max(0.0, min(mafd, diff) / 100.0)))
            self._prev_mafd = mafd
            self.pairs += 1
        self._prev = luma
