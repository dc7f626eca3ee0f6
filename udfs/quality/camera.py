"""Camera motion from the codec's motion vectors.

Each sampled frame's vectors give the content's displacement per block
(towards the past reference: dst - src; from a future reference, its
opposite). One global model, translation plus zoom about the frame centre,

    v(p) = t + s * (p - c),

is fitted to them by least squares (block-area weighted, with one reweighting
that discounts blocks far from the first fit: a person walking through a
still shot is not camera motion). The clip's model is the median of its
frames' fits; how much of the clip's motion it explains is the score.

Direction is the camera's. The content moving left in the frame means the
camera turns right (`pan_right`); the content moving down means it tilts up
(`tilt_up`); the content growing (s > 0) is `zoom_in`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from udfs.quality.signals import Bars


@dataclass(frozen=True)
class FrameFit:
    tx: float  # content displacement, px per frame
    ty: float
    scale: float  # relative growth per frame about the centre
    explained: float  # share of the vectors' energy the model accounts for
    energy: float  # mean squared displacement (px^2)
    speeds: np.ndarray  # each block's displacement (px per frame) ...
    areas: np.ndarray  # ... and its area


@dataclass(frozen=True)
class CameraMotion:
    label: str
    score: float


def block_flow(mvs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (N, 2), displacements (N, 2), areas (N,)) of a frame's vectors."""
    scale = mvs["motion_scale"].astype(np.float64)
    scale[scale == 0] = 1.0
    motion = np.stack([mvs["motion_x"] / scale, mvs["motion_y"] / scale], axis=1)
    # motion = src - dst: the content moved by -motion since a past reference,
    # and will move by +motion until a future one.
    sign = np.where(mvs["source"] < 0, -1.0, 1.0)[:, None]
    centres = np.stack([mvs["dst_x"], mvs["dst_y"]], axis=1).astype(np.float64)
    areas = (mvs["w"].astype(np.float64) * mvs["h"].astype(np.float64))
    return centres, sign * motion, areas


def _solve(rel: np.ndarray, flow: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares for (tx, ty, s) of v = t + s * rel."""
    n = len(rel)
    a = np.zeros((2 * n, 3))
    a[:n, 0] = 1.0
    a[n:, 1] = 1.0
    a[:n, 2] = rel[:, 0]
    a[n:, 2] = rel[:, 1]
    b = np.concatenate([flow[:, 0], flow[:, 1]])
    w = np.sqrt(np.concatenate([weights, weights]))
    params, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
    return params


def fit_frame(mvs: np.ndarray, height: int, width: int, bars: Bars | None = None) -> FrameFit | None:
    """The global model of one frame's vectors (None without vectors).
    Blocks inside black bars (which never move) are left out, and the zoom
    centre is the centre of the picture between them."""
    if len(mvs) == 0:
        return None
    centres, flow, areas = block_flow(mvs)
    top, bottom, left, right = (bars.top, bars.bottom, bars.left, bars.right) if bars else (0, 0, 0, 0)
    keep = ((centres[:, 0] >= left) & (centres[:, 0] < width - right)
            & (centres[:, 1] >= top) & (centres[:, 1] < height - bottom))
    if not keep.any():
        return None
    centres, flow, areas = centres[keep], flow[keep], areas[keep]
    rel = centres - np.array([(left + width - right) / 2.0, (top + height - bottom) / 2.0])
    params = _solve(rel, flow, areas)
    residual = flow - (params[:2] + params[2] * rel)
    err = np.hypot(residual[:, 0], residual[:, 1])
    # Reweight (Cauchy): blocks moving unlike the rest count less.
    spread = max(1.0, float(np.median(err)) * 2.0)
    params = _solve(rel, flow, areas / (1.0 + (err / spread) ** 2))
    residual = flow - (params[:2] + params[2] * rel)
    total = float(np.average((flow ** 2).sum(axis=1), weights=areas))
    left = float(np.average((residual ** 2).sum(axis=1), weights=areas))
    explained = 1.0 if total <= 1e-12 else max(0.0, 1.0 - left / total)
    return FrameFit(float(params[0]), float(params[1]), float(params[2]), explained, total,
                    np.hypot(flow[:, 0], flow[:, 1]), areas)


def weighted_median(values: list[float], weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(np.asarray(values)[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def classify(fits: list[FrameFit], height: int, width: int, *, static_motion: float, min_fit: float,
             dominance: float) -> CameraMotion | None:
    """A clip's camera motion from its frames' fits (None: no frame had vectors)."""
    if not fits:
        return None
    energies = np.array([f.energy for f in fits])
    # Weighted by each frame's motion: a B-frame coded all in direct or skip
    # modes exports only zero vectors, and must not outvote the frames that moved.
    weights = energies if energies.sum() > 0 else np.ones(len(fits))
    tx = weighted_median([f.tx for f in fits], weights)
    ty = weighted_median([f.ty for f in fits], weights)
    scale = weighted_median([f.scale for f in fits], weights)
    explained = float(np.average([f.explained for f in fits], weights=weights))
    norm = float(height + width)
    # Zoom measured as the displacement it causes halfway to the frame's corner.
    zoom_px = abs(scale) * float(np.hypot(height, width)) / 4.0
    components = {"pan": abs(tx), "tilt": abs(ty), "zoom": zoom_px}
    strongest = max(components, key=components.__getitem__)
    if components[strongest] < static_motion * norm:
        # How well "no camera motion" explains the clip: the share of its
        # blocks (by area) that stayed still.
        speeds = np.concatenate([f.speeds for f in fits])
        areas = np.concatenate([f.areas for f in fits])
        return CameraMotion("static", float(np.average(speeds <= static_motion * norm, weights=areas)))
    if explained < min_fit:
        return CameraMotion("complex", explained)
    others = sorted((v for k, v in components.items() if k != strongest), reverse=True)
    if others[0] * dominance > components[strongest]:
        return CameraMotion("complex", explained)
    if strongest == "pan":
        label = "pan_right" if tx < 0 else "pan_left"
    elif strongest == "tilt":
        label = "tilt_up" if ty > 0 else "tilt_down"
    else:
        label = "zoom_in" if scale > 0 else "zoom_out"
    return CameraMotion(label, explained)
