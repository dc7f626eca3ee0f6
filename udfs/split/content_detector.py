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
"""

from __future__ import annotations

import numpy as np

HIST_BITS = 3
HIST_BINS = 1 << (3 * HIST_BITS)


def color_histograms(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 512) float32, each row summing to 1."""
    n = len(frames)
    shift = 8 - HIST_BITS
    q = (frames >> shift).astype(np.int32)
    bins = (q[..., 0] << (2 * HIST_BITS)) | (q[..., 1] << HIST_BITS) | q[..., 2]
    bins = bins.reshape(n, -1) + (np.arange(n, dtype=np.int32) * HIST_BINS)[:, None]
    counts = np.bincount(bins.ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
    return counts.astype(np.float32) / max(1, bins.shape[1])


def pair_changes(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histograms (N, 512), d (N-1,) and the pixel term min(1, 4*pixel_diff) (N-1,)."""
    hist = color_histograms(frames)
    hist_l1 = 0.5 * np.abs(np.diff(hist, axis=0)).sum(axis=1)
    pixels = frames.astype(np.int16)
    pixel_step = np.minimum(1.0, 4.0 * np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2, 3)) / 255.0)
    return hist, (hist_l1 + pixel_step) / 2.0, pixel_step


def cut_strength(d: np.ndarray) -> np.ndarray:
    padded = np.concatenate([[0.0], d, [0.0]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    return np.clip(d - neighbours, 0.0, 1.0)


def _window_max(x: np.ndarray, radius: int) -> np.ndarray:
    """max of x[i-radius : i+radius+1], clipped at the edges."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(x, radius, mode="constant", constant_values=-np.inf)
    return sliding_window_view(padded, 2 * radius + 1).max(axis=1)


def gradual_strength(hist: np.ndarray, pixel_step: np.ndarray, k: int) -> np.ndarray:
    """Per pair (i, i+1): colour change across [i-k+1, i] vs [i+1, i+k]."""
    n_pairs = len(hist) - 1
    out = np.zeros(n_pairs, dtype=np.float32)
    if k < 2 or n_pairs < 2 * k:
        return out
    csum = np.concatenate([np.zeros((1, hist.shape[1]), np.float64), np.cumsum(hist, axis=0, dtype=np.float64)])
    i = np.arange(k - 1, n_pairs - k + 1)  # pairs with k frames on both sides
    before = (csum[i + 1] - csum[i + 1 - k]) / k
    after = (csum[i + 1 + k] - csum[i + 1]) / k
    change = 0.5 * np.abs(after - before).sum(axis=1)
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


def content_scores(frames: np.ndarray, fps: float, *, gradual_s: float | None) -> np.ndarray:
    """(N, H, W, 3) uint8 frames -> (N,) float32 transition scores in [0, 1]."""
    n = len(frames)
    scores = np.zeros(n, dtype=np.float32)
    if n < 2:
        return scores
    hist, d, pixel_step = pair_changes(frames)
    pair_scores = cut_strength(d)
    if gradual_s:
        k = int(round(gradual_s * fps / 2))
        pair_scores = np.maximum(pair_scores, gradual_strength(hist, pixel_step, k))
    scores[:-1] = pair_scores
    return scores
