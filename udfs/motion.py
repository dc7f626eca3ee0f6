"""Motion scores from codec motion vectors (no optical flow, no RGB).

The decoder exports the motion vectors it already parsed (FFmpeg
`flags2=+export_mvs`); they are turned into a dense per-pixel flow field
exactly as NeMo Curator's motion filter does:

- only blocks of size 8x8, 16x16, 16x8 and 8x16 are used, in that order;
- each block covers the pixels x in [dst_x - w/2, dst_x + w/2),
  y in [dst_y - h/2, dst_y + h/2) (dst is the block centre), clamped to the
  frame, and gets the flow `-motion / motion_scale`;
- where several vectors cover a pixel (a bi-predicted block has a forward
  and a backward one) the last one written wins;
- pixels no vector covers (intra blocks) have zero flow;
- per-pixel magnitude = |flow| / (H + W).

Scores of a clip over its sampled frames that carry motion vectors
(I-frames carry none and are skipped, as in NeMo):

- `motion_global_mean`: mean magnitude over all pixels and frames;
- `motion_per_patch_min`: the per-pixel mean over frames, average-pooled
  over 256x256 patches, then the minimum patch. Partial patches at the
  right/bottom border count as patches (averaged over the pixels they
  hold), so every pixel is covered and frames smaller than 256 px form a
  single patch. (NeMo instead samples the per-pixel map with
  `cv2.resize(fx=1/256, INTER_LINEAR)`, which interpolates a few pixels per
  patch rather than averaging, and rejects frames under 256 px.)

A clip is low-motion if global_mean < 0.00098 or per_patch_min < 1e-6
(NeMo's defaults; both configurable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("disable", "score-only", "enable")

# NeMo's block-size order; the order decides which vector wins on overlap.
BLOCK_SIZES: tuple[tuple[int, int], ...] = ((8, 8), (16, 16), (16, 8), (8, 16))


@dataclass(frozen=True)
class MotionSettings:
    mode: str = "score-only"
    global_mean_threshold: float = 0.00098
    per_patch_min_threshold: float = 1e-6
    # Motion vectors are read from the frames sampled at this rate.
    fps: float = 2.0
    patch_size: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"motion.mode must be one of {MODES}, got {self.mode!r}")
        if self.fps <= 0:
            raise ValueError(f"motion.fps must be > 0, got {self.fps}")
        if self.patch_size <= 0:
            raise ValueError(f"motion.patch_size must be > 0, got {self.patch_size}")

    @property
    def enabled(self) -> bool:
        return self.mode != "disable"


@dataclass(frozen=True)
class MotionScores:
    global_mean: float
    per_patch_min: float
    num_frames: int


def flow_field(mvs: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Dense (H, W, 2) float32 flow from one frame's structured motion-vector
    array (PyAV `MOTION_VECTORS` side data `.to_ndarray()`)."""
    if out is None or out.shape != (height * width, 2):
        out = np.zeros((height * width, 2), dtype=np.float32)
    else:
        out.fill(0.0)
    if len(mvs):
        w_all = mvs["w"].astype(np.int64)
        h_all = mvs["h"].astype(np.int64)
        scale = mvs["motion_scale"].astype(np.float32)
        scale[scale == 0] = 1.0
        delta = np.stack([-mvs["motion_x"] / scale, -mvs["motion_y"] / scale], axis=-1).astype(np.float32)
        for bw, bh in BLOCK_SIZES:
            sel = np.flatnonzero((w_all == bw) & (h_all == bh))
            if not len(sel):
                continue
            # (k, bw, bh) pixel coordinates of every selected block, clamped
            # into the frame like NeMo's index clamp.
            xs = mvs["dst_x"][sel].astype(np.int64)[:, None, None] + np.arange(-bw // 2, bw // 2)[None, :, None]
            ys = mvs["dst_y"][sel].astype(np.int64)[:, None, None] + np.arange(-bh // 2, bh // 2)[None, None, :]
            xs = np.clip(xs, 0, width - 1)
            ys = np.clip(ys, 0, height - 1)
            linear = (ys * width + xs).reshape(len(sel), -1)
            values = np.broadcast_to(delta[sel][:, None, :], (len(sel), bw * bh, 2))
            # Flat fancy assignment writes in order, so later vectors win.
            out[linear.ravel()] = values.reshape(-1, 2)
    return out.reshape(height, width, 2)


def patch_mean_pool(values: np.ndarray, patch: int) -> np.ndarray:
    """Average over patch x patch tiles of a 2-D map; partial border tiles are
    averaged over the pixels they hold."""
    h, w = values.shape
    ph, pw = math.ceil(h / patch), math.ceil(w / patch)
    padded = np.zeros((ph * patch, pw * patch), dtype=np.float64)
    padded[:h, :w] = values
    counts = np.zeros_like(padded)
    counts[:h, :w] = 1.0
    sums = padded.reshape(ph, patch, pw, patch).sum(axis=(1, 3))
    n = counts.reshape(ph, patch, pw, patch).sum(axis=(1, 3))
    return sums / n


def motion_scores(mv_frames: list[np.ndarray], height: int, width: int, patch: int = 256) -> MotionScores | None:
    """Scores over the frames' motion vectors; None when there are none."""
    if not mv_frames:
        return None
    per_pixel_sum = np.zeros((height, width), dtype=np.float64)
    buffer = np.zeros((height * width, 2), dtype=np.float32)
    norm = float(height + width)
    for mvs in mv_frames:
        flow = flow_field(mvs, height, width, buffer)
        per_pixel_sum += np.sqrt(np.einsum("hwc,hwc->hw", flow, flow)) / norm
    n = len(mv_frames)
    per_pixel_mean = per_pixel_sum / n
    return MotionScores(
        global_mean=float(per_pixel_mean.mean()),
        per_patch_min=float(patch_mean_pool(per_pixel_mean, patch).min()),
        num_frames=n,
    )


def low_motion_reason(scores: MotionScores | None, settings: MotionSettings, sampled: int) -> str | None:
    """Why a clip fails the motion filter, or None if it passes (or the
    filter only scores)."""
    if settings.mode != "enable":
        return None
    if scores is None:
        return (
            f"no motion data: none of the {sampled} frames sampled at {settings.fps:g} fps carries motion vectors "
            "(intra-only or single-frame clip)"
        )
    parts = []
    if scores.global_mean < settings.global_mean_threshold:
        parts.append(f"global_mean={scores.global_mean:.6g}<{settings.global_mean_threshold:g}")
    if scores.per_patch_min < settings.per_patch_min_threshold:
        parts.append(f"per_patch_min={scores.per_patch_min:.6g}<{settings.per_patch_min_threshold:g}")
    return "low motion: " + ", ".join(parts) if parts else None
