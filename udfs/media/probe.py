"""Probe: container and stream facts for each source video, through PyAV.

One `av.open` per video, headers only, except when the container does not
record a frame count: then the video packets are counted by demuxing (no
decoding), because the split stage plans clips in frames and a guessed count
would misplace the last clip.
"""

from __future__ import annotations

from typing import Any

import av
import pyarrow as pa

from udfs.schema import VIDEO_PROBE_FIELDS, conform, video_id_for
from udfs.uris import size_of
from udfs.media.video import frame_rate, open_video

PROBE_SCHEMA = pa.schema(VIDEO_PROBE_FIELDS)


def _error_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def probe_video(uri: str, *, count_packets: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Facts about one video as a video-table row; never raises for bad media."""
    row: dict[str, Any] = {"video_id": video_id_for(uri), "uri": uri}
    try:
        row["size_bytes"] = size_of(uri, storage_options)
        if row["size_bytes"] == 0:
            raise ValueError("file is empty")
        with open_video(uri, storage_options) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            fps = frame_rate(stream)
            if not ctx.width or not ctx.height:
                raise ValueError("video stream has no frame size")
            num_frames = stream.frames
            if count_packets or not num_frames:
                num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
            if num_frames <= 0:
                raise ValueError("video stream has no frames")
            row.update(
                fps=float(fps),
                num_frames=int(num_frames),
                duration_s=float(num_frames / fps),
                width=int(ctx.width),
                height=int(ctx.height),
                codec=ctx.name,
                pix_fmt=ctx.format.name if ctx.format is not None else None,
                bit_rate=int(container.bit_rate or ctx.bit_rate or 0) or None,
                has_audio=bool(container.streams.audio),
            )
    except (av.FFmpegError, OSError, ValueError, ZeroDivisionError) as exc:
        row["error"] = f"probe failed: {_error_message(exc)}"
    return row


class ProbeVideos:
    """Video-table batch of `uri`s -> the probe columns."""

    def __init__(self, *, count_packets: bool, storage_options: dict[str, Any] | None = None) -> None:
        self.count_packets = count_packets
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [
            probe_video(uri, count_packets=self.count_packets, storage_options=self.storage_options)
            for uri in batch.column("uri").to_pylist()
        ]
        return conform(pa.Table.from_pylist(rows, schema=PROBE_SCHEMA), PROBE_SCHEMA)
