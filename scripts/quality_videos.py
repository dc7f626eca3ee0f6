"""Videos with known quality defects, for the quality-signal tests and
`scripts/bench_quality.py`.

The content is a large still "photo" (smooth coloured noise at several
scales, so it has edges at every size) seen through a window: still, or
moving over it for pans, tilts and zooms. Defects are FFmpeg filters on a
clean render (the FFmpeg binary of `imageio-ffmpeg`): `drawtext` for
burned-in subtitles, `pad` for letterbox and pillarbox bars, `boxblur`,
`eq` for exposure; a shot change is two photos back to back.
"""

from __future__ import annotations

import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

MOTIONS = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out")


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 still with detail at every scale."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for sigma, weight in ((48, 1.0), (12, 0.6), (3, 0.35), (1, 0.2)):
        noise = ndimage.gaussian_filter(rng.standard_normal((height, width, 3)).astype(np.float32),
                                        sigma=(sigma, sigma, 0))
        out += weight * noise / (noise.std() + 1e-6)
    out = (out - out.mean()) / (out.std() + 1e-6)
    return np.clip(128 + 45 * out, 0, 255).astype(np.uint8)


def _window(t: float, motion: str, big_h: int, big_w: int, h: int, w: int, speed: float) -> tuple[float, float, float]:
    """(x0, y0, scale) of the window at time t (0..1) over the big image:
    scale 1 shows h x w source pixels."""
    cx, cy = (big_w - w) / 2, (big_h - h) / 2
    d = speed * t
    if motion == "pan_right":  # the camera turns right: the window moves right over the scene
        return cx - d / 2 + d, cy, 1.0
    if motion == "pan_left":
        return cx + d / 2 - d, cy, 1.0
    if motion == "tilt_up":  # the window moves up: the scene moves down in the frame
        return cx, cy + d / 2 - d, 1.0
    if motion == "tilt_down":
        return cx, cy - d / 2 + d, 1.0
    if motion == "zoom_in":  # the window shrinks: the content grows
        return cx, cy, 1.3 - 0.5 * t
    if motion == "zoom_out":
        return cx, cy, 0.8 + 0.5 * t
    return cx, cy, 1.0


def render_motion(path: Path, motion: str, *, width: int = 320, height: int = 180, fps: int = 30,
                  seconds: float = 3.0, seed: int = 0, speed: float = 120.0) -> Path:
    """A clip of the photo through a window moving as `motion` says (`speed`:
    pixels travelled over the clip for pans and tilts)."""
    from PIL import Image

    big = Image.fromarray(photo(height * 2, width * 2, seed))
    big_h, big_w = height * 2, width * 2
    frames = []
    n = int(round(seconds * fps))
    for i in range(n):
        x0, y0, scale = _window(i / max(1, n - 1), motion, big_h, big_w, height, width, speed)
        cw, ch = width * scale, height * scale
        cx, cy = x0 + width / 2, y0 + height / 2
        box = (cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2)
        frames.append(np.asarray(big.resize((width, height), Image.BILINEAR, box=box)))
    return encode(path, frames, fps)


def encode(path: Path, frames: list[np.ndarray], fps: int, *, preset: str = "veryfast", crf: int = 18) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": preset, "crf": str(crf)})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def render_cut(path: Path, *, width: int = 320, height: int = 180, fps: int = 30, seconds: float = 4.0,
               cut_at_s: float = 2.0, seed: int = 0) -> Path:
    """Two shots back to back (two photos, each panning slowly), the cut at `cut_at_s`."""
    from PIL import Image

    shots = [Image.fromarray(photo(height * 2, width * 2, seed + k)) for k in (0, 1)]
    frames = []
    n = int(round(seconds * fps))
    for i in range(n):
        shot = shots[0] if i < round(cut_at_s * fps) else shots[1]
        x0 = width / 2 + 40 * i / n
        frames.append(np.asarray(shot.crop((int(x0), height // 2, int(x0) + width, height // 2 + height))))
    return encode(path, frames, fps)


def font_file(folder: Path) -> Path:
    """A TrueType font for drawtext: Pillow's built-in one, written out, so no
    system font is needed."""
    from PIL import ImageFont

    path = folder / "reelsift-test-font.ttf"
    if not path.exists():
        path.write_bytes(ImageFont.load_default(size=10).font_bytes)
    return path


def apply_filter(source: Path, out: Path, video_filter: str) -> Path:
    """`source` through an FFmpeg filter chain, re-encoded losslessly enough to keep the defect exact."""
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(source), "-vf", video_filter, "-c:v", "libx264",
                    "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p", str(out)], check=True)
    return out


def subtitle_filter(font: Path, text: str, height: int, *, size_ratio: float = 1 / 16) -> str:
    """drawtext of a white subtitle with a dark outline, centred near the bottom,
    its font size a subtitle's share of the frame height."""
    size = max(8, int(round(height * size_ratio)))
    escaped = text.replace("'", "").replace(":", r"\:")
    return (f"drawtext=fontfile={font}:text='{escaped}':fontsize={size}:fontcolor=white:borderw=2:"
            f"bordercolor=black:x=(w-text_w)/2:y=h-text_h-{size}")


def make_set(folder: Path, *, width: int = 640, height: int = 360, seconds: float = 3.0) -> dict[str, Path]:
    """The standard defect set in `folder`: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    font = font_file(folder)
    clean = render_motion(folder / "clean.mp4", "pan_right", width=width, height=height, seconds=seconds, seed=3,
                          speed=60.0)
    out = {"clean": clean}
    out["subtitle"] = apply_filter(clean, folder / "subtitle.mp4",
                                   subtitle_filter(font, "This is a burned-in subtitle line", height))
    out["letterbox"] = apply_filter(clean, folder / "letterbox.mp4",
                                    f"scale={width}:{height - 88},pad={width}:{height}:0:44:black")
    out["pillarbox"] = apply_filter(clean, folder / "pillarbox.mp4",
                                    f"scale={width - 160}:{height},pad={width}:{height}:80:0:black")
    out["blurred"] = apply_filter(clean, folder / "blurred.mp4", "boxblur=6:2")
    out["dark"] = apply_filter(clean, folder / "dark.mp4", "eq=brightness=-0.35:contrast=0.6")
    # Black from 60 % of the clip on.
    out["fade"] = apply_filter(clean, folder / "fade.mp4", f"fade=t=out:st={seconds * 0.5:g}:d={seconds * 0.1:g}")
    return out


def odd_videos(folder: Path) -> dict[str, Path]:
    """Sources a stage must survive: 2x2, 4000x8, 10-bit, rotated (FFmpeg's testsrc2)."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {"tiny_2x2": ("2x2", "yuv420p", []), "wide_4000x8": ("4000x8", "yuv420p", []),
             "tenbit": ("320x180", "yuv420p10le", []),
             "rotated": ("320x180", "yuv420p", ["-metadata:s:v", "rotate=90"])}
    out = {}
    for name, (size, pix_fmt, extra) in specs.items():
        path = folder / f"{name}.mp4"
        subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
                        "-t", "2", "-c:v", "libx264", "-pix_fmt", pix_fmt, *extra, str(path)], check=True)
        out[name] = path
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(make_set(Path(tmp)))
