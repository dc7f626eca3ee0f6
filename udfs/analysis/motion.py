"""Motion scores from codec motion vectors (no optical flow, no RGB).

The decoder exports the motion vectors it already parsed (FFmpeg
`flags2=+export_mvs`); they are turned into a dense per-pixel flow field
exactly as NeMo Curator's motion filter does:

- only blocks of size 8x8, 16x16, 16x8 and 8x16 are used, in that order;
- each block covers the pixels x in [dst_x - w/2, dst_x + w/2),
  y in [dst_y - h/2, dst_y + h/2) (dst is the block centre), clipped to the
  frame (see `flow_field` for the one edge case where NeMo's clamping
  differs), and gets the flow `-motion / motion_scale`;
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


def _block_deltas(mvs: np.ndarray) -> np.ndarray:
    """(N, 2) float32 flow of each vector: -motion / motion_scale."""
    scale = mvs["motion_scale"].astype(np.float32)
    scale[scale == 0] = 1.0
    return np.stack([-mvs["motion_x"] / scale, -mvs["motion_y"] / scale], axis=-1).astype(np.float32)


def flow_field(mvs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Dense (H, W, 2) float32 flow from one frame's structured motion-vector
    array (PyAV `MOTION_VECTORS` side data `.to_ndarray()`), pixel by pixel.

    Blocks are clipped to the frame. (NeMo clamps coordinates instead, which
    lets a sub-block lying wholly outside the frame, possible when W or H is
    8 mod 16, overwrite the last column/row; clipping keeps every pixel the
    value of the block that actually covers it.)"""
    out = np.zeros((height * width, 2), dtype=np.float32)
    if len(mvs):
        w_all, h_all = mvs["w"].astype(np.int64), mvs["h"].astype(np.int64)
        delta = _block_deltas(mvs)
        for bw, bh in BLOCK_SIZES:
            sel = np.flatnonzero((w_all == bw) & (h_all == bh))
            if not len(sel):
                continue
            # (k, bh, bw) pixel coordinates of every selected block.
            xs = mvs["dst_x"][sel].astype(np.int64)[:, None, None] + np.arange(-bw // 2, bw // 2)[None, None, :]
            ys = mvs["dst_y"][sel].astype(np.int64)[:, None, None] + np.arange(-bh // 2, bh // 2)[None, :, None]
            xs, ys = np.broadcast_arrays(xs, ys)
            inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
            owner = np.broadcast_to(np.arange(len(sel))[:, None, None], xs.shape)
            # Flat fancy assignment writes in order, so later vectors win.
            out[(ys * width + xs)[inside]] = delta[sel][owner[inside]]
    return out.reshape(height, width, 2)


CELL = 8


def cell_flow(mvs: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The same flow at 8x8-cell resolution, (ceil(H/8), ceil(W/8), 2), or None
    when some block is not aligned to the 8-px grid.

    H.264 partitions (16x16, 16x8, 8x16, 8x8) always sit on the 8-px grid,
    so the pixel flow is constant on every 8x8 cell: computing per cell is
    exact and 64x less work than per pixel."""
    hc, wc = -(-height // CELL), -(-width // CELL)
    out = np.zeros((hc * wc, 2), dtype=np.float32)
    if not len(mvs):
        return out.reshape(hc, wc, 2)
    w_all, h_all = mvs["w"].astype(np.int64), mvs["h"].astype(np.int64)
    x0 = mvs["dst_x"].astype(np.int64) - w_all // 2
    y0 = mvs["dst_y"].astype(np.int64) - h_all // 2
    delta = _block_deltas(mvs)
    for bw, bh in BLOCK_SIZES:
        sel = np.flatnonzero((w_all == bw) & (h_all == bh))
        if not len(sel):
            continue
        if np.any(x0[sel] % CELL) or np.any(y0[sel] % CELL):
            return None
        xs = (x0[sel] // CELL)[:, None, None] + np.arange(bw // CELL)[None, None, :]
        ys = (y0[sel] // CELL)[:, None, None] + np.arange(bh // CELL)[None, :, None]
        xs, ys = np.broadcast_arrays(xs, ys)
        inside = (xs >= 0) & (xs < wc) & (ys >= 0) & (ys < hc)
        owner = np.broadcast_to(np.arange(len(sel))[:, None, None], xs.shape)
        out[(ys * wc + xs)[inside]] = delta[sel][owner[inside]]
    return out.reshape(hc, wc, 2)


def _magnitude(flow: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...c,...c->...", flow, flow))


def patch_mean_pool(values: np.ndarray, patch: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted average over patch x patch tiles of a 2-D map (weights: how
    many pixels each entry stands for, 1 by default); partial border tiles
    are averaged over what they hold."""
    h, w = values.shape
    if weights is None:
        weights = np.ones((h, w), dtype=np.float64)
    ph, pw = math.ceil(h / patch), math.ceil(w / patch)
    sums = np.zeros((ph * patch, pw * patch), dtype=np.float64)
    counts = np.zeros_like(sums)
    sums[:h, :w] = values * weights
    counts[:h, :w] = weights
    return sums.reshape(ph, patch, pw, patch).sum(axis=(1, 3)) / counts.reshape(ph, patch, pw, patch).sum(axis=(1, 3))


def _cell_areas(height: int, width: int) -> np.ndarray:
    """Pixels of the frame inside each 8x8 cell (border cells may be partial)."""
    rows = np.minimum(CELL, height - CELL * np.arange(-(-height // CELL)))
    cols = np.minimum(CELL, width - CELL * np.arange(-(-width // CELL)))
    return np.outer(rows, cols).astype(np.float64)


def motion_scores(mv_frames: list[np.ndarray], height: int, width: int, patch: int = 256) -> MotionScores | None:
    """Scores over the frames' motion vectors; None when there are none.

    Every frame of the clip is reduced to a per-8x8-cell magnitude map when
    its blocks are 8-px aligned (always for H.264), which is exact since the
    flow is constant per cell; otherwise all frames use per-pixel maps."""
    if not mv_frames:
        return None
    norm = float(height + width)
    cells = [cell_flow(mvs, height, width) for mvs in mv_frames]
    if all(c is not None for c in cells) and patch % CELL == 0:
        mean_map = np.mean([_magnitude(c) for c in cells], axis=0, dtype=np.float64) / norm
        weights = _cell_areas(height, width)
        pooled = patch_mean_pool(mean_map, patch // CELL, weights)
        global_mean = float((mean_map * weights).sum() / (height * width))
    else:
        total = np.zeros((height, width), dtype=np.float64)
        for mvs in mv_frames:
            total += _magnitude(flow_field(mvs, height, width))
        mean_map = total / len(mv_frames) / norm
        pooled = patch_mean_pool(mean_map, patch)
        global_mean = float(mean_map.mean())
    return MotionScores(global_mean=global_mean, per_patch_min=float(pooled.min()), num_frames=len(mv_frames))
