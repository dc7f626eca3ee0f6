"""ClipAnalysis: one decode of each clip's mp4 for motion scoring and for the
frames every model consumer needs.

Motion vectors are side data of the same decode that produces the frames,
so motion costs no extra pass: the decoder exports them for every frame and
the stage reads those of the frames on the motion grid (2 fps by default).
RGB conversion (swscale, the expensive part after the decode itself) runs
only for frames some consumer asked for, once per distinct output size, and
the decode stops after the last frame anyone needs.

Input columns: `mp4`, `error` (rows with error set pass through with nulls).
Output columns: `motion_global_mean`, `motion_per_patch_min`, `passed`,
`filter_reason` (unless motion.mode == disable) and, per consumer `name`,
the transient columns `frame_fields(name)`.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pyarrow as pa

from udfs.schema import CLIP_FILTER_FIELDS, CLIP_MOTION_FIELDS, frame_fields
from udfs.analysis.filtering import apply_filter, row_errors
from udfs.media.frames import FrameShaper, FrameSpec, as_fraction, parse_consumers, plan_decode
from udfs.analysis.motion import MotionScores, MotionSettings, motion_scores
from udfs.analysis.rules import LOW_MOTION, judge
from udfs.analysis.motion_decode import MV_ONLY_OPTIONS, collect_side_data_cycles
from udfs.media.video import DEFAULT_DECODE_THREADS, frame_rate, pack_frames, video_stream


@dataclass
class ClipAnalysisResult:
    frames: dict[str, tuple[np.ndarray, list[int]]] = field(default_factory=dict)
    motion: MotionScores | None = None
    motion_sampled: int = 0
    height: int = 0
    width: int = 0


def analyse_clip(
    mp4: bytes,
    specs: list[FrameSpec],
    motion: MotionSettings | None = None,
    *,
    num_frames_hint: int | None = None,
    threads: int = DEFAULT_DECODE_THREADS,
    shaper: FrameShaper | None = None,
) -> ClipAnalysisResult:
    """Decode `mp4` once; return each consumer's frames and the motion scores.

    `shaper` keeps its swscale contexts across clips (pass the stage's)."""
    shaper = shaper or FrameShaper()
    want_motion = motion is not None and motion.enabled
    result = ClipAnalysisResult()
    mv_frames: list[np.ndarray] = []
    with av.open(io.BytesIO(mp4), mode="r", metadata_errors="ignore") as container:
        stream = video_stream(container, threads)
        if want_motion:
            # Vectors only (no consumer wants pixels): deblocking changes pixels,
            # never vectors, so it is skipped (udfs.analysis.motion_decode).
            stream.codec_context.options = dict(MV_ONLY_OPTIONS) if not specs else {"flags2": "+export_mvs"}
            # Frame threading races the motion-vector export (scores changed
            # run to run in tests); slice threading does not.
            stream.thread_type = "SLICE"
        clip_fps = frame_rate(stream)
        num_frames = int(stream.frames or 0) or int(num_frames_hint or 0)
        if num_frames <= 0:
            raise ValueError("clip has no frame count")
        plan = plan_decode(specs, num_frames, clip_fps, as_fraction(motion.fps) if want_motion else None)
        motion_set = set(plan.motion_indices)
        last_needed = max([*plan.needed, *motion_set], default=-1)
        by_name = {s.name: s for s in specs}
        collected: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
        seen = -1
        for index, frame in enumerate(container.decode(stream)):
            seen = index
            if index == 0:
                result.height, result.width = frame.height, frame.width
            if index in motion_set:
                result.motion_sampled += 1
                side = frame.side_data.get("MOTION_VECTORS")
                if side is not None:
                    mv_frames.append(np.array(side.to_ndarray(), copy=True))
            consumers = plan.needed.get(index)
            if consumers:
                for name, rgb in shaper.shape(frame, [by_name[n] for n in sorted(consumers)]).items():
                    collected[name].append(rgb)
            if index in motion_set:
                del frame
                collect_side_data_cycles()
            if index >= last_needed:
                break
        if seen < last_needed:
            raise ValueError(f"clip decoded to {seen + 1} frames, expected {num_frames}")
    for spec in specs:
        indices = plan.consumer_indices[spec.name]
        # Repeated indices (uniform over a short clip) were converted once.
        by_index = dict(zip(sorted(set(indices)), collected[spec.name]))
        h, w = spec.output_hw(result.height, result.width)
        stack = np.stack([by_index[i] for i in indices]) if indices else np.zeros((0, h, w, 3), np.uint8)
        result.frames[spec.name] = (stack, indices)
    if want_motion:
        result.motion = motion_scores(mv_frames, result.height, result.width, motion.patch_size)
    return result


class ClipAnalysis:
    """Single-pass clip decode: motion scores/filter and consumer frames.

    `consumers`: mapping consumer name -> frame spec (see `udfs.media.frames`);
    `motion`: the motion config node (mode, global_mean_threshold,
    per_patch_min_threshold, fps, patch_size) or None for disabled.
    """

    def __init__(
        self,
        *,
        consumers: Mapping[str, Mapping[str, Any]] | None,
        motion: Mapping[str, Any] | MotionSettings | None,
        decode_threads: int,
    ) -> None:
        self.specs = parse_consumers(consumers)
        if motion is None:
            self.motion = MotionSettings(mode="disable")
        elif isinstance(motion, MotionSettings):
            self.motion = motion
        else:
            known = {k: v for k, v in dict(motion).items() if k not in ("name", "resources")}
            self.motion = MotionSettings(**known)
        self.decode_threads = decode_threads
        self._shaper = FrameShaper()

    def output_fields(self) -> list[pa.Field]:
        fields: list[pa.Field] = []
        if self.motion.enabled:
            fields += CLIP_MOTION_FIELDS + CLIP_FILTER_FIELDS
        for spec in self.specs:
            fields += frame_fields(spec.name)
        return fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = row_errors(batch)
        mp4s = batch.column("mp4").to_pylist()
        hints = batch.column("num_frames").to_pylist() if "num_frames" in batch.column_names else [None] * n
        gm: list[float | None] = [None] * n
        ppm: list[float | None] = [None] * n
        frames = {s.name: ([None] * n, [None] * n, [None] * n) for s in self.specs}
        new_errors = list(errors)
        for i in range(n):
            if errors[i] is not None or mp4s[i] is None:
                if errors[i] is None:
                    new_errors[i] = "analysis: clip has no mp4 bytes"
                continue
            try:
                res = analyse_clip(
                    mp4s[i],
                    self.specs,
                    self.motion,
                    num_frames_hint=hints[i],
                    threads=self.decode_threads,
                    shaper=self._shaper,
                )
            except Exception as exc:  # per-row failure is data, not a crash
                new_errors[i] = f"analysis: {type(exc).__name__}: {exc}"
                continue
            if res.motion is not None:
                gm[i], ppm[i] = res.motion.global_mean, res.motion.per_patch_min
            for name, (stack, indices) in res.frames.items():
                blobs, idx, hw = pack_frames(stack, indices)
                cols = frames[name]
                cols[0][i], cols[1][i], cols[2][i] = blobs, idx, hw
        out = batch
        if new_errors != errors:
            err_field = pa.field("error", pa.string())
            if "error" in out.column_names:
                out = out.set_column(out.column_names.index("error"), err_field, pa.array(new_errors, pa.string()))
            else:
                out = out.append_column(err_field, pa.array(new_errors, pa.string()))
        if self.motion.enabled:
            out = out.append_column(CLIP_MOTION_FIELDS[0], pa.array(gm, CLIP_MOTION_FIELDS[0].type))
            out = out.append_column(CLIP_MOTION_FIELDS[1], pa.array(ppm, CLIP_MOTION_FIELDS[1].type))
            settings = {"motion": dataclasses.asdict(self.motion)}
            out = apply_filter(out, judge(out, [LOW_MOTION], settings))
        for spec in self.specs:
            for fld, values in zip(frame_fields(spec.name), frames[spec.name]):
                out = out.append_column(fld, pa.array(values, fld.type))
        return out
