"""task=compact: `clips.lance` and `videos.lance` of `output`, compacted with
the `write` node's settings (target_rows_per_fragment, keep_versions_s)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from engine.store import outputs
from engine.store.compaction import compact_and_retire
from udfs.uris import lance_storage_options


def run(cfg: DictConfig) -> dict[str, Any]:
    layout = outputs.OutputLayout(str(cfg.output))
    options = lance_storage_options(outputs.storage_options(cfg))
    layout.open_clips(options)  # a clear error when there is no output here
    node = cfg.write
    tables = [layout.clips] + ([layout.videos] if _exists(layout, options) else [])
    reports = [compact_and_retire(uri, target_rows=int(node.target_rows_per_fragment), keep_s=node.keep_versions_s,
                                  storage_options=options).as_dict() for uri in tables]
    return {"tables": reports, "fragments_before": sum(r["fragments_before"] for r in reports),
            "fragments_after": sum(r["fragments_after"] for r in reports),
            "versions_removed": sum(r["versions_removed"] for r in reports)}


def _exists(layout: outputs.OutputLayout, options: dict[str, Any] | None) -> bool:
    try:
        layout.open_videos(options)
        return True
    except FileNotFoundError:
        return False
