"""Transcode: cut each source video into H.264 clips in a single decode pass.

The source is demuxed and decoded once; every decoded frame is handed to the
encoder of each clip whose span contains it, so N clips cost one decode plus
N encodes (the same work as one FFmpeg process with a segment muxer). Each
clip gets a fresh encoder, so its first frame is an IDR keyframe and it holds
exactly the frames of its span. Audio is decoded in the same pass, trimmed to
each clip's time span at sample precision and re-encoded to AAC.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pyarrow as pa
from av.video.frame import PictureType

from engine.schema import CLIP_BASE_SCHEMA, clip_id_for, conform
from udfs.media.preview import encode_webp, preview_frame_offsets, preview_size
from udfs.media.video import frame_rate, open_video

# How long past a clip's end the video may run ahead of the audio before the
# clip is closed without waiting for more audio (interleaving is usually <1 s).
AUDIO_WAIT_S = 2.0

# libx264 preset names mapped to NVENC's p1 (fastest) .. p7 (best).
_NVENC_PRESETS = {
    "ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
    "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7", "placebo": "p7",
}


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def resolve_encoder(encoder: str) -> str:
    """`auto` picks NVENC where a GPU is visible and libx264 otherwise."""
    if encoder == "auto":
        return "h264_nvenc" if cuda_available() and "h264_nvenc" in av.codecs_available else "libx264"
    if encoder not in ("libx264", "h264_nvenc"):
        raise ValueError(f"unsupported encoder {encoder!r}: use libx264, h264_nvenc or auto")
    return encoder


def encoder_options(encoder: str, preset: str, crf: int) -> dict[str, str]:
    if encoder == "h264_nvenc":
        return {"preset": _NVENC_PRESETS.get(preset, preset), "rc": "vbr", "cq": str(crf), "b": "0"}
    return {"preset": preset, "crf": str(crf)}


@dataclass
class _AudioChunk:
    start_s: float  # relative to the video's first frame
    samples: np.ndarray  # (channels, n) planar, or (1, n*channels) packed
    sample_rate: int
    layout: str
    format: str

    @property
    def planar(self) -> bool:
        return self.format.endswith("p")

    @property
    def num_samples(self) -> int:
        n = self.samples.shape[1]
        return n if self.planar else n // len(av.AudioLayout(self.layout).channels)

    @property
    def end_s(self) -> float:
        return self.start_s + self.num_samples / self.sample_rate

    def slice(self, first: int, last: int) -> np.ndarray:
        if self.planar:
            return self.samples[:, first:last]
        ch = len(av.AudioLayout(self.layout).channels)
        return self.samples[:, first * ch : last * ch]


@dataclass
class _ClipWriter:
    """One clip being encoded: its muxer, streams and sampled preview frames."""

    index: int
    start_frame: int
    end_frame: int
    fps: Fraction
    width: int
    height: int
    encoder: str
    options: dict[str, str]
    threads: int
    audio: tuple[int, str] | None  # (sample rate, channel layout) of the audio track, or None
    preview_offsets: set[int]
    preview_wh: tuple[int, int] | None
    buf: io.BytesIO = field(default_factory=io.BytesIO)
    frames: int = 0
    audio_samples: int = 0
    video_done: bool = False
    preview_frames: list[av.VideoFrame] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = av.open(self.buf, mode="w", format="mp4")
        self.vstream = self.out.add_stream(self.encoder, rate=self.fps, options=dict(self.options))
        self.vstream.width = self.width
        self.vstream.height = self.height
        self.vstream.pix_fmt = "yuv420p"
        self.vstream.codec_context.thread_count = self.threads
        self.astream = None
        if self.audio is not None:
            # The encoder resamples whatever the decoder produced to AAC's format.
            self.astream = self.out.add_stream("aac", rate=self.audio[0])
            self.astream.layout = self.audio[1]

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    def add_frame(self, frame: av.VideoFrame) -> None:
        offset = self.frames
        if self.preview_wh is not None and offset in self.preview_offsets:
            w, h = self.preview_wh
            self.preview_frames.append(frame.reformat(width=w, height=h, format="yuv420p"))
        frame.pts = offset
        frame.time_base = 1 / self.fps
        for packet in self.vstream.encode(frame):
            self.out.mux(packet)
        self.frames += 1
        if self.start_frame + self.frames >= self.end_frame:
            self.video_done = True

    def add_audio(self, chunk: _AudioChunk) -> None:
        if self.astream is None or chunk.end_s <= self.start_s or chunk.start_s >= self.end_s:
            return
        rate = chunk.sample_rate
        # Sample positions on the clip's own timeline, so consecutive chunks
        # butt together without gaps or overlaps from rounding.
        clip_total = int(round((self.end_s - self.start_s) * rate))
        first_abs = int(round((chunk.start_s - self.start_s) * rate))
        lo = max(0, self.audio_samples - first_abs)
        hi = min(chunk.num_samples, clip_total - first_abs)
        if hi <= lo:
            return
        data = np.ascontiguousarray(chunk.slice(lo, hi))
        frame = av.AudioFrame.from_ndarray(data, format=chunk.format, layout=chunk.layout)
        frame.sample_rate = rate
        frame.pts = self.audio_samples
        frame.time_base = Fraction(1, rate)
        for packet in self.astream.encode(frame):
            self.out.mux(packet)
        self.audio_samples += hi - lo

    def finish(self, preview_fps: float, preview_quality: int) -> tuple[bytes, bytes | None]:
        for packet in self.vstream.encode():
            self.out.mux(packet)
        if self.astream is not None:
            for packet in self.astream.encode():
                self.out.mux(packet)
        self.out.close()
        webp = encode_webp(self.preview_frames, preview_fps, quality=preview_quality) if self.preview_frames else None
        return self.buf.getvalue(), webp

    def abandon(self) -> None:
        try:
            self.out.close()
        except (av.FFmpegError, ValueError):
            pass


class ClipTranscoder:
    """Video-table batch (probe + span columns) -> clip-table rows.

    A generator UDF: clips are yielded as they are finished, so a long video
    never holds all of its encoded clips in memory at once.
    """

    def __init__(
        self,
        *,
        encoder: str = "libx264",
        preset: str = "medium",
        crf: int = 23,
        threads: int = 0,
        decode_threads: int = 0,
        keep_audio: bool = True,
        preview: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.encoder = resolve_encoder(encoder)
        if self.encoder not in av.codecs_available:
            raise RuntimeError(f"encoder {self.encoder} is not available in this FFmpeg build")
        self.options = encoder_options(self.encoder, preset, crf)
        self.threads = threads
        self.decode_threads = decode_threads
        self.keep_audio = keep_audio
        preview = dict(preview or {})
        self.preview_enabled = bool(preview.get("enabled", True))
        self.preview_fps = float(preview.get("fps", 1.0))
        self.preview_height = int(preview.get("height", 240))
        self.preview_quality = int(preview.get("quality", 50))
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for row in batch.to_pylist():
            if row.get("error") is not None or not row.get("span_start_frames"):
                continue
            rows: list[dict[str, Any]] = []
            for clip in self._transcode_video(row):
                rows.append(clip)
                # Hand finished clips downstream in small groups: bounded
                # memory per worker without a block per clip.
                if len(rows) >= 4:
                    yield conform(pa.Table.from_pylist(rows, schema=CLIP_BASE_SCHEMA), CLIP_BASE_SCHEMA)
                    rows = []
            if rows:
                yield conform(pa.Table.from_pylist(rows, schema=CLIP_BASE_SCHEMA), CLIP_BASE_SCHEMA)

    # -- one source video ---------------------------------------------------

    def _clip_row(self, video: dict[str, Any], index: int, start: int, end: int, fps: Fraction,
                  **extra: Any) -> dict[str, Any]:
        uri = video["uri"]
        return {
            "clip_id": clip_id_for(uri, start, end),
            "video_id": video["video_id"],
            "source_uri": uri,
            "clip_index": index,
            "start_s": float(start / fps),
            "end_s": float(end / fps),
            "start_frame": start,
            "end_frame": end,
            "fps": float(fps),
            **extra,
        }

    def _finish(self, video: dict[str, Any], writer: _ClipWriter) -> dict[str, Any]:
        end = writer.start_frame + writer.frames
        try:
            mp4, webp = writer.finish(self.preview_fps, self.preview_quality)
        except (av.FFmpegError, ValueError, OSError) as exc:
            return self._clip_row(video, writer.index, writer.start_frame, end, writer.fps,
                                  error=f"encode failed: {type(exc).__name__}: {exc}")
        return self._clip_row(
            video, writer.index, writer.start_frame, end, writer.fps,
            mp4=mp4, codec="h264", width=writer.width, height=writer.height, num_frames=writer.frames,
            num_bytes=len(mp4), has_audio=writer.astream is not None and writer.audio_samples > 0,
            preview_webp=webp,
        )

    def _transcode_video(self, video: dict[str, Any]) -> Iterator[dict[str, Any]]:
        spans = sorted(zip(video["span_start_frames"], video["span_end_frames"]))
        active: list[_ClipWriter] = []
        next_span = 0
        frame_index = 0
        try:
            with open_video(video["uri"], self.storage_options) as container:
                vstream = container.streams.video[0]
                vstream.thread_type = "AUTO"
                vstream.thread_count = self.decode_threads
                fps = frame_rate(vstream)
                astream = container.streams.audio[0] if (self.keep_audio and container.streams.audio) else None
                video_t0 = float(vstream.start_time * vstream.time_base) if vstream.start_time is not None else 0.0
                audio_buffer: deque[_AudioChunk] = deque()
                audio_format = None
                if astream is not None and astream.codec_context.sample_rate:
                    audio_format = (astream.codec_context.sample_rate, astream.codec_context.layout.name)
                else:
                    astream = None
                audio_clock = float("inf") if astream is None else -float("inf")
                streams = [vstream] + ([astream] if astream is not None else [])
                width = height = None
                failed: list[tuple[_ClipWriter, str]] = []
                for packet in container.demux(streams):
                    try:
                        frames = packet.decode()
                    except av.FFmpegError:
                        if packet.stream is vstream:
                            raise
                        # Damaged audio: keep the video, stop waiting for audio.
                        audio_clock = float("inf")
                        continue
                    for frame in frames:
                        if packet.stream is vstream:
                            if width is None:
                                # libx264 4:2:0 needs even sizes: drop the odd last row/column.
                                width, height = frame.width - frame.width % 2, frame.height - frame.height % 2
                            # Open every clip starting here, before feeding the frame.
                            while next_span < len(spans) and spans[next_span][0] <= frame_index:
                                start, end = spans[next_span]
                                if start == frame_index:
                                    try:
                                        writer = self._open_writer(next_span, start, end, fps, width, height,
                                                                   audio_format)
                                    except (av.FFmpegError, ValueError, OSError) as exc:
                                        yield self._clip_row(video, next_span, start, end, fps,
                                                             error=f"encoder open failed: {type(exc).__name__}: {exc}")
                                    else:
                                        active.append(writer)
                                        for chunk in audio_buffer:
                                            self._feed(writer, writer.add_audio, chunk, failed)
                                next_span += 1
                            if active:
                                frame = self._prepare(frame, width, height)
                                for writer in active:
                                    if not writer.video_done:
                                        self._feed(writer, writer.add_frame, frame, failed)
                            frame_index += 1
                        else:
                            chunk = _AudioChunk(
                                start_s=float(frame.pts * frame.time_base) - video_t0 if frame.pts is not None else 0.0,
                                samples=frame.to_ndarray(), sample_rate=frame.sample_rate,
                                layout=frame.layout.name, format=frame.format.name,
                            )
                            audio_clock = chunk.end_s
                            for writer in active:
                                self._feed(writer, writer.add_audio, chunk, failed)
                            audio_buffer.append(chunk)
                        # Keep only audio that a clip not yet opened may still need.
                        horizon = spans[next_span][0] / fps if next_span < len(spans) else float("inf")
                        while audio_buffer and audio_buffer[0].end_s < min(horizon, audio_clock) - 1.0:
                            audio_buffer.popleft()
                    # One clip's encoder failing costs that clip, not the video.
                    for writer, message in failed:
                        active.remove(writer)
                        yield self._clip_row(video, writer.index, writer.start_frame, writer.end_frame, fps,
                                             error=message)
                    failed.clear()
                    # A clip is complete once its video is in and audio has passed its end
                    # (or has stopped: an audio track shorter than the video must not
                    # keep finished clips in memory until the end of the file).
                    video_clock = frame_index / fps
                    done = [w for w in active if w.video_done
                            and (audio_clock >= w.end_s or video_clock >= w.end_s + AUDIO_WAIT_S)]
                    for writer in done:
                        active.remove(writer)
                        yield self._finish(video, writer)
                    if next_span >= len(spans) and not active:
                        break  # nothing left to cut: skip the rest of the file
                # End of stream: what is still open got all the frames there are.
                for writer in active:
                    if writer.frames > 0:
                        yield self._finish(video, writer)
                    else:
                        writer.abandon()
                active = []
                for index in range(next_span, len(spans)):
                    start, end = spans[index]
                    yield self._clip_row(video, index, start, end, fps,
                                         error=f"source ended at frame {frame_index}, before this span started")
        except (av.FFmpegError, OSError, ValueError) as exc:
            message = f"decode failed at frame {frame_index}: {type(exc).__name__}: {exc}"
            fps = Fraction(video["fps"]).limit_denominator(1001)
            for writer in active:
                writer.abandon()
                yield self._clip_row(video, writer.index, writer.start_frame, writer.end_frame, fps, error=message)
            for index in range(next_span, len(spans)):
                start, end = spans[index]
                yield self._clip_row(video, index, start, end, fps, error=message)

    def _open_writer(self, index: int, start: int, end: int, fps: Fraction, width: int, height: int,
                     audio: tuple[int, str] | None) -> _ClipWriter:
        preview_wh = preview_size(width, height, self.preview_height) if self.preview_enabled else None
        offsets = set(preview_frame_offsets(end - start, float(fps), self.preview_fps)) if self.preview_enabled else set()
        return _ClipWriter(
            index=index, start_frame=start, end_frame=end, fps=fps, width=width, height=height,
            encoder=self.encoder, options=self.options, threads=self.threads,
            audio=audio, preview_offsets=offsets, preview_wh=preview_wh,
        )

    @staticmethod
    def _feed(writer: _ClipWriter, method: Any, item: Any, failed: list[tuple[_ClipWriter, str]]) -> None:
        if any(w is writer for w, _ in failed):
            return
        try:
            method(item)
        except (av.FFmpegError, ValueError, OSError) as exc:
            writer.abandon()
            failed.append((writer, f"encode failed: {type(exc).__name__}: {exc}"))

    @staticmethod
    def _prepare(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
        if frame.format.name != "yuv420p" or frame.width != width or frame.height != height:
            frame = frame.reformat(width=width, height=height, format="yuv420p")
        # The source's frame types would otherwise force the encoder's keyframes.
        frame.pict_type = PictureType.NONE
        return frame
