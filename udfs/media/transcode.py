"""Transcode: cut each source video into H.264 clips in a single decode pass.

The source is demuxed and decoded once. Spans are grouped into chains of
non-overlapping spans (`plan_chains`: one chain for back-to-back fixed-stride
or scene spans, more only where spans overlap). Each chain has one
long-lived video encoder that is fed the frames of its spans only, with an
IDR keyframe forced at every span start; its packets are cut at those
keyframes into one mp4 per span. That is the work of one FFmpeg process
with a segment muxer: one encoder start-up per video, and no lookahead
drain at every clip end (a fresh x264 per clip idles its threads while it
flushes). Clips stay exact: each starts with an IDR frame and x264's GOPs
are closed, so no frame of a clip references another clip.

Audio is decoded in the same pass, trimmed to each clip's time span at
sample precision and re-encoded to AAC. Previews are sampled from the same
decoded frames. With `motion` set, the clip's motion scores come from its
own encoded packets through a vectors-only decode
(`udfs.analysis.motion_decode`), equal to the scores `ClipAnalysis` gets by
decoding the finished mp4, at a fraction of a full decode.

Threads: the encoder uses frame threads (`thread_type: frame`), as the
FFmpeg command line does. PyAV's own default is slice threads, which makes
libx264 switch to sliced threading: lower latency, but about 15% slower on
two cores and worse on small frames.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pyarrow as pa
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from udfs.schema import CLIP_MOTION_FIELDS, clip_id_for, clip_schema, conform
from udfs.analysis.filtering import apply_filter
from udfs.analysis.motion import MotionSettings, motion_scores
from udfs.analysis.motion_decode import decode_motion_vectors, motion_sample_indices
from udfs.analysis.rules import judge
from udfs.media.encoders import choose_encoder
from udfs.media.nvdec import choose_decoder, video_decoder
from udfs.quality.clip_quality import QualitySampler, Reformatters
from udfs.quality.settings import enabled_blocks, quality_columns
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
THREAD_TYPES = ("frame", "slice", "auto")

log = logging.getLogger(__name__)

# Clips waiting for the finishing thread before the decode loop waits for it.
MAX_FINISHING = 4

# Clip rows handed downstream per table: bounded memory per worker without a
# block per clip.
ROWS_PER_TABLE = 4


def encoder_options(encoder: str, preset: str, crf: int) -> dict[str, str]:
    # forced-idr: a frame sent as an I-frame becomes an IDR, so each clip decodes on its own.
    if encoder == "h264_nvenc":
        return {"preset": _NVENC_PRESETS.get(preset, preset), "rc": "vbr", "cq": str(crf), "b": "0",
                "forced-idr": "1"}
    return {"preset": preset, "crf": str(crf), "forced-idr": "1"}


def plan_chains(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of `spans` (sorted by start) grouped into chains of
    non-overlapping spans, each chain in order; first fit, so back-to-back or
    gapped spans form one chain and only overlaps open another."""
    chains: list[list[int]] = []
    ends: list[int] = []
    for i, (start, end) in enumerate(spans):
        for c, last_end in enumerate(ends):
            if last_end <= start:
                chains[c].append(i)
                ends[c] = end
                break
        else:
            chains.append([i])
            ends.append(end)
    return chains


@dataclass
class _AudioChunk:
    start_s: float  # relative to the video's first frame
    samples: np.ndarray  # (channels, n) planar, or (1, n*channels) packed
    sample_rate: int
    layout: str
    format: str
    channels: int

    @property
    def planar(self) -> bool:
        return self.format.endswith("p")

    @property
    def num_samples(self) -> int:
        n = self.samples.shape[1]
        return n if self.planar else n // self.channels

    @property
    def end_s(self) -> float:
        return self.start_s + self.num_samples / self.sample_rate

    def slice(self, first: int, last: int) -> np.ndarray:
        if self.planar:
            return self.samples[:, first:last]
        return self.samples[:, first * self.channels : last * self.channels]


class _ChainEncoder:
    """One video encoder for a chain of spans. It is opened through a muxer
    that never receives a packet, so that its SPS/PPS (extradata) exist
    before the first clip's mp4 header is written; each clip's mp4 gets a
    stream copied from it."""

    def __init__(self, encoder: str, options: dict[str, str], threads: int, thread_type: str, fps: Fraction,
                 width: int, height: int) -> None:
        self._holder = av.open(io.BytesIO(), mode="w", format="mp4")
        self.stream = self._holder.add_stream(encoder, rate=fps, options=dict(options))
        self.stream.width = width
        self.stream.height = height
        self.stream.pix_fmt = "yuv420p"
        ctx = self.stream.codec_context
        ctx.thread_count = threads
        ctx.thread_type = thread_type.upper()
        self._holder.start_encoding()
        self.fps = fps
        self.time_base = Fraction(1) / fps
        self.extradata = ctx.extradata
        self.next_pts = 0

    def encode(self, frame: av.VideoFrame, keyframe: bool) -> list[av.Packet]:
        frame.pts = self.next_pts
        frame.time_base = self.time_base
        frame.pict_type = PictureType.I if keyframe else PictureType.NONE
        self.next_pts += 1
        return self.stream.encode(frame)

    def flush(self) -> list[av.Packet]:
        return self.stream.encode(None)

    def close(self) -> None:
        try:
            self._holder.close()
        except (av.FFmpegError, ValueError, OSError):
            pass


@dataclass
class _Clip:
    """One clip being cut from its chain's encoded stream: its muxer, audio
    encoder, sampled preview frames and (for motion) its packets."""

    index: int
    start_frame: int
    end_frame: int
    fps: Fraction
    width: int
    height: int
    encoder: _ChainEncoder
    audio: tuple[int, str] | None  # (sample rate, channel layout) of the audio track, or None
    preview_offsets: set[int]
    preview_wh: tuple[int, int] | None
    keep_packets: bool
    quality: QualitySampler | None = None
    first_pts: int = 0  # the chain encoder's pts of this clip's first frame
    frames: int = 0  # frames sent to the encoder
    audio_samples: int = 0
    video_fed: bool = False  # every frame of the span sent to the encoder
    video_done: bool = False  # every packet of the clip muxed
    error: str | None = None
    packets: list[tuple[bytes, int, int]] = field(default_factory=list)
    preview_frames: list[av.VideoFrame] = field(default_factory=list)
    buf: io.BytesIO = field(default_factory=io.BytesIO)

    def __post_init__(self) -> None:
        self.first_pts = self.encoder.next_pts
        self.extradata = self.encoder.extradata
        self.out = av.open(self.buf, mode="w", format="mp4")
        self.vstream = self.out.add_stream_from_template(self.encoder.stream)
        self.astream = None
        if self.audio is not None:
            # The encoder resamples whatever the decoder produced to AAC's format.
            self.astream = self.out.add_stream("aac", rate=self.audio[0])
            self.astream.layout = self.audio[1]
        self._muxed = 0

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    def owns(self, pts: int) -> bool:
        return self.first_pts <= pts < self.first_pts + self.frames

    def mux_video(self, packet: av.Packet) -> None:
        if self.error is not None:
            return
        if self._muxed == 0 and not packet.is_keyframe:
            raise ValueError("the encoder did not start the clip with a keyframe")
        pts = packet.pts - self.first_pts
        dts = packet.dts - self.first_pts if packet.dts is not None else None
        if self.keep_packets:
            self.packets.append((bytes(packet), pts, dts))
        packet.pts, packet.dts = pts, dts
        packet.stream = self.vstream
        self.out.mux(packet)
        self._muxed += 1

    def add_audio(self, chunk: _AudioChunk) -> None:
        if self.error is not None or self.astream is None or chunk.end_s <= self.start_s or chunk.start_s >= self.end_s:
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

    def finish(self) -> bytes:
        if self.astream is not None:
            for packet in self.astream.encode():
                self.out.mux(packet)
        self.out.close()
        return self.buf.getvalue()

    def abandon(self) -> None:
        try:
            self.out.close()
        except (av.FFmpegError, ValueError, OSError):
            pass


@dataclass
class _Chain:
    spans: deque[int]  # span indices not yet opened, in order
    encoder: _ChainEncoder | None = None
    clips: list[_Clip] = field(default_factory=list)  # opened, not yet finished, oldest first
    feeding: _Clip | None = None  # the clip whose frames are being sent now


class ClipTranscoder:
    """Video-table batch (probe + span columns) -> clip-table rows.

    A generator UDF: clips are yielded as they are finished, so a long video
    never holds all of its encoded clips in memory at once. With `motion`
    (the motion config node) the rows also carry the motion scores and
    `passed`/`filter_reason`.
    """

    def __init__(
        self,
        *,
        encoder: str,
        preset: str,
        crf: int,
        threads: int,
        thread_type: str,
        decode_threads: int,
        decode: str,
        video_workers: int,
        keep_audio: bool,
        preview: dict[str, Any] | None = None,
        motion: Mapping[str, Any] | MotionSettings | None = None,
        quality: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        # Once per worker: a GPU without NVENC (A100, H100) gets libx264 under `auto`.
        self.encoder_choice = choose_encoder(encoder)
        self.encoder = self.encoder_choice.encoder
        if self.encoder_choice.requested == "auto" and self.encoder == "libx264":
            log.info("transcode: %s", self.encoder_choice.why)
        # decode=nvdec without PyNvVideoCodec or a GPU fails here, before any video is opened.
        self.decoder_choice = choose_decoder(decode)
        if self.encoder not in av.codecs_available:
            raise RuntimeError(f"encoder {self.encoder} is not available in this FFmpeg build")
        if thread_type not in THREAD_TYPES:
            raise ValueError(f"transcode.thread_type must be one of {THREAD_TYPES}, got {thread_type!r}")
        self.options = encoder_options(self.encoder, preset, crf)
        self.threads = threads
        self.thread_type = thread_type
        self.decode_threads = decode_threads
        self.video_workers = max(1, int(video_workers))
        self.keep_audio = keep_audio
        preview = dict(preview or {})
        self.preview_enabled = bool(preview.get("enabled", True))
        self.preview_fps = float(preview.get("fps", 1.0))
        self.preview_height = int(preview.get("height", 240))
        self.preview_quality = int(preview.get("quality", 50))
        self.preview_method = int(preview.get("method", 2))
        if isinstance(motion, MotionSettings) or motion is None:
            self.motion = motion if motion is not None and motion.enabled else None
        else:
            known = {k: v for k, v in dict(motion).items() if k not in ("name", "resources")}
            settings = MotionSettings(**known)
            self.motion = settings if settings.enabled else None
        # `quality` arrives checked, its text model resolved (udfs.quality.settings.prepare).
        self.quality = dict(quality) if quality and enabled_blocks(quality) else None
        self.detector = None
        if self.quality and "text" in enabled_blocks(self.quality):
            from udfs.quality.text import TextDetector

            text = self.quality["text"]
            self.detector = TextDetector(model=text["model"], device=text["device"], threads=text["threads"],
                                         pixel_threshold=text["pixel_threshold"],
                                         box_threshold=text["box_threshold"], unclip_ratio=text["unclip_ratio"])
        self.schema = clip_schema(self.output_fields())
        # The settings the filters judge by (udfs.analysis.rules), and those
        # filters: the quality and motion rules, in registry order.
        from udfs import registry

        self.settings = {"quality": self.quality or {}, "transcode": {},
                         "motion": dataclasses.asdict(self.motion) if self.motion else {"mode": "disable"}}
        self.rules = [*(registry.filters_of("quality") if self.quality else ()),
                      *(registry.filters_of("motion") if self.motion else ())]
        self._quality_reformat = Reformatters()
        self.storage_options = storage_options
        # swscale contexts kept across frames (a fresh one per frame costs more than
        # the conversion), one set per thread: videos of a batch may run at once.
        self._local = threading.local()

    def output_fields(self) -> list[pa.Field]:
        """Columns beyond the base clip schema: the quality signals and the
        motion scores that are on (in registry order)."""
        return [*(quality_columns(self.quality) if self.quality else []),
                *(CLIP_MOTION_FIELDS if self.motion else [])]

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        videos = [row for row in batch.to_pylist()
                  if row.get("error") is None and row.get("span_start_frames")]
        if self.video_workers > 1 and len(videos) > 1:
            clips = self._concurrently(videos)
        else:
            clips = (clip for video in videos for clip in self._transcode_video(video))
        rows: list[dict[str, Any]] = []
        for clip in clips:
            rows.append(clip)
            if len(rows) >= ROWS_PER_TABLE:
                yield self._table(rows)
                rows = []
        if rows:
            yield self._table(rows)

    def _concurrently(self, videos: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Clips of several videos transcoded at once, one thread each (PyAV
        drops the GIL while it decodes and encodes): one video's serial parts
        (demux, start-up, the last frames' flush, audio) overlap another's
        encoding, which a loop of one video at a time leaves idle."""
        done = object()
        out: queue.Queue[Any] = queue.Queue()

        def work(video: dict[str, Any]) -> None:
            try:
                for clip in self._transcode_video(video):
                    out.put(clip)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                out.put(exc)
            finally:
                out.put(done)

        with ThreadPoolExecutor(max_workers=self.video_workers, thread_name_prefix="video") as pool:
            for video in videos:
                pool.submit(work, video)
            running = len(videos)
            while running:
                item = out.get()
                if item is done:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        table = conform(pa.Table.from_pylist(rows, schema=self.schema), self.schema)
        return apply_filter(table, judge(table, self.rules, self.settings)) if self.rules else table

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

    def _finish(self, video: dict[str, Any], clip: _Clip) -> dict[str, Any]:
        end = clip.start_frame + clip.frames
        if clip.error is not None:
            clip.abandon()
            return self._clip_row(video, clip.index, clip.start_frame, clip.end_frame, clip.fps, error=clip.error)
        try:
            mp4 = clip.finish()
            webp = (encode_webp(clip.preview_frames, self.preview_fps, quality=self.preview_quality,
                                method=self.preview_method) if clip.preview_frames else None)
        except (av.FFmpegError, ValueError, OSError) as exc:
            return self._clip_row(video, clip.index, clip.start_frame, end, clip.fps,
                                  error=f"encode failed: {type(exc).__name__}: {exc}")
        row = self._clip_row(
            video, clip.index, clip.start_frame, end, clip.fps,
            mp4=mp4, codec="h264", width=clip.width, height=clip.height, num_frames=clip.frames,
            num_bytes=len(mp4), has_audio=clip.astream is not None and clip.audio_samples > 0,
            preview_webp=webp,
        )
        vectors = self._vectors(clip)
        if self.motion is not None:
            row.update(self._motion(clip, vectors))
        if clip.quality is not None:
            row.update(clip.quality.scores(vectors, self.detector))
        return row

    def _vectors(self, clip: _Clip) -> dict[int, np.ndarray] | None:
        """The motion vectors of the frames the motion scores and the camera
        fit sample, from one vectors-only decode of the clip's packets (None
        when they cannot be decoded: the clip is fine, its scores are missing)."""
        wanted = set(motion_sample_indices(clip.frames, clip.fps, self.motion)) if self.motion else set()
        if clip.quality is not None:
            wanted |= {i for i in clip.quality.vector_offsets if i < clip.frames}
        if not wanted:
            return None
        try:
            return decode_motion_vectors(clip.packets, codec="h264", extradata=clip.extradata, wanted=wanted)
        except (av.FFmpegError, ValueError):
            return None

    def _motion(self, clip: _Clip, vectors: dict[int, np.ndarray] | None) -> dict[str, Any]:
        grid = motion_sample_indices(clip.frames, clip.fps, self.motion)
        frames = [vectors[i] for i in grid if vectors and vectors.get(i) is not None]
        scores = motion_scores(frames, clip.height, clip.width, self.motion.patch_size)
        return {
            "motion_global_mean": None if scores is None else scores.global_mean,
            "motion_per_patch_min": None if scores is None else scores.per_patch_min,
        }

    def _reformat(self, frame: av.VideoFrame, width: int, height: int, key: str) -> av.VideoFrame:
        if not hasattr(self._local, "reformatters"):
            self._local.reformatters = {}
        reformatter = self._local.reformatters.setdefault(key, VideoReformatter())
        return reformatter.reformat(frame, width=width, height=height, format="yuv420p")

    def _transcode_video(self, video: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # Finishing a clip (closing its mp4, its motion decode, its WebP) runs on a
        # second thread: the decode/encode loop goes on feeding x264 meanwhile,
        # instead of leaving its frame threads idle at every clip end.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-finish") as finisher:
            finishing: deque[Future[dict[str, Any]]] = deque()
            def finish(clip: _Clip) -> None:
                finishing.append(finisher.submit(self._finish, video, clip))

            for row in self._cut_video(video, finish):
                if row is not None:  # an error row: in line with the clips, so rows keep span order
                    done: Future[dict[str, Any]] = Future()
                    done.set_result(row)
                    finishing.append(done)
                # Yield what is done; wait only when too many finished clips pile up.
                while finishing and (finishing[0].done() or len(finishing) > MAX_FINISHING):
                    yield finishing.popleft().result()
            while finishing:
                yield finishing.popleft().result()

    def _cut_video(self, video: dict[str, Any], finish: Any) -> Iterator[dict[str, Any]]:
        """Decode `video` once and feed its spans' encoders; finished clips go
        to `finish`, error rows are yielded (None rows are progress ticks)."""
        spans = sorted(zip(video["span_start_frames"], video["span_end_frames"]))
        chains = [_Chain(spans=deque(c)) for c in plan_chains(spans)]
        chain_of = {i: chain for chain in chains for i in chain.spans}
        next_span = 0
        frame_index = 0
        try:
            with open_video(video["uri"], self.storage_options) as container:
                vstream = container.streams.video[0]
                vstream.thread_type = "AUTO"
                vstream.thread_count = self.decode_threads
                decode_video = video_decoder(self.decoder_choice, video["uri"], vstream)  # NVDEC or PyAV
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
                for packet in container.demux(streams):
                    try:
                        frames = decode_video(packet) if packet.stream is vstream else packet.decode()
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
                                    error = self._open_clip(chain_of[next_span], next_span, start, end, fps, width,
                                                            height, audio_format, audio_buffer)
                                    if error is not None:
                                        yield self._clip_row(video, next_span, start, end, fps, error=error)
                                else:
                                    chain_of[next_span].spans.popleft()
                                next_span += 1
                            feeding = [c for c in chains if c.feeding is not None]
                            if feeding:
                                frame = self._prepare(frame, width, height)
                                for chain in feeding:
                                    self._feed(chain, frame)
                            frame_index += 1
                        else:
                            chunk = _AudioChunk(
                                start_s=float(frame.pts * frame.time_base) - video_t0 if frame.pts is not None else 0.0,
                                samples=frame.to_ndarray(), sample_rate=frame.sample_rate,
                                layout=frame.layout.name, format=frame.format.name,
                                channels=len(frame.layout.channels),
                            )
                            audio_clock = chunk.end_s
                            for chain in chains:
                                for clip in chain.clips:
                                    self._guard(chain, clip, clip.add_audio, chunk)
                            audio_buffer.append(chunk)
                        # Keep only audio that a clip not yet opened may still need.
                        horizon = spans[next_span][0] / fps if next_span < len(spans) else float("inf")
                        while audio_buffer and audio_buffer[0].end_s < min(horizon, audio_clock) - 1.0:
                            audio_buffer.popleft()
                    # A clip is complete once its packets are muxed and audio has passed
                    # its end (or has stopped: an audio track shorter than the video must
                    # not keep finished clips in memory until the end of the file).
                    video_clock = frame_index / fps
                    for chain in chains:
                        while chain.clips and chain.clips[0].video_done and (
                                chain.clips[0].error is not None or audio_clock >= chain.clips[0].end_s
                                or video_clock >= chain.clips[0].end_s + AUDIO_WAIT_S):
                            finish(chain.clips.pop(0))
                    yield None
                    if next_span >= len(spans) and not any(c.clips for c in chains):
                        break  # nothing left to cut: skip the rest of the file
                # End of stream: what is still open got all the frames there are.
                for chain in chains:
                    self._flush(chain)
                    for clip in chain.clips:
                        finish(clip)
                    chain.clips = []
                for index in range(next_span, len(spans)):
                    start, end = spans[index]
                    yield self._clip_row(video, index, start, end, fps,
                                         error=f"source ended at frame {frame_index}, before this span started")
        except (av.FFmpegError, OSError, ValueError) as exc:
            message = f"decode failed at frame {frame_index}: {type(exc).__name__}: {exc}"
            fps = Fraction(video["fps"]).limit_denominator(1001)
            for chain in chains:
                for clip in chain.clips:
                    clip.abandon()
                    yield self._clip_row(video, clip.index, clip.start_frame, clip.end_frame, fps, error=message)
                chain.clips = []
                self._close_encoder(chain)
            for index in range(next_span, len(spans)):
                start, end = spans[index]
                yield self._clip_row(video, index, start, end, fps, error=message)
        finally:
            for chain in chains:
                self._close_encoder(chain)

    def _open_clip(self, chain: _Chain, index: int, start: int, end: int, fps: Fraction, width: int, height: int,
                   audio: tuple[int, str] | None, audio_buffer: deque[_AudioChunk]) -> str | None:
        """Start span `index` on its chain's encoder (opening one if needed);
        an error message if that fails."""
        chain.spans.popleft()
        try:
            if chain.encoder is None:
                chain.encoder = _ChainEncoder(self.encoder, self.options, self.threads, self.thread_type, fps,
                                              width, height)
            preview_wh = preview_size(width, height, self.preview_height) if self.preview_enabled else None
            offsets = (set(preview_frame_offsets(end - start, float(fps), self.preview_fps))
                       if self.preview_enabled else set())
            quality = QualitySampler(self.quality, end - start, fps, height, width) if self.quality else None
            clip = _Clip(index=index, start_frame=start, end_frame=end, fps=fps, width=width, height=height,
                         encoder=chain.encoder, audio=audio, preview_offsets=offsets, preview_wh=preview_wh,
                         keep_packets=self.motion is not None or bool(quality and quality.vector_offsets),
                         quality=quality)
        except (av.FFmpegError, ValueError, OSError) as exc:
            return f"encoder open failed: {type(exc).__name__}: {exc}"
        chain.clips.append(clip)
        chain.feeding = clip
        for chunk in audio_buffer:
            self._guard(chain, clip, clip.add_audio, chunk)
        return None

    def _feed(self, chain: _Chain, frame: av.VideoFrame) -> None:
        clip = chain.feeding
        assert clip is not None and chain.encoder is not None
        if clip.preview_wh is not None and clip.frames in clip.preview_offsets:
            w, h = clip.preview_wh
            clip.preview_frames.append(self._reformat(frame, w, h, "preview"))
        if clip.quality is not None and clip.quality.wants(clip.frames):
            clip.quality.take(clip.frames, frame, self._quality_reformat)
        try:
            packets = chain.encoder.encode(frame, keyframe=clip.frames == 0)
            clip.frames += 1
            if clip.start_frame + clip.frames >= clip.end_frame:
                clip.video_fed = True
                chain.feeding = None
            self._route(chain, packets)
            if clip.video_fed and not chain.spans:
                self._flush(chain)  # the chain's last clip: nothing more will come
        except (av.FFmpegError, ValueError, OSError) as exc:
            self._fail_chain(chain, f"encode failed: {type(exc).__name__}: {exc}")

    def _route(self, chain: _Chain, packets: list[av.Packet]) -> None:
        """Mux each packet into the clip whose frame it holds; a keyframe of
        a later clip means every clip before it is complete."""
        for packet in packets:
            for pos, clip in enumerate(chain.clips):
                if clip.owns(packet.pts):
                    break
            else:
                continue  # a failed clip's packet
            if pos > 0 and packet.is_keyframe:
                for earlier in chain.clips[:pos]:
                    earlier.video_done = True
            self._guard(chain, clip, clip.mux_video, packet)

    def _flush(self, chain: _Chain) -> None:
        if chain.encoder is not None:
            try:
                self._route(chain, chain.encoder.flush())
            except (av.FFmpegError, ValueError, OSError) as exc:
                self._fail_chain(chain, f"encode failed: {type(exc).__name__}: {exc}")
        for clip in chain.clips:
            clip.video_done = True
        chain.feeding = None
        self._close_encoder(chain)

    def _fail_chain(self, chain: _Chain, message: str) -> None:
        """The shared encoder broke: every clip it still holds fails; the
        chain's next span opens a new encoder."""
        for clip in chain.clips:
            if clip.error is None:
                clip.error = message
            clip.video_done = True
        chain.feeding = None
        self._close_encoder(chain)

    @staticmethod
    def _close_encoder(chain: _Chain) -> None:
        if chain.encoder is not None:
            chain.encoder.close()
            chain.encoder = None

    @staticmethod
    def _guard(chain: _Chain, clip: _Clip, method: Any, item: Any) -> None:
        """One clip's muxer failing costs that clip, not the video."""
        if clip.error is not None:
            return
        try:
            method(item)
        except (av.FFmpegError, ValueError, OSError) as exc:
            clip.error = f"encode failed: {type(exc).__name__}: {exc}"
            if chain.feeding is clip:
                chain.feeding = None
                clip.video_done = True

    def _prepare(self, frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
        if frame.format.name != "yuv420p" or frame.width != width or frame.height != height:
            frame = self._reformat(frame, width, height, "encode")
        return frame
