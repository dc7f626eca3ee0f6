"""Animated WebP previews, from frames the transcode pass already decoded.

Previews are sampled and downscaled inside the transcode stage's single
decode of the source (re-decoding each clip afterwards would cost a second
full decode); this module holds the sampling rule and the encoder.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av

from udfs.media.video import encode_frames


def preview_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(w, h) at `target_height` (never upscaled), aspect kept, both even."""
    h = min(target_height, height)
    w = max(2, round(width * h / height))
    return w - w % 2, max(2, h - h % 2)


def preview_frame_offsets(num_frames: int, fps: float, preview_fps: float) -> list[int]:
    """Offsets within a clip of the frames a `preview_fps` preview shows:
    the frame at or just after each multiple of 1/preview_fps seconds."""
    if preview_fps <= 0:
        raise ValueError("preview fps must be positive")
    step = fps / preview_fps
    offsets = []
    k = 0
    while True:
        offset = int(round(k * step))
        if offset >= num_frames:
            break
        offsets.append(offset)
        k += 1
    return offsets


def encode_webp(frames: list[av.VideoFrame], fps: float, *, quality: int = 50, lossless: bool = False,
                method: int = 4) -> bytes:
    """An animated, looping WebP of `frames` shown at `fps`. `method` is
    libwebp's speed/size trade-off, 0 (fastest) to 6 (smallest); 4 is its
    default."""
    if not frames:
        raise ValueError("no frames for the preview")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(buf, mode="w", format="webp") as out:
        stream = out.add_stream("libwebp_anim", rate=rate)
        stream.width = frames[0].width
        stream.height = frames[0].height
        stream.pix_fmt = "yuv420p" if not lossless else "bgra"
        stream.options = {"loop": "0", "quality": str(quality), "lossless": "1" if lossless else "0",
                          "compression_level": str(method)}
        encode_frames(out, stream, frames, rate)
    return buf.getvalue()
