"""Cosmos-Predict2 post-training layout (Cosmos-Curate's
`cosmos_video2world_dataset`), one entry per caption window:

    videos/{clip_id}_{start}_{end}.mp4     the window's frames
    metas/{clip_id}_{start}_{end}.txt      its caption

A window that is the whole clip is the clip's mp4 as stored; a shorter one
is cut from one decode of the clip and encoded with libx264 (video only:
Cosmos trains on frames). A clip without caption windows is one entry with
the clip caption; a clip with no caption at all is skipped and counted.
T5 embeddings of the captions are not written (no T5 model runs here).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import lance

from engine.export.exporters.rows import scan_clips
from engine.export.exporters.target import ExportTarget
from udfs.media.video import frame_rate, iter_frames, video_stream

log = logging.getLogger(__name__)


@dataclass
class _WindowEncoder:
    start: int
    end: int
    rate: Fraction
    width: int
    height: int
    preset: str
    crf: int
    buf: io.BytesIO = field(default_factory=io.BytesIO)
    frames: int = 0

    def __post_init__(self) -> None:
        self.out = av.open(self.buf, mode="w", format="mp4")
        self.stream = self.out.add_stream("libx264", rate=self.rate, options={"preset": self.preset,
                                                                            "crf": str(self.crf)})
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"

    def add(self, frame: av.VideoFrame) -> None:
        frame = frame.reformat(format="yuv420p") if frame.format.name != "yuv420p" else frame
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.out.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode():
            self.out.mux(packet)
        self.out.close()
        return self.buf.getvalue()


def cut_windows(mp4: bytes, spans: list[tuple[int, int]], *, preset: str, crf: int) -> list[bytes]:
    """Each [start, end) span of clip frames as its own mp4, from one decode."""
    with av.open(io.BytesIO(mp4), mode="r") as container:
        stream = video_stream(container)
        rate = frame_rate(stream)
        w, h = stream.codec_context.width, stream.codec_context.height
        encoders = [_WindowEncoder(s, e, rate, w - w % 2, h - h % 2, preset, crf) for s, e in spans]
        last = max(e for _, e in spans)
        for index, frame in iter_frames(container, stream):
            if index >= last:
                break
            for enc in encoders:
                if enc.start <= index < enc.end:
                    enc.add(frame if (frame.width, frame.height) == (enc.width, enc.height)
                            else frame.reformat(width=enc.width, height=enc.height))
    short = [(enc.start, enc.end, enc.frames) for enc in encoders if enc.frames != enc.end - enc.start]
    if short:
        raise ValueError(f"clip ended inside caption window(s) {short}")
    return [enc.finish() for enc in encoders]


def entries_of(row: dict[str, Any], caption_field: str) -> list[tuple[int, int, str]]:
    """(start, end, caption) per caption window, or the whole clip."""
    out = []
    for w in row.get("caption_windows") or []:
        text = w.get(caption_field) or w.get("caption")
        if text:
            out.append((int(w["start_frame"]), int(w["end_frame"]), text))
    if out:
        return out
    text = row.get(caption_field) or row.get("caption")
    return [(0, int(row["num_frames"]), text)] if text and row.get("num_frames") else []


def write_cosmos_predict2(clips: lance.LanceDataset, target: ExportTarget, where: str | None, *,
                          chunk_rows: int = 64, caption: str = "caption", preset: str = "medium",
                          crf: int = 18) -> dict[str, Any]:
    if "caption" not in clips.schema.names:
        raise ValueError("cosmos_predict2 needs captions: this clip table has none (run curate with caption=qwen_vl)")
    if caption not in ("caption", "caption_enhanced"):
        raise ValueError(f"export.cosmos_predict2.caption must be caption or caption_enhanced, got {caption!r}")
    counts = {"entries": 0, "clips": 0, "no_caption": 0, "no_media": 0, "cut_errors": 0}
    for chunk in scan_clips(clips, where, chunk_rows=chunk_rows):
        for row, blobs in chunk.rows():
            mp4 = blobs.get("mp4")
            entries = entries_of(row, caption)
            if mp4 is None:
                counts["no_media"] += 1
                continue
            if not entries:
                counts["no_caption"] += 1
                continue
            whole = int(row["num_frames"])
            to_cut = [(s, e) for s, e, _ in entries if (s, e) != (0, whole)]
            try:
                cut = dict(zip(to_cut, cut_windows(mp4, to_cut, preset=preset, crf=crf))) if to_cut else {}
            except (av.FFmpegError, ValueError) as exc:
                counts["cut_errors"] += 1
                log.warning("skipping clip %s: %s", row["clip_id"], exc)
                continue
            for start, end, text in entries:
                name = f"{row['clip_id']}_{start}_{end}"
                target.write_bytes(cut.get((start, end), mp4), "videos", f"{name}.mp4")
                target.write_bytes(text.encode(), "metas", f"{name}.txt")
                counts["entries"] += 1
            counts["clips"] += 1
    return {"path": target.uri(), **counts}
