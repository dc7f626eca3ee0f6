"""One clip's quality signals, from the frames the transcode stage feeds its
encoder and the motion vectors it decodes for the motion scores.

While a clip is encoded, `QualitySampler.take` keeps what each signal needs
from the frames on its sampling grid, cheaply, on the decode thread: the
bars of a frame (row and column means of its luma plane), small luma planes
(a strided view: no scaling), a scaled luma plane for sharpness and a scaled
RGB frame for the text detector. `scores` then does the heavy part (the
detector, the Laplacian, the camera fit) when the clip is finished, on the
finishing thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.media.frames import as_fraction, rate_indices, uniform_indices
from udfs.quality import camera as camera_motion
from udfs.quality.settings import enabled_blocks
from udfs.quality.signals import Bars, SceneChange, clip_bars, exposure, frame_bars, inside, laplacian_variance
from udfs.quality.text import TextDetector, input_size

if TYPE_CHECKING:
    import av


def luma_plane(frame: av.VideoFrame) -> np.ndarray:
    """The luma plane of an 8-bit planar YUV frame, as an (H, W) view."""
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


def strided(luma: np.ndarray, size: int) -> np.ndarray:
    """A copy of `luma` with its shorter side near `size`, by taking every n-th pixel."""
    step = max(1, min(luma.shape) // int(size))
    return np.ascontiguousarray(luma[::step, ::step])


def scaled_hw(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(h, w) with the shorter side at `shorter` (never upscaled), both even."""
    scale = min(1.0, shorter / min(height, width))
    h, w = max(2, round(height * scale)), max(2, round(width * scale))
    return h - h % 2, w - w % 2


class Reformatters:
    """swscale contexts kept per thread and geometry (a fresh one per frame
    costs more than the conversion)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def convert(self, frame: av.VideoFrame, width: int, height: int, fmt: str) -> np.ndarray:
        from av.video.reformatter import VideoReformatter

        cache = self._local.__dict__.setdefault("cache", {})
        reformatter = cache.setdefault((width, height, fmt), VideoReformatter())
        return reformatter.reformat(frame, width=width, height=height, format=fmt, interpolation="AREA").to_ndarray()


def _grid(num_frames: int, clip_fps: Fraction, fps: float | None) -> list[int]:
    return list(range(num_frames)) if fps is None else rate_indices(num_frames, clip_fps, as_fraction(fps))


class QualitySampler:
    """What one clip's enabled quality signals take from its frames."""

    def __init__(self, node: Mapping[str, Any], num_frames: int, clip_fps: Fraction, height: int, width: int) -> None:
        self.node = node
        self.blocks = set(enabled_blocks(node))
        self.height, self.width = height, width
        self.offsets: dict[str, set[int]] = {}
        for block in self.blocks - {"camera", "text"}:
            self.offsets[block] = set(_grid(num_frames, clip_fps, node[block]["fps"]))
        if "text" in self.blocks:
            grid = _grid(num_frames, clip_fps, node["text"]["fps"])
            count = min(int(node["text"]["max_frames"]), len(grid))
            # Spread over the clip: a short max_frames still sees its end.
            self.offsets["text"] = {grid[i] for i in uniform_indices(len(grid), count)} if count else set()
        # The frames whose motion vectors the camera fit reads.
        self.vector_offsets = (set(_grid(num_frames, clip_fps, node["camera"]["fps"]))
                               if "camera" in self.blocks else set())
        self._wanted = set().union(*self.offsets.values()) if self.offsets else set()
        self._bars: list[Bars | None] = []
        self._exposure: list[np.ndarray] = []
        self._sharp: list[np.ndarray] = []
        self._text: list[np.ndarray] = []
        self._scene = SceneChange() if "cuts" in self.blocks else None

    def wants(self, offset: int) -> bool:
        return offset in self._wanted

    def take(self, offset: int, frame: av.VideoFrame, reformat: Reformatters) -> None:
        """Keep what the signals sampling frame `offset` of the clip need (an
        8-bit planar YUV frame of the clip's size)."""
        luma = luma_plane(frame)
        node = self.node
        if offset in self.offsets.get("borders", ()):
            self._bars.append(frame_bars(luma, node["borders"]["limit"]))
        if offset in self.offsets.get("exposure", ()):
            self._exposure.append(strided(luma, node["exposure"]["size"]))
        if self._scene is not None and offset in self.offsets["cuts"]:
            self._scene.add(strided(luma, node["cuts"]["size"]))
        if offset in self.offsets.get("sharpness", ()):
            h, w = scaled_hw(self.height, self.width, node["sharpness"]["size"])
            self._sharp.append(reformat.convert(frame, w, h, "gray"))
        if offset in self.offsets.get("text", ()):
            h, w = input_size(self.height, self.width, node["text"]["size"])
            self._text.append(reformat.convert(frame, w, h, "rgb24"))

    def scores(self, vectors: Mapping[int, np.ndarray] | None, detector: TextDetector | None) -> dict[str, Any]:
        """The clip's quality columns (null where nothing was sampled)."""
        node, out = self.node, {}
        bars = clip_bars(self._bars) if "borders" in self.blocks else None
        if "borders" in self.blocks:
            sides = (bars.top, bars.bottom, bars.left, bars.right) if bars else (None,) * 4
            out.update(zip(("border_top", "border_bottom", "border_left", "border_right"), sides))
        if "sharpness" in self.blocks:
            values = [laplacian_variance(inside(g, bars, self.height, self.width)) for g in self._sharp]
            out["sharpness"] = float(np.median(values)) if values else None
        if "exposure" in self.blocks:
            e = node["exposure"]
            planes = [inside(p, bars, self.height, self.width) for p in self._exposure]
            stats = exposure(planes, e["black_level"], e["black_share"], e["frozen_delta"])
            out.update({
                "brightness": stats.brightness if stats else None,
                "contrast": stats.contrast if stats else None,
                "black_frame_ratio": stats.black_frame_ratio if stats else None,
                "frozen_frame_ratio": stats.frozen_frame_ratio if stats else None,
            })
        if "camera" in self.blocks:
            out.update(self._camera(vectors, bars))
        if "cuts" in self.blocks:
            scene = self._scene
            measured = scene is not None and scene.pairs > 0
            out["max_scene_change"] = scene.max_score if measured else None
            out["cut_inside"] = scene.max_score >= node["cuts"]["threshold"] if measured else None
        if "text" in self.blocks:
            out["text_area_ratio"] = detector(np.stack(self._text)) if detector is not None and self._text else None
        return out

    def _camera(self, vectors: Mapping[int, np.ndarray] | None, bars: Bars | None) -> dict[str, Any]:
        c = self.node["camera"]
        fits = []
        for offset in sorted(self.vector_offsets):
            mvs = (vectors or {}).get(offset)
            if mvs is None:
                continue
            fit = camera_motion.fit_frame(mvs, self.height, self.width, bars)
            if fit is not None:
                fits.append(fit)
        motion = camera_motion.classify(fits, self.height, self.width, static_motion=c["static_motion"],
                                        min_fit=c["min_fit"], dominance=c["dominance"])
        return {"camera_motion": motion.label if motion else None, "camera_motion_score": motion.score if motion else None}
