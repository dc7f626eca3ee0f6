"""The quality signals' filters (see `udfs.analysis.rules`): a threshold left
null scores only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from udfs.analysis.rules import Bound, FilterRule, Settings, setting
from udfs.quality.signals import Bars

_BORDERS = ("border_top", "border_bottom", "border_left", "border_right")


def _bar_fraction(row: Mapping[str, Any], settings: Settings) -> str | None:
    limit = setting(settings, "quality.borders.max_fraction")
    if limit is None or any(row[c] is None for c in (*_BORDERS, "width", "height")):
        return None
    bars = Bars(*(int(row[c]) for c in _BORDERS))
    height, width = int(row["height"]), int(row["width"])
    fraction = bars.fraction(height, width)
    return f"bars cover {fraction:.3g}>{float(limit):g} of the frame" if fraction > float(limit) else None


def _camera(row: Mapping[str, Any], settings: Settings) -> str | None:
    reject = setting(settings, "quality.camera.reject") or []
    motion = row["camera_motion"]
    return f"{motion} is rejected" if motion is not None and motion in reject else None


TEXT = FilterRule("text", bounds=(Bound("text_area_ratio", "quality.text.max_area", "above"),))
BORDERS = FilterRule("borders", check=_bar_fraction, extra_columns=(*_BORDERS, "width", "height"),
                     extra_keys=("quality.borders.max_fraction",))
SHARPNESS = FilterRule("blurry", bounds=(Bound("sharpness", "quality.sharpness.min", "below"),))
EXPOSURE = FilterRule("exposure", bounds=(
    Bound("brightness", "quality.exposure.min_brightness", "below"),
    Bound("brightness", "quality.exposure.max_brightness", "above"),
    Bound("contrast", "quality.exposure.min_contrast", "below"),
    Bound("black_frame_ratio", "quality.exposure.max_black_ratio", "above"),
    Bound("frozen_frame_ratio", "quality.exposure.max_frozen_ratio", "above"),
))
CAMERA = FilterRule("camera", check=_camera, extra_columns=("camera_motion",), extra_keys=("quality.camera.reject",))
CUTS = FilterRule("cut inside", bounds=(Bound("max_scene_change", "quality.cuts.max_change", "above"),))

QUALITY_RULES = (TEXT, BORDERS, SHARPNESS, EXPOSURE, CAMERA, CUTS)
