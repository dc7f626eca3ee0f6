"""Fast non-ML shot-transition scores from tiny decoded frames (numpy only).

Per frame pair (i, i+1) the change is

    d[i] = (hist_l1[i] + min(1, 4 * pixel_diff[i])) / 2          in [0, 1]

where hist_l1 is half the L1 distance between the frames' normalised
512-bin RGB histograms (3 bits per channel; 1 = disjoint colours) and
pixel_diff the mean absolute RGB difference / 255. Histograms catch palette
changes regardless of motion; the pixel term catches cuts between shots of
similar palette.

Scores (the `transition_probs` of `ContentSplit`), all in [0, 1], same
convention as TransNetV2's (score i = transition between frames i and i+1):

- cut strength: d[i] - max(d[i-1], d[i+1]), clipped at 0. A hard cut is a
  one-pair spike; camera motion, fades and flashes raise neighbouring pairs
  too and cancel out. ~0.3-0.9 for a cut, ~0-0.15 within a shot.
- gradual strength (dissolves, fades): D[i] = hist_l1 between the mean
  histograms of the `k` frames before and after the pair, minus the largest
  single-pair pixel term inside that span (so hard cuts do not count twice),
  kept only at the middle of the bump's span above half its height.
  k = round(gradual_s * fps / 2).

The score is max(cut, gradual). Unlike TransNetV2's, it is not a calibrated
probability; the default threshold (conf/split/content.yaml) is 0.2.

`ContentScorer` takes the frames in chunks of any size and keeps only
per-pair scalars (hist_l1, the pixel term, the gradual change D) plus the
colour counts of the last 2k - 1 frames and the last frame: the overlap each
chunk needs from the one before. Memory is therefore flat in video length.
Histograms are integer counts, and every sum over them is exact, so the
scores do not depend on where the chunks start: any chunking gives exactly
the scores of the whole video at once (`content_scores`).
"""

from __future__ import annotations

import numpy as np

HIST_BITS = 3
HIST_BINS = 1 << (3 * HIST_BITS)


def color_counts(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 512) int64 pixel counts per colour bin."""
    n = len(frames)
    shift = 8 - HIST_BITS
    q = (frames >> shift).astype(np.int32)
    bins = (q[..., 0] << (2 * HIST_BITS)) | (q[..., 1] << HIST_BITS) | q[..., 2]
    bins = bins.reshape(n, -1) + (np.arange(n, dtype=np.int32) * HIST_BINS)[:, None]
    return np.bincount(bins.ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS).astype(np.int64)


def color_histograms(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 512) float32, each row summing to 1."""
    pixels = max(1, frames.shape[1] * frames.shape[2]) if frames.ndim == 4 else 1
    return color_counts(frames).astype(np.float32) / pixels


def cut_strength(d: np.ndarray) -> np.ndarray:
    padded = np.concatenate([[0.0], d, [0.0]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    return np.clip(d - neighbours, 0.0, 1.0)


def _window_max(x: np.ndarray, radius: int) -> np.ndarray:
    """max of x[i-radius : i+radius+1], clipped at the edges."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(x, radius, mode="constant", constant_values=-np.inf)
    return sliding_window_view(padded, 2 * radius + 1).max(axis=1)


def gradual_peaks(change: np.ndarray, pixel_step: np.ndarray, k: int) -> np.ndarray:
    """Gradual strength per pair, from D (`change`, one value per pair
    k-1 .. n_pairs-k: colour change across [i-k+1, i] vs [i+1, i+k]) and the
    pixel term of every pair."""
    n_pairs = len(pixel_step)
    out = np.zeros(n_pairs, dtype=np.float32)
    if k < 2 or n_pairs < 2 * k:
        return out
    i = np.arange(k - 1, n_pairs - k + 1)  # pairs with k frames on both sides
    assert len(change) == len(i), (len(change), len(i))
    # A hard cut inside the span explains the change by itself.
    biggest_step = _window_max(pixel_step, k - 1)[i]
    strength = np.clip(change - biggest_step, 0.0, 1.0)
    # One pair per bump, at the middle of the bump's span above half its
    # height: for fades through black the maximum itself sits off-centre.
    is_peak = (change >= _window_max(change, k) - 1e-6) & (strength > 0)
    peaks = np.zeros_like(strength)
    run_start = None
    for j, flag in enumerate(np.append(is_peak, False)):
        if flag and run_start is None:
            run_start = j
        elif not flag and run_start is not None:
            top = (run_start + j - 1) // 2
            half = change[top] / 2 + np.min(change[max(0, top - 2 * k) : top + 2 * k + 1]) / 2
            lo = top
            while lo > 0 and change[lo - 1] >= half and top - lo < 2 * k:
                lo -= 1
            hi = top
            while hi < len(change) - 1 and change[hi + 1] >= half and hi - top < 2 * k:
                hi += 1
            mid = (lo + hi) // 2
            peaks[mid] = max(peaks[mid], strength[top])
            run_start = None
    out[i] = peaks
    return out


class ContentScorer:
    """Transition scores of one video fed as consecutive frame chunks.

    `feed` each chunk in order, then `finish` for the (N,) float32 scores.
    What is kept between chunks is the overlap the next chunk's pairs need
    (the last frame, the counts of the last 2k - 1 frames) and one float per
    pair for each of hist_l1, the pixel term and D.
    """

    def __init__(self, fps: float, *, gradual_s: float | None) -> None:
        self.k = int(round(gradual_s * fps / 2)) if gradual_s else 0
        self.frames = 0
        self._last_frame: np.ndarray | None = None
        self._last_counts: np.ndarray | None = None
        self._tail = np.zeros((0, HIST_BINS), dtype=np.int64)  # counts of the last 2k - 1 frames
        self._next_change = max(0, self.k - 1)  # first pair whose D is not computed yet
        self._hist_l1: list[np.ndarray] = []
        self._pixel: list[np.ndarray] = []
        self._change: list[np.ndarray] = []
        self._pixels_per_frame = 0

    def feed(self, frames: np.ndarray) -> None:
        if len(frames) == 0:
            return
        pixels = frames.shape[1] * frames.shape[2]
        if self._pixels_per_frame and pixels != self._pixels_per_frame:
            raise ValueError(f"frame size changed within a video: {frames.shape[1:]}")
        self._pixels_per_frame = pixels = max(1, pixels)
        counts = color_counts(frames)
        if self._last_frame is not None:
            both = np.concatenate([self._last_frame, frames])
            both_counts = np.concatenate([self._last_counts, counts])
        else:
            both, both_counts = frames, counts
        if len(both) >= 2:
            # half the L1 distance of the normalised histograms, from exact integer sums
            self._hist_l1.append(np.abs(np.diff(both_counts, axis=0)).sum(axis=1) / (2.0 * pixels))
            step = np.abs(np.diff(both.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
            self._pixel.append(np.minimum(1.0, 4.0 * step / 255.0))
        self._last_frame, self._last_counts = frames[-1:].copy(), counts[-1:]
        first = self.frames - len(self._tail)  # frame index of the first row below
        self.frames += len(frames)
        k = self.k
        if k >= 2:
            window = np.concatenate([self._tail, counts])
            last_pair = self.frames - 1 - k  # the last pair with k frames after it
            if last_pair >= self._next_change:
                csum = np.concatenate([np.zeros((1, HIST_BINS), np.int64), np.cumsum(window, axis=0)])
                local = np.arange(self._next_change, last_pair + 1) - first
                before = csum[local + 1] - csum[local + 1 - k]
                after = csum[local + 1 + k] - csum[local + 1]
                self._change.append(np.abs(after - before).sum(axis=1) / (2.0 * k * pixels))
                self._next_change = last_pair + 1
            self._tail = window[-(2 * k - 1):].copy()

    def finish(self) -> np.ndarray:
        scores = np.zeros(self.frames, dtype=np.float32)
        if self.frames < 2:
            return scores
        hist_l1 = np.concatenate(self._hist_l1)
        pixel_step = np.concatenate(self._pixel)
        pair_scores = cut_strength((hist_l1 + pixel_step) / 2.0)
        if self.k >= 2:
            change = np.concatenate(self._change) if self._change else np.zeros(0)
            pair_scores = np.maximum(pair_scores, gradual_peaks(change, pixel_step, self.k))
        scores[:-1] = pair_scores
        return scores


def content_scores(frames: np.ndarray, fps: float, *, gradual_s: float | None) -> np.ndarray:
    """(N, H, W, 3) uint8 frames -> (N,) float32 transition scores in [0, 1],
    the whole video at once (`ContentScorer` gives the same from chunks)."""
    scorer = ContentScorer(fps, gradual_s=gradual_s)
    scorer.feed(frames)
    return scorer.finish()
