"""Fixed-stride split: plan clip spans in source frames from the probe facts.

Spans are planned in frames, not seconds, so that clip boundaries are exact
and clip ids (uuid5 of uri + span) are stable across runs.
"""

from __future__ import annotations

import pyarrow as pa

from udfs.schema import VIDEO_SPAN_FIELDS


def fixed_stride_spans(
    num_frames: int, fps: float, *, clip_len_s: float, stride_s: float | None = None, min_clip_s: float = 0.0
) -> list[tuple[int, int]]:
    """[start, end) frame spans of `clip_len_s`, starting every `stride_s`
    (default: back to back). A last clip shorter than `min_clip_s` is dropped;
    a video shorter than one clip becomes one clip if it is at least
    `min_clip_s` long."""
    if clip_len_s <= 0:
        raise ValueError("clip_len_s must be positive")
    stride_s = clip_len_s if stride_s is None else stride_s
    if stride_s <= 0:
        raise ValueError("stride_s must be positive")
    clip_len = max(1, round(clip_len_s * fps))
    min_len = max(1, round(min_clip_s * fps))
    spans = []
    k = 0
    while True:
        # Each start from its own time, not a rounded frame stride: at 29.97
        # fps a 300-frame stride would drift 3.6 s over an hour.
        start = round(k * stride_s * fps)
        if start >= num_frames:
            break
        end = min(start + clip_len, num_frames)
        if end - start >= min_len:
            spans.append((start, end))
        if end == num_frames:
            break
        k += 1
    return spans


class FixedStrideSplit:
    """Video-table batch -> the span columns, one list of spans per video."""

    def __init__(self, *, clip_len_s: float, stride_s: float | None, min_clip_s: float) -> None:
        # Fail at construction, not per row, on a config that cannot work.
        fixed_stride_spans(1, 1.0, clip_len_s=clip_len_s, stride_s=stride_s, min_clip_s=min_clip_s)
        self.clip_len_s = clip_len_s
        self.stride_s = stride_s
        self.min_clip_s = min_clip_s

    def __call__(self, batch: pa.Table) -> pa.Table:
        starts: list[list[int]] = []
        ends: list[list[int]] = []
        for num_frames, fps, error in zip(
            batch.column("num_frames").to_pylist(), batch.column("fps").to_pylist(), batch.column("error").to_pylist()
        ):
            spans = (
                []
                if error is not None
                else fixed_stride_spans(
                    num_frames, fps, clip_len_s=self.clip_len_s, stride_s=self.stride_s, min_clip_s=self.min_clip_s
                )
            )
            starts.append([s for s, _ in spans])
            ends.append([e for _, e in spans])
        start_field, end_field = VIDEO_SPAN_FIELDS
        return batch.append_column(start_field, pa.array(starts, start_field.type)).append_column(
            end_field, pa.array(ends, end_field.type)
        )
