"""Motion vectors from an H.264 bitstream at the least decoding cost.

The motion scores (`udfs.analysis.motion`) need only the motion vectors of
the frames sampled at `motion.fps`, never their pixels. A vector is entropy
decoded from the bitstream and predicted from neighbouring and co-located
*vectors*, never from pixel values, so the decoder here can cut work that
only affects pixels and still export exactly the vectors a full decode of
the clip exports:

- `skip_loop_filter=all`: no deblocking (a third of an H.264 decode);
- `skip_frame=NONREF` for every frame that is not sampled: a non-reference
  frame is never a prediction source, so skipping it changes no other
  frame's vectors. Reference frames are always decoded, because a B-frame's
  direct-mode vectors are derived from its reference's vectors.

`decode_motion_vectors` works on encoded packets whose pts is the frame's
display index in the clip (what the transcode stage produces); tests prove
its scores equal those of decoding the finished mp4 (`ClipAnalysis`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np

from udfs.media.frames import as_fraction, rate_indices
from udfs.analysis.motion import MotionScores, MotionSettings, motion_scores

# Options of a decoder that only exports motion vectors (see the module docstring).
MV_ONLY_OPTIONS = {"flags2": "+export_mvs", "skip_loop_filter": "all"}


def collect_side_data_cycles() -> None:
    """Free frames whose side data was read, once the caller dropped them.

    Reading `frame.side_data` ties the frame and its side-data container in
    a reference cycle (PyAV 18), so the frame, its picture and the decoder's
    buffer pool outlive it until Python's cyclic GC runs, which large C
    buffers barely trigger: before this, a 60-minute 720p video grew the
    transcode worker by ~400 MB. Collecting the young generations right
    away frees them; each such collect covers a few thousand objects."""
    gc.collect(1)


def motion_sample_indices(num_frames: int, clip_fps: float | Fraction, settings: MotionSettings) -> list[int]:
    """Display indices of the frames whose vectors the scores use: the same
    grid `ClipAnalysis` samples (floor(k * clip_fps / motion.fps))."""
    return rate_indices(num_frames, as_fraction(clip_fps), as_fraction(settings.fps))


def decode_motion_vectors(
    packets: Iterable[tuple[bytes, int | None, int | None]],
    *,
    codec: str,
    extradata: bytes | None,
    wanted: set[int],
) -> dict[int, np.ndarray | None]:
    """Motion-vector arrays (PyAV `MOTION_VECTORS` side data) of the frames
    whose display index is in `wanted`, by index: every wanted frame that was
    decoded, None for one without vectors (an I-frame).

    `packets` are (data, pts, dts) in decode order, pts = display index."""
    ctx = av.CodecContext.create(codec, "r")
    if extradata:
        ctx.extradata = extradata
    ctx.options = dict(MV_ONLY_OPTIONS)
    ctx.thread_count = 1  # the skip decision must apply to exactly the packet sent next
    found: dict[int, np.ndarray | None] = {}

    def take(frames: list[av.VideoFrame]) -> None:
        read = False
        for frame in frames:
            if frame.pts in wanted:
                side = frame.side_data.get("MOTION_VECTORS")
                found[frame.pts] = None if side is None else np.array(side.to_ndarray(), copy=True)
                read = True
        if read:
            del frame, side
            frames.clear()
            collect_side_data_cycles()

    for data, pts, dts in packets:
        ctx.skip_frame = "DEFAULT" if pts in wanted else "NONREF"
        packet = av.Packet(data)
        packet.pts, packet.dts = pts, dts
        take(ctx.decode(packet))
    ctx.skip_frame = "DEFAULT"
    take(ctx.decode(None))
    return found


def motion_from_packets(
    packets: Iterable[tuple[bytes, int | None, int | None]],
    *,
    codec: str,
    extradata: bytes | None,
    num_frames: int,
    fps: float | Fraction,
    height: int,
    width: int,
    settings: MotionSettings,
) -> tuple[MotionScores | None, int]:
    """The clip's motion scores from its encoded packets, and how many
    sampled frames were decoded."""
    wanted = set(motion_sample_indices(num_frames, fps, settings))
    found = decode_motion_vectors(packets, codec=codec, extradata=extradata, wanted=wanted)
    mv_frames = [found[i] for i in sorted(found) if found[i] is not None]
    return motion_scores(mv_frames, height, width, settings.patch_size), len(found)
