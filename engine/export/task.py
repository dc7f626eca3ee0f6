"""The export task: the clip table written to file layouts other tools read.

`python -m engine task=export output=OUT export.format=webdataset` (or a list,
`export.format=[webdataset,nemo]`) writes each format to
`OUT/exports/<format>/`, or to `export.dir`. Formats (engine/export/exporters/):

- `webdataset`: tar shards binned by resolution x aspect ratio x duration
  (Cosmos-Curate's bins), `{clip_id}.mp4/.json/.npy` per clip;
- `cosmos_predict2`: `videos/*.mp4` + `metas/*.txt`, one entry per caption window;
- `nemo`: NeMo Curator's `clips/`, `previews/`, `metas/v0/` and embeddings parquet;
- `parquet`: every column but the media, one file.

They export the curated view unless `export.where` says otherwise, and read
the table a chunk of clips at a time, so memory stays bounded on any table,
local or on an object store. A curate run with `export.format` set exports
at its end. The older switches keep their old meaning: `export.parquet=true`
writes `OUT/clips.parquet` and `export.nemo_layout=true` the NeMo layout at
the output root, every row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lance
from omegaconf import DictConfig, OmegaConf

from engine.store import outputs
from engine.export.exporters.cosmos import write_cosmos_predict2
from engine.export.exporters.nemo import write_nemo_layout
from engine.export.exporters.parquet import write_parquet
from engine.export.exporters.target import ExportTarget
from engine.export.exporters.webdataset import write_webdataset
from udfs.uris import lance_storage_options
from engine.store.views import reader_where

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "cosmos_predict2", "nemo", "parquet")


def export_formats(export_cfg: Any) -> list[str]:
    """The formats `export.format` names (a name, a list, or null)."""
    value = export_cfg.get("format") if export_cfg is not None else None
    if value is None or value == "":
        return []
    names = [str(v) for v in (OmegaConf.to_container(value) if OmegaConf.is_list(value) else
                              value if isinstance(value, (list, tuple)) else [value])]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export.format {unknown}; choose from {list(FORMATS)}")
    return list(dict.fromkeys(names))


def export_root(export_cfg: Any, layout: outputs.OutputLayout, fmt: str, several: bool) -> str:
    """`export.dir` for one format (its `<format>/` for several), else
    `OUT/exports/<format>/`."""
    base = export_cfg.get("dir")
    if not base:
        return layout.path("exports", fmt)
    base = str(base)
    return outputs.join(base, fmt) if several else base


def check_export_target(export_cfg: Any, root: str) -> None:
    """Fail before a long run on a config the export would refuse."""
    export_formats(export_cfg)


def _node(export_cfg: Any, key: str) -> dict[str, Any]:
    node = export_cfg.get(key) if export_cfg is not None else None
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def _writers(export_cfg: Any) -> dict[str, Callable[..., dict[str, Any]]]:
    chunk_rows = int(export_cfg.get("chunk_rows") or 64)
    return {
        "webdataset": lambda c, t, w: write_webdataset(c, t, w, chunk_rows=chunk_rows, **_node(export_cfg, "webdataset")),
        "cosmos_predict2": lambda c, t, w: write_cosmos_predict2(c, t, w, chunk_rows=chunk_rows,
                                                                 **_node(export_cfg, "cosmos_predict2")),
        "nemo": lambda c, t, w: write_nemo_layout(c, t, w, chunk_rows=chunk_rows, **_node(export_cfg, "nemo")),
        "parquet": lambda c, t, w: write_parquet(c, t, w),
    }


def export_where(export_cfg: Any, clips: lance.LanceDataset, storage_options: dict[str, Any] | None) -> str | None:
    """The rows an export writes: `export.where` (default the curated view),
    without the clips rejected in the UI unless `export.include_rejected`."""
    return reader_where(export_cfg.get("where"), clips.schema, clips.uri, lance_storage_options(storage_options),
                        bool(export_cfg.get("include_rejected")))


def export_all(export_cfg: Any, clips: lance.LanceDataset, layout: outputs.OutputLayout,
               storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every export `export_cfg` turns on; format -> its result (`path` and counts)."""
    formats = export_formats(export_cfg)
    where = export_where(export_cfg, clips, storage_options)
    writers = _writers(export_cfg)
    done: dict[str, dict[str, Any]] = {}
    if export_cfg.get("parquet"):
        done["parquet_legacy"] = write_parquet(clips, ExportTarget(layout.root, storage_options), None)
    if export_cfg.get("nemo_layout"):
        nemo = _node(export_cfg, "nemo")
        done["nemo_layout"] = write_nemo_layout(clips, ExportTarget(layout.root, storage_options), None,
                                                chunk_rows=int(export_cfg.get("chunk_rows") or 64), **nemo)
    for fmt in formats:
        target = ExportTarget(export_root(export_cfg, layout, fmt, len(formats) > 1), storage_options)
        done[fmt] = writers[fmt](clips, target, where)
    return done


def write_exports(export_cfg: Any, clips: lance.LanceDataset, layout: outputs.OutputLayout,
                  storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """The exports `export_cfg` turns on; format -> where it went (the
    legacy switches under their old names `parquet` / `nemo_layout`)."""
    done = export_all(export_cfg, clips, layout, storage_options)
    paths = {}
    for name, result in done.items():
        paths["parquet" if name == "parquet_legacy" else name] = result["path"]
    return paths


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export `OUT/clips.lance` in the formats `cfg.export` turns on."""
    layout = outputs.OutputLayout(str(cfg.output))
    storage_options = outputs.storage_options(cfg)
    clips = layout.open_clips(lance_storage_options(storage_options))
    node = cfg.export
    if not export_formats(node) and not node.get("parquet") and not node.get("nemo_layout"):
        default = (cfg.get("task") or {}).get("default_format")
        if not default:
            raise ValueError(f"task=export has nothing to do: set export.format to one of {list(FORMATS)} "
                             "(or a list of them)")
        log.info("export.format not set: writing %s (task=export's default; export.format=NAME picks)", default)
        node = OmegaConf.merge(node, {"format": default})
    done = export_all(node, clips, layout, storage_options)
    exports = {("parquet" if k == "parquet_legacy" else k): v["path"] for k, v in done.items()}
    return {"exports": exports, "results": done, "table_version": clips.version,
            "where": export_where(cfg.export, clips, storage_options)}

