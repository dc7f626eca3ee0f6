"""The export task: the clip table written to file layouts other tools read.

`python -m engine task=export output=OUT export.parquet=true` exports an
existing output; a curate run with the same keys exports at its end.

Blobs are read in chunks with Lance's blob reader, so an export never holds
more than one chunk of clips in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import lance
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from engine import outputs
from engine.lance_io import read_blob_bytes
from engine.uris import arrow_fs, lance_storage_options, scheme_of

BLOB_COLUMNS = ("mp4", "preview_webp")
CHUNK_ROWS = 64


def scalar_columns(clips: lance.LanceDataset) -> list[str]:
    return [name for name in clips.schema.names if name not in BLOB_COLUMNS]


def write_parquet(clips: lance.LanceDataset, path: str, filesystem: Any = None) -> str:
    """All non-media columns as one Parquet file (for SQL engines, pandas)."""
    pq.write_table(clips.to_table(columns=scalar_columns(clips)), path, filesystem=filesystem)
    return path


def _chunks(clips: lance.LanceDataset) -> Iterator[tuple[list[dict[str, Any]], list[bytes | None], list[bytes | None]]]:
    table = clips.to_table(columns=scalar_columns(clips), with_row_id=True)
    for start in range(0, table.num_rows, CHUNK_ROWS):
        part = table.slice(start, CHUNK_ROWS)
        ids = part.column("_rowid").to_pylist()
        mp4 = read_blob_bytes(clips, "mp4", ids)
        webp = read_blob_bytes(clips, "preview_webp", ids)
        yield part.drop_columns(["_rowid"]).to_pylist(), mp4, webp


def write_nemo_layout(clips: lance.LanceDataset, root: str) -> str:
    """NeMo Curator's layout: clips/{id}.mp4, previews/{id}.webp,
    metas/v0/{id}.json, for users whose downstream tools read files."""
    for sub in ("clips", "previews", os.path.join("metas", "v0")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for rows, mp4s, webps in _chunks(clips):
        for row, mp4, webp in zip(rows, mp4s, webps):
            clip_id = row["clip_id"]
            if mp4 is not None:
                with open(os.path.join(root, "clips", f"{clip_id}.mp4"), "wb") as fh:
                    fh.write(mp4)
            if webp is not None:
                with open(os.path.join(root, "previews", f"{clip_id}.webp"), "wb") as fh:
                    fh.write(webp)
            meta = {k: _jsonable(v) for k, v in row.items()}
            meta["span_uuid"] = clip_id
            meta["source_video"] = row["source_uri"]
            meta["duration_span"] = [row["start_s"], row["end_s"]]
            with open(os.path.join(root, "metas", "v0", f"{clip_id}.json"), "w") as fh:
                json.dump(meta, fh, indent=1)
    return root


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, pa.Scalar):
        return value.as_py()
    return value


def check_export_target(export_cfg: Any, root: str) -> None:
    if export_cfg.get("nemo_layout") and scheme_of(root):
        raise ValueError("export.nemo_layout writes plain files and needs a local output directory")


def write_exports(export_cfg: Any, clips: lance.LanceDataset, layout: outputs.OutputLayout,
                  storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """The layouts `export_cfg` turns on; returns format -> where it went."""
    check_export_target(export_cfg, layout.root)
    done: dict[str, str] = {}
    if export_cfg.get("parquet"):
        path = outputs.join(layout.root, "clips.parquet")
        fs, fs_path = arrow_fs(path, storage_options) if scheme_of(path) else (None, path)
        done["parquet"] = write_parquet(clips, fs_path, filesystem=fs)
    if export_cfg.get("nemo_layout"):
        done["nemo_layout"] = write_nemo_layout(clips, layout.root)
    return done


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export `OUT/clips.lance` in the layouts `cfg.export` turns on."""
    layout = outputs.OutputLayout(str(cfg.output))
    storage_options = outputs.storage_options(cfg)
    clips = layout.open_clips(lance_storage_options(storage_options))
    done = write_exports(cfg.export, clips, layout, storage_options)
    if not done:
        raise ValueError("task=export has nothing to do: turn on export.parquet=true or export.nemo_layout=true")
    return {"exports": done}
