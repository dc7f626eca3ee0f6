"""Pure rules that turn per-frame transition scores into clip spans.

Shared by every scene detector, so thresholds and clip rules behave the same
whatever produced the scores.

Score convention (all detectors): `probs[i]` scores a transition between
frame i and frame i + 1. A hard cut whose new shot starts at frame k shows up
as a peak at k - 1, the last frame of the old shot (this is how TransNetV2's
single-frame head marks cuts). Gradual transitions (dissolves, fades) show up
as a run of high scores.

Span rules, applied per scene in this order, so that every emitted span is at
least `crop_s` away from any detected transition and its duration lies in
[min_scene_s, max_scene_s]:

1. crop: drop `crop_s` worth of frames from each end of the scene;
2. min: drop the scene if what remains is shorter than `min_scene_s`;
3. max: a longer remainder is either cut into consecutive pieces of
   `max_scene_s` (`stride`; a trailing piece shorter than `min_scene_s` is
   dropped) or truncated to its first `max_scene_s` (`truncate`).

Seconds become frames as: crop = round(crop_s * fps), min = ceil(min_scene_s
* fps), max = floor(max_scene_s * fps), so spans in seconds never break the
configured bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LONG_SCENE_MODES = ("stride", "truncate")
_EPS = 1e-9


def transition_runs(probs: Sequence[float] | np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of frames whose score is > threshold."""
    above = np.asarray(probs, dtype=np.float64) > threshold
    if not above.any():
        return []
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def cut_frames(probs: Sequence[float] | np.ndarray, threshold: float) -> list[int]:
    """One cut per transition run: the first frame after the run's middle.

    For a one-frame run at k - 1 (a hard cut) that is k, the first frame of
    the new shot, the convention the ground truth of scripts/eval_scenes.py
    uses; for a gradual transition it is the frame after its centre.
    """
    return [(start + end - 1) // 2 + 1 for start, end in transition_runs(probs, threshold)]


def scenes_from_probs(
    probs: Sequence[float] | np.ndarray, threshold: float, num_frames: int | None = None
) -> list[tuple[int, int]]:
    """Scenes [start, end) between transitions; no transition -> one scene.

    A run of transition frames [a, b) ends the old scene after frame a (the
    last frame scored as still belonging to it) and starts the new one at b.
    """
    n = len(probs) if num_frames is None else int(num_frames)
    if n <= 0:
        return []
    scenes: list[tuple[int, int]] = []
    start = 0
    for a, b in transition_runs(np.asarray(probs)[:n], threshold):
        end = min(a + 1, n)
        if end > start:
            scenes.append((start, end))
        start = b
    if start < n:
        scenes.append((start, n))
    return scenes


def seconds_to_frames(fps: float, crop_s: float, min_scene_s: float, max_scene_s: float | None) -> tuple[int, int, int | None]:
    crop = int(round(crop_s * fps))
    min_frames = max(1, int(math.ceil(min_scene_s * fps - _EPS)))
    max_frames = None if max_scene_s is None else max(1, int(math.floor(max_scene_s * fps + _EPS)))
    return crop, min_frames, max_frames


def spans_from_scenes(
    scenes: Sequence[tuple[int, int]],
    fps: float,
    *,
    min_scene_s: float = 2.0,
    max_scene_s: float | None = 10.0,
    long_scene_mode: str = "stride",
    crop_s: float = 0.5,
) -> list[tuple[int, int]]:
    """Clip spans [start, end) from scenes by the crop/min/max rules above."""
    if long_scene_mode not in LONG_SCENE_MODES:
        raise ValueError(f"long_scene_mode must be one of {LONG_SCENE_MODES}, got {long_scene_mode!r}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_scene_s is not None and max_scene_s < min_scene_s:
        raise ValueError(f"max_scene_s ({max_scene_s}) < min_scene_s ({min_scene_s})")
    crop, min_frames, max_frames = seconds_to_frames(fps, crop_s, min_scene_s, max_scene_s)
    spans: list[tuple[int, int]] = []
    for start, end in scenes:
        start, end = int(start) + crop, int(end) - crop
        if end - start < min_frames:
            continue
        if max_frames is None or end - start <= max_frames:
            spans.append((start, end))
        elif long_scene_mode == "truncate":
            spans.append((start, start + max_frames))
        else:
            for piece in range(start, end, max_frames):
                piece_end = min(piece + max_frames, end)
                if piece_end - piece >= min_frames:
                    spans.append((piece, piece_end))
    return spans


def plan_spans(
    probs: Sequence[float] | np.ndarray,
    fps: float,
    *,
    threshold: float,
    num_frames: int | None = None,
    min_scene_s: float = 2.0,
    max_scene_s: float | None = 10.0,
    long_scene_mode: str = "stride",
    crop_s: float = 0.5,
) -> list[tuple[int, int]]:
    """Per-frame scores -> clip spans: `scenes_from_probs` then `spans_from_scenes`."""
    scenes = scenes_from_probs(probs, threshold, num_frames)
    return spans_from_scenes(
        scenes, fps, min_scene_s=min_scene_s, max_scene_s=max_scene_s, long_scene_mode=long_scene_mode, crop_s=crop_s
    )
