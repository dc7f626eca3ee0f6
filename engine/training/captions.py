"""The caption a training sample carries, and the clip frames it describes."""

from __future__ import annotations

from typing import Any

import numpy as np


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


CAPTION_MODES = (None, "auto", "clip", "clip_enhanced", "window", "window_enhanced")


def resolve_caption(mode: str | None, names: list[str]) -> str | None:
    """`auto` (the loaders' default): the clip's caption when the table has
    captions (the caption stage ran), else none, so the first call on a
    default output works; any other mode is the caller's explicit ask."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption must be one of {CAPTION_MODES}, got {mode!r}")
    if mode == "auto":
        return "clip" if "caption" in names else None
    return mode
