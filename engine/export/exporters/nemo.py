"""NeMo Curator's (and Cosmos-Curate's) split-pipeline file layout, so a
NeMo user's downstream tools run unchanged:

    clips/{clip_id}.mp4
    previews/{clip_id}.webp
    metas/v0/{clip_id}.json          span_uuid, source_video, duration_span, scores, windows[...], valid
    {ce1|clip|...}_embd_parquet/*.parquet   id, embedding: what NeMo's semantic dedup reads

The metadata also keeps every column of the clip table under its own name.
"""

from __future__ import annotations

from typing import Any

import lance
import pyarrow as pa
import pyarrow.parquet as pq

from engine.export.exporters.rows import jsonable, scan_clips
from engine.export.exporters.target import ExportTarget

# Embedding model name (clip table metadata) -> NeMo's folder prefix.
EMBEDDING_DIRS = {"cosmos_embed1": "ce1", "internvideo2": "iv2"}
# Our captions come from Qwen-VL; NeMo keys window captions by model.
CAPTION_KEY = "qwen_caption"
ENHANCED_KEY = "qwen_lm_enhanced_caption"
EMBEDDINGS_PER_FILE = 10_000


def embedding_dir(schema: pa.Schema) -> str:
    name = (schema.metadata or {}).get(b"embedding_name", b"embedding").decode()
    return f"{EMBEDDING_DIRS.get(name, name)}_embd_parquet"


def nemo_meta(row: dict[str, Any], clip_location: str) -> dict[str, Any]:
    """NeMo's per-clip metadata fields, then every column of the row."""
    meta: dict[str, Any] = {
        "span_uuid": row["clip_id"],
        "source_video": row["source_uri"],
        "duration_span": [row["start_s"], row["end_s"]],
        "width_source": row.get("width"),
        "height_source": row.get("height"),
        "framerate_source": row.get("fps"),
        "clip_location": clip_location,
    }
    if row.get("motion_global_mean") is not None or row.get("motion_per_patch_min") is not None:
        meta["motion_score"] = {"global_mean": row.get("motion_global_mean"),
                                "per_patch_min_256": row.get("motion_per_patch_min")}
    if row.get("aesthetic_score") is not None:
        meta["aesthetic_score"] = row["aesthetic_score"]
    windows = row.get("caption_windows")
    if windows:
        meta["windows"] = [{
            "start_frame": w["start_frame"], "end_frame": w["end_frame"],
            CAPTION_KEY: w.get("caption"), ENHANCED_KEY: w.get("caption_enhanced"),
            "caption": w.get("caption"), "caption_enhanced": w.get("caption_enhanced"),
        } for w in windows]
    meta["valid"] = bool(row.get("passed")) and row.get("error") is None
    for key, value in jsonable(row, drop=("embedding",)).items():
        meta.setdefault(key, value)
    return meta


def write_nemo_layout(clips: lance.LanceDataset, target: ExportTarget, where: str | None, *,
                      chunk_rows: int = 64, embeddings_per_file: int = EMBEDDINGS_PER_FILE) -> dict[str, Any]:
    """The layout under `target`; returns counts and where it went."""
    has_embedding = "embedding" in clips.schema.names
    emb_dir = embedding_dir(clips.schema)
    if has_embedding:
        target.remove_dir(emb_dir)  # chunks of an earlier export would linger
    emb_type = clips.schema.field("embedding").type if has_embedding else None
    emb_schema = pa.schema([pa.field("id", pa.string()), pa.field("embedding", pa.list_(pa.float32()))])
    pending_ids: list[str] = []
    pending_vecs: list[list[float]] = []
    files = 0
    counts = {"clips": 0, "previews": 0, "metas": 0, "embeddings": 0, "windows": 0}

    def flush() -> None:
        nonlocal files
        if not pending_ids:
            return
        table = pa.table({"id": pending_ids, "embedding": pa.array(pending_vecs, type=emb_schema.field(1).type)})
        with target.open(emb_dir, f"part_{files:06d}.parquet") as sink:
            pq.write_table(table, sink)
        files += 1
        pending_ids.clear()
        pending_vecs.clear()

    for chunk in scan_clips(clips, where, chunk_rows=chunk_rows, blobs=("mp4", "preview_webp")):
        for row, blobs in chunk.rows():
            clip_id = row["clip_id"]
            if blobs.get("mp4") is not None:
                target.write_bytes(blobs["mp4"], "clips", f"{clip_id}.mp4")
                counts["clips"] += 1
            if blobs.get("preview_webp") is not None:
                target.write_bytes(blobs["preview_webp"], "previews", f"{clip_id}.webp")
                counts["previews"] += 1
            meta = nemo_meta(row, target.uri("clips", f"{clip_id}.mp4"))
            counts["windows"] += len(meta.get("windows", []))
            target.write_json(meta, "metas", "v0", f"{clip_id}.json")
            counts["metas"] += 1
            if emb_type is not None and row.get("embedding") is not None:
                pending_ids.append(clip_id)
                pending_vecs.append(list(row["embedding"]))
                counts["embeddings"] += 1
                if len(pending_ids) >= embeddings_per_file:
                    flush()
    flush()
    out: dict[str, Any] = {"path": target.uri(), **counts}
    if has_embedding:
        out["embeddings_dir"] = target.uri(emb_dir)
    return out
