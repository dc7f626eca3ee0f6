"""Which H.264 encoder a transcode worker uses: chosen by what the GPU can
do, not by whether one is visible.

A100 and H100 have NVDEC but no NVENC; PyAV's FFmpeg lists `h264_nvenc`
everywhere, and CUDA is visible on those nodes, so presence says nothing.
`choose_encoder` opens a real NVENC session and encodes a few frames once per
process; `auto` falls back to libx264 when that fails and says why, and an
explicit `h264_nvenc` fails before any video is decoded, naming the GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from fractions import Fraction

log = logging.getLogger(__name__)

ENCODERS = ("libx264", "h264_nvenc", "auto")
# What a probe encodes: enough frames that the session really starts.
PROBE_FRAMES = 3
PROBE_SIZE = (256, 144)


class EncoderUnavailable(RuntimeError):
    """The encoder asked for cannot run on this machine."""


@dataclass(frozen=True)
class EncoderChoice:
    requested: str
    encoder: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def gpu_name() -> str:
    try:
        import torch

        return str(torch.cuda.get_device_name(0))
    except (ImportError, RuntimeError, AssertionError):
        return "this GPU"


def open_nvenc_session() -> None:
    """Encode `PROBE_FRAMES` black frames with h264_nvenc; raises what FFmpeg raises."""
    import av
    import numpy as np

    width, height = PROBE_SIZE
    ctx = av.CodecContext.create("h264_nvenc", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, 30)
    ctx.framerate = Fraction(30, 1)
    ctx.open()
    frame = av.VideoFrame.from_ndarray(np.zeros((height * 3 // 2, width), np.uint8), format="yuv420p")
    packets = []
    for i in range(PROBE_FRAMES):
        frame.pts = i
        packets += ctx.encode(frame)
    packets += ctx.encode(None)
    if not packets:
        raise RuntimeError("the NVENC session produced no packets")


@functools.lru_cache(maxsize=1)
def nvenc_probe() -> tuple[bool, str]:
    """(works, why), once per process."""
    import av

    if not cuda_available():
        return False, "no CUDA GPU visible"
    if "h264_nvenc" not in av.codecs_available:
        return False, "this FFmpeg build has no h264_nvenc"
    try:
        open_nvenc_session()
    except (OSError, ValueError, RuntimeError, av.error.FFmpegError) as exc:
        return False, f"{gpu_name()} cannot open an NVENC session ({type(exc).__name__}: {exc})"
    return True, f"an NVENC session on {gpu_name()} encoded {PROBE_FRAMES} frames"


def choose_encoder(requested: str) -> EncoderChoice:
    """The encoder for `transcode.encoder=requested`; raises
    `EncoderUnavailable` for an explicit h264_nvenc that cannot run."""
    if requested not in ENCODERS:
        raise ValueError(f"unsupported encoder {requested!r}: use libx264, h264_nvenc or auto")
    if requested == "libx264":
        return EncoderChoice(requested, "libx264", "asked for")
    works, why = nvenc_probe()
    if works:
        return EncoderChoice(requested, "h264_nvenc", why)
    if requested == "h264_nvenc":
        raise EncoderUnavailable(f"transcode.encoder=h264_nvenc cannot run: {why}. A100 and H100 GPUs have no "
                                 "NVENC (L4, L40S and RTX cards do); use transcode.encoder=libx264, or auto, "
                                 "which falls back to it")
    return EncoderChoice(requested, "libx264", f"NVENC unusable: {why}; encoding with libx264 on the CPUs")
