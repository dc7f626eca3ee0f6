"""Synthetic videos: the built-in sample, test fixtures and benchmark inputs.

Every frame carries its own index as a barcode along the top edge (see
`read_frame_index`), so tests can prove that a clip holds exactly the source
frames of its span, not merely the right number of frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from udfs.media.video import encode_frames

BARCODE_BITS = 16


def _barcode_geometry(width: int, height: int) -> tuple[int, int]:
    # Even-sized cells survive 4:2:0 chroma subsampling and light compression.
    cell = max(4, (width // (BARCODE_BITS + 2)) // 2 * 2)
    return cell, min(cell, max(4, height // 8 // 2 * 2))


def draw_barcode(img: np.ndarray, index: int) -> None:
    h, w = img.shape[:2]
    cell, rows = _barcode_geometry(w, h)
    for bit in range(BARCODE_BITS):
        x0 = bit * cell
        if x0 + cell > w:
            break
        img[:rows, x0 : x0 + cell] = 255 if (index >> bit) & 1 else 0


def read_frame_index(rgb: np.ndarray) -> int:
    """Inverse of `draw_barcode` on a decoded RGB frame."""
    h, w = rgb.shape[:2]
    cell, rows = _barcode_geometry(w, h)
    luma = rgb[:rows].mean(axis=2)
    value = 0
    for bit in range(BARCODE_BITS):
        x0 = bit * cell
        if x0 + cell > w:
            break
        # Sample the cell's interior: edges bleed under compression.
        m = max(1, cell // 4)
        inner = luma[m : max(m + 1, rows - m), x0 + m : x0 + cell - m]
        if inner.mean() > 127:
            value |= 1 << bit
    return value


def _scene_background(width: int, height: int, scene: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + scene)
    base = rng.integers(30, 225, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        wave = np.sin(xx / max(width, 1) * (2 + c + scene % 3) * 2 * math.pi + c)
        img[..., c] = np.clip(base[c] + 25 * wave + 10 * np.cos(yy / max(height, 1) * 3 * math.pi), 0, 255)
    return img


class SceneRenderer:
    """Renders frames of synthetic scenes: a textured background that pans,
    with a box moving across it. Scenes differ in palette, texture and speed,
    so a hard cut between two of them is unambiguous."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._backgrounds: dict[int, np.ndarray] = {}

    def frame(self, index: int, scene: int = 0, moving: bool = True) -> np.ndarray:
        w, h = self.width, self.height
        if scene not in self._backgrounds:
            self._backgrounds[scene] = _scene_background(w, h, scene)
        t = index if moving else 0
        speed = 2 + scene % 4
        img = np.roll(self._backgrounds[scene], (t * speed) % max(w, 1), axis=1)
        box = max(4, min(w, h) // 5)
        x = int((t * (speed + 1)) % max(1, w - box))
        y = int((h - box) / 2 + (h - box) / 3 * math.sin(2 * math.pi * t / 90.0))
        img[y : y + box, x : x + box] = (37 * (scene + 1)) % 256, (91 * (scene + 2)) % 256, (53 * (scene + 3)) % 256
        draw_barcode(img, index)
        return img


def _add_video_stream(out: av.container.OutputContainer, *, codec: str, width: int, height: int, rate: Fraction,
                      crf: int, gop: int, pix_fmt: str | None) -> av.video.stream.VideoStream:
    stream = out.add_stream(codec, rate=rate)
    stream.width = width
    stream.height = height
    # 4:2:0 needs even sizes; odd-sized videos are written 4:4:4.
    stream.pix_fmt = pix_fmt or ("yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p")
    if codec == "libx264":
        stream.options = {"crf": str(crf), "preset": "ultrafast", "g": str(gop), "bf": "2"}
    elif codec in ("libvpx-vp9", "libvpx"):
        stream.options = {"crf": str(crf + 10), "b": "0", "deadline": "realtime", "cpu-used": "8", "g": str(gop)}
    else:
        stream.options = {"g": str(gop)}
    return stream


def _encode_rgb(out: av.container.OutputContainer, stream: av.video.stream.VideoStream,
                images: Iterable[np.ndarray], rate: Fraction) -> None:
    encode_frames(out, stream, (av.VideoFrame.from_ndarray(img, format="rgb24") for img in images), rate)


def write_video(
    path: str | Path,
    *,
    width: int = 320,
    height: int = 240,
    fps: float | Fraction = 24,
    seconds: float | None = None,
    num_frames: int | None = None,
    scenes: list[int] | None = None,
    moving: bool = True,
    audio: bool = False,
    codec: str = "libx264",
    crf: int = 12,
    gop: int = 48,
    pix_fmt: str | None = None,
) -> Path:
    """Encode a synthetic video. `scenes` lists scene lengths in frames (hard
    cuts between them); otherwise one scene of `num_frames` or `seconds`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    if scenes is None:
        if num_frames is None:
            if seconds is None:
                raise ValueError("give seconds, num_frames or scenes")
            num_frames = int(round(seconds * rate))
        scenes = [num_frames]
    scene_of = np.repeat(np.arange(len(scenes)), scenes)
    with av.open(str(path), mode="w") as out:
        stream = _add_video_stream(out, codec=codec, width=width, height=height, rate=rate, crf=crf, gop=gop,
                                   pix_fmt=pix_fmt)
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=48000)
            astream.layout = "stereo"
        renderer = SceneRenderer(width, height)
        _encode_rgb(out, stream, (renderer.frame(i, int(scene), moving) for i, scene in enumerate(scene_of)), rate)
        if astream is not None:
            total = len(scene_of) / float(rate)
            _write_tone(out, astream, total)
    return path


def _write_tone(out: av.container.OutputContainer, astream: av.audio.stream.AudioStream, seconds: float) -> None:
    rate = 48000
    n = int(seconds * rate)
    chunk = 1024
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        t = (np.arange(start, start + count) / rate).astype(np.float32)
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        samples = np.stack([tone, tone])
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in astream.encode(frame):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def make_sample_set(directory: str | Path) -> list[Path]:
    """The built-in sample: a few short videos of different shapes, one with
    audio and scene cuts, so a first run exercises the whole pipeline."""
    directory = Path(directory)
    return [
        write_video(directory / "city_640x360_30fps.mp4", width=640, height=360, fps=30, seconds=25, audio=True,
                    scenes=[210, 240, 300]),
        write_video(directory / "drone_480x270_24fps.mp4", width=480, height=270, fps=24, seconds=14),
        write_video(directory / "short_318x240_25fps.mp4", width=318, height=240, fps=25, seconds=4),
    ]


# ------------------------------------------------ gradual transitions (scenes)
TRANSITION_KINDS = ("cut", "dissolve", "fade")


def transition_timeline(
    scenes: list[int], transitions: list[tuple[str, int]] | None = None
) -> tuple[list[tuple[int, int, float]], list[int]]:
    """Per frame (scene_a, scene_b, alpha) and the ground-truth cut frames.

    Scene i spans `scenes[i]` frames; boundary b (first frame of scene i+1) is
    the ground-truth cut. A ("dissolve", L) transition blends frames
    [b - L//2, b - L//2 + L) from scene i into scene i+1; ("fade", L) goes
    down to black over the first half and up from black over the second
    (scene_b == -1 marks black). ("cut", 0) is a hard cut.
    """
    transitions = transitions or [("cut", 0)] * (len(scenes) - 1)
    if len(transitions) != len(scenes) - 1:
        raise ValueError("need one transition between each pair of scenes")
    scene_of = np.repeat(np.arange(len(scenes)), scenes)
    timeline: list[tuple[int, int, float]] = [(int(s), int(s), 0.0) for s in scene_of]
    cuts: list[int] = []
    boundary = 0
    for i, (kind, length) in enumerate(transitions):
        if kind not in TRANSITION_KINDS:
            raise ValueError(f"transition kind must be one of {TRANSITION_KINDS}, got {kind!r}")
        boundary += scenes[i]
        cuts.append(boundary)
        if kind == "cut" or length <= 0:
            continue
        first = boundary - length // 2
        if first <= boundary - scenes[i] or first + length >= boundary + scenes[i + 1]:
            raise ValueError(f"transition {i} ({length} frames) longer than its scenes")
        for j in range(length):
            t = (j + 1) / (length + 1)
            if kind == "dissolve":
                timeline[first + j] = (i, i + 1, t)
            elif t < 0.5:  # fade out of scene i
                timeline[first + j] = (i, -1, t * 2)
            else:  # fade into scene i+1
                timeline[first + j] = (i + 1, -1, (1 - t) * 2)
    return timeline, cuts


def write_transition_video(
    path: str | Path,
    *,
    scenes: list[int],
    transitions: list[tuple[str, int]] | None = None,
    width: int = 320,
    height: int = 240,
    fps: float | Fraction = 24,
    crf: int = 12,
    gop: int = 48,
) -> tuple[Path, list[int]]:
    """Like `write_video(scenes=...)` but with dissolves/fades between scenes.
    Returns the path and the ground-truth cut frames (see
    `transition_timeline`). Frames keep their index barcodes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeline, cuts = transition_timeline(scenes, transitions)
    rate = Fraction(fps).limit_denominator(1001)
    renderer = SceneRenderer(width, height)

    def images() -> Iterator[np.ndarray]:
        for i, (a, b, alpha) in enumerate(timeline):
            img = renderer.frame(i, a).astype(np.float32)
            if alpha > 0:
                other = np.zeros_like(img) if b == -1 else renderer.frame(i, b).astype(np.float32)
                img = (1 - alpha) * img + alpha * other
            img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
            draw_barcode(img, i)
            yield img

    with av.open(str(path), mode="w") as out:
        stream = _add_video_stream(out, codec="libx264", width=width, height=height, rate=rate, crf=crf, gop=gop,
                                   pix_fmt="yuv420p")
        _encode_rgb(out, stream, images(), rate)
    return path, cuts
