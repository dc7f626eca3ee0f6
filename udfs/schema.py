"""Arrow schemas of the video table and the clip table.

Every column any stage reads or writes is declared here, so the on-disk tables
have one definition. Stages add the columns of their section; `clip_schema()`
assembles the schema of a run from the sections its enabled stages contribute.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import pyarrow as pa

# uuid5 namespaces: ids must be stable across runs and machines, so they are
# derived from content addresses (uri, frame span), never from counters.
VIDEO_NAMESPACE = uuid.UUID("5b0b3c1e-6a43-4f0e-9d5e-3f6c2d1a9e01")
CLIP_NAMESPACE = uuid.UUID("a7c1d2e3-0b4f-4c5d-8e6f-7a8b9c0d1e02")

# Lance stores columns carrying this metadata as blobs: readers get lazy
# file-like handles instead of loading every clip's bytes into memory.
BLOB_METADATA = {b"lance-encoding:blob": b"true"}


def video_id_for(uri: str) -> str:
    return str(uuid.uuid5(VIDEO_NAMESPACE, uri))


def clip_id_for(uri: str, start_frame: int, end_frame: int) -> str:
    return str(uuid.uuid5(CLIP_NAMESPACE, f"{uri}#{start_frame}-{end_frame}"))


def blob_field(name: str) -> pa.Field:
    return pa.field(name, pa.large_binary(), metadata=BLOB_METADATA)


# ---------------------------------------------------------------- video table
# One row per source video. `error` is null for a good video; a video that
# cannot be opened or probed keeps its row with the reason and yields no clips.
VIDEO_PROBE_FIELDS: list[pa.Field] = [
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("duration_s", pa.float64()),
    pa.field("fps", pa.float64()),
    pa.field("num_frames", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("codec", pa.string()),
    pa.field("pix_fmt", pa.string()),
    pa.field("bit_rate", pa.int64()),
    pa.field("has_audio", pa.bool_()),
    pa.field("error", pa.string()),
]

# Added by the split stage: the planned clip spans, in source frames,
# end exclusive. Lists rather than a fan-out so each video is decoded once
# for all of its clips.
VIDEO_SPAN_FIELDS: list[pa.Field] = [
    pa.field("span_start_frames", pa.list_(pa.int64())),
    pa.field("span_end_frames", pa.list_(pa.int64())),
]

# Added by scene-detecting splitters: per-frame transition probabilities, so
# users can re-threshold without re-running the model.
VIDEO_SCENE_FIELDS: list[pa.Field] = [
    pa.field("scene_detector", pa.string()),
    pa.field("transition_probs", pa.list_(pa.float32())),
]

# Filled in after the clips are written.
VIDEO_RESULT_FIELDS: list[pa.Field] = [
    pa.field("num_clips", pa.int32()),
    pa.field("num_clip_errors", pa.int32()),
]

VIDEO_SCHEMA = pa.schema(VIDEO_PROBE_FIELDS + VIDEO_SPAN_FIELDS + VIDEO_SCENE_FIELDS + VIDEO_RESULT_FIELDS)

# ----------------------------------------------------------------- clip table
# One row per clip. A clip whose encode failed keeps its row with `error` set
# and null media, so the span is accounted for.
CLIP_BASE_FIELDS: list[pa.Field] = [
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("clip_index", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("start_frame", pa.int64()),
    pa.field("end_frame", pa.int64()),
    blob_field("mp4"),
    pa.field("codec", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("fps", pa.float64()),
    pa.field("num_frames", pa.int64()),
    pa.field("num_bytes", pa.int64()),
    pa.field("has_audio", pa.bool_()),
    blob_field("preview_webp"),
    pa.field("error", pa.string()),
]

# Clip analysis (motion, aesthetics) and the keep/drop decision. Filtered
# clips stay in the table with passed=false and the reason.
CLIP_MOTION_FIELDS: list[pa.Field] = [
    pa.field("motion_global_mean", pa.float32()),
    pa.field("motion_per_patch_min", pa.float32()),
]
CLIP_AESTHETIC_FIELDS: list[pa.Field] = [
    pa.field("aesthetic_score", pa.float32()),
]
# Quality signals (udfs/quality), one group per `quality.<block>`, computed
# in the transcode pass; null where a clip was too short to sample.
CLIP_QUALITY_FIELDS: dict[str, list[pa.Field]] = {
    # Largest share of a sampled frame's area covered by detected text.
    "text": [pa.field("text_area_ratio", pa.float32())],
    # Black bars in source pixels, stable over the clip.
    "borders": [pa.field(f"border_{side}", pa.int32()) for side in ("top", "bottom", "left", "right")],
    # Variance of the luma Laplacian at a fixed analysis size.
    "sharpness": [pa.field("sharpness", pa.float32())],
    # Luma mean and standard deviation (0-1); shares of black and frozen sampled frames.
    "exposure": [pa.field(name, pa.float32())
                 for name in ("brightness", "contrast", "black_frame_ratio", "frozen_frame_ratio")],
    # static | pan_left | pan_right | tilt_up | tilt_down | zoom_in | zoom_out | complex, and how
    # well one global motion model explains the clip's motion vectors (0-1).
    "camera": [pa.field("camera_motion", pa.string()), pa.field("camera_motion_score", pa.float32())],
    # A hard cut inside the clip, and the largest frame-to-frame scene change (0-1).
    "cuts": [pa.field("cut_inside", pa.bool_()), pa.field("max_scene_change", pa.float32())],
}
CLIP_FILTER_FIELDS: list[pa.Field] = [
    pa.field("passed", pa.bool_()),
    pa.field("filter_reason", pa.string()),
]


def clip_embedding_fields(dim: int) -> list[pa.Field]:
    # Fixed-size lists give Lance a vector column it can index directly.
    return [pa.field("embedding", pa.list_(pa.float32(), dim))]


CLIP_CAPTION_FIELDS: list[pa.Field] = [
    pa.field("caption", pa.string()),
    pa.field("caption_enhanced", pa.string()),
    pa.field(
        "caption_windows",
        pa.list_(
            pa.struct(
                [
                    pa.field("start_frame", pa.int64()),
                    pa.field("end_frame", pa.int64()),
                    pa.field("caption", pa.string()),
                    pa.field("caption_enhanced", pa.string()),
                ]
            )
        ),
    ),
]

# Transient frame columns: decoded RGB frames handed from the frame-extraction
# stage to the model stage that consumes them, which drops them. They never
# reach the written table. One set per consumer (e.g. "aesthetic", "embed",
# "caption"): raw uint8 HWC frames, their source-frame indices within the
# clip, and their (height, width).
def frame_fields(consumer: str) -> list[pa.Field]:
    return [
        pa.field(f"{consumer}_frames", pa.list_(pa.large_binary())),
        pa.field(f"{consumer}_frame_indices", pa.list_(pa.int64())),
        pa.field(f"{consumer}_frame_hw", pa.list_(pa.int32(), 2)),
    ]


def frame_columns(consumer: str) -> list[str]:
    return [f.name for f in frame_fields(consumer)]


CLIP_BASE_SCHEMA = pa.schema(CLIP_BASE_FIELDS)


def clip_schema(extra: Iterable[pa.Field] = ()) -> pa.Schema:
    """Base clip schema plus the fields the enabled stages add, in order."""
    fields = list(CLIP_BASE_FIELDS)
    names = {f.name for f in fields}
    for field in extra:
        if field.name in names:
            raise ValueError(f"clip column {field.name!r} declared twice")
        names.add(field.name)
        fields.append(field)
    return pa.schema(fields)


def empty_like(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast `table` to `schema`, adding null columns the table lacks.

    Stages build tables from Python lists; this pins them to the declared
    types so blocks from different workers concatenate without promotion.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ------------------------------------------------------------------- dedup
# Added by task=dedup to the clip table (or to any Lance table it runs on), in
# one new version; the media columns are not rewritten. Null for rows dedup
# did not consider (outside `dedup.where`, or a null / NaN / wrong-length
# vector). The training view is `passed AND error IS NULL AND duplicate IS NOT TRUE`.
CLIP_DEDUP_FIELDS: list[pa.Field] = [
    # k-means cluster (row of OUT/dedup/centroids.npy).
    pa.field("dedup_cluster", pa.int32()),
    # Cosine distance to the cluster's (normalised) centroid: what keep=hard|easy ranks by.
    pa.field("dedup_centroid_dist", pa.float32()),
    # Highest cosine similarity to a higher-ranked member it was compared
    # with (its cluster; with dedup.mode=components also the boundary
    # comparisons), and that member's id; null when none ranks higher.
    pa.field("dedup_max_sim", pa.float32()),
    pa.field("dedup_max_id", pa.string()),
    # The duplicate group at dedup.eps: the smallest `_rowid` of its members;
    # null for a row with no near-duplicate.
    pa.field("dedup_group", pa.int64()),
    # Drop it: another member of its group is kept (exactly one per group
    # with dedup.mode=components).
    pa.field("duplicate", pa.bool_()),
]
# The columns a re-run with only a new dedup.eps rewrites.
DEDUP_EPS_COLUMNS = ("dedup_group", "duplicate")

# Transient rows between the dedup stages (never written to a table). Rows
# are addressed by Lance's `_rowaddr` (where results are written back) and
# `_rowid` (how vectors are fetched again); vectors do not travel.
DEDUP_ROW_FIELDS: list[pa.Field] = [
    pa.field("_rowaddr", pa.uint64()),
    pa.field("_rowid", pa.uint64()),
    pa.field("id", pa.string()),
]
# After nearest-centroid assignment: cluster -1 and `skip` set for a row
# whose vector cannot take part. A row near a cluster boundary appears a
# second time, `primary` false, under the cluster across that boundary;
# `centroid_dist` is always the distance to its own (nearest) centroid, which
# is what it is ranked by. `new`: not compared in an earlier run (every row
# of a full run; the grown part of the table in an incremental one).
DEDUP_ASSIGN_SCHEMA = pa.schema([
    *DEDUP_ROW_FIELDS,
    pa.field("cluster", pa.int32()),
    pa.field("centroid_dist", pa.float32()),
    pa.field("skip", pa.string()),
    pa.field("primary", pa.bool_()),
    pa.field("new", pa.bool_()),
])
# After the pairwise pass over one cluster: one row per member it compared
# (a boundary member once per cluster it was compared in). `max_sim` /
# `max_id`: its best higher-ranked partner there; `nbr_rowid` / `nbr_sim`:
# the partners at cosine >= 1 - the largest eps kept (the duplicate edges).
DEDUP_PAIRWISE_SCHEMA = pa.schema([
    *DEDUP_ROW_FIELDS,
    pa.field("cluster", pa.int32()),
    pa.field("centroid_dist", pa.float32()),
    pa.field("primary", pa.bool_()),
    pa.field("max_sim", pa.float32()),
    pa.field("max_id", pa.string()),
    pa.field("nbr_rowid", pa.list_(pa.uint64())),
    pa.field("nbr_sim", pa.list_(pa.float32())),
])
# One row per considered row once the pairwise rows are merged: its own
# cluster, and its best higher-ranked partner over every cluster it was
# compared in.
DEDUP_RESULT_SCHEMA = pa.schema([
    *DEDUP_ROW_FIELDS,
    pa.field("cluster", pa.int32()),
    pa.field("centroid_dist", pa.float32()),
    pa.field("max_sim", pa.float32()),
    pa.field("max_id", pa.string()),
])
# OUT/dedup/edges.parquet: every duplicate edge found, once, at cosine >= 1 -
# the largest eps of the summary sweep; components at any smaller eps come
# from it without another pass.
DEDUP_EDGE_SCHEMA = pa.schema([
    pa.field("a", pa.uint64()),
    pa.field("b", pa.uint64()),
    pa.field("sim", pa.float32()),
])
