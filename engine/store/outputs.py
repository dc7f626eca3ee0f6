"""What a run leaves in its output folder: where each table lives, reading
the tables (a consistent pair while a curate run still commits), the summary
and summary.json, and the run settings every task shares."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import lance
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from omegaconf import DictConfig, OmegaConf

from udfs.uris import arrow_fs, scheme_of

# The clip columns the summary needs: one scan, no media blobs.
CLIP_STAT_COLUMNS = ["video_id", "start_s", "end_s", "num_bytes", "error", "passed", "filter_reason"]
# The video columns the summary needs (not the per-frame scores).
VIDEO_STAT_COLUMNS = ["video_id", "uri", "duration_s", "codec", "error", "num_clips", "num_clip_errors"]
# videos.lance transaction property: the clips.lance version a videos.lance
# version completes (see engine.curate.commits).
CLIPS_VERSION_PROPERTY = "reelsift.clips_version"


def storage_options(cfg: DictConfig) -> dict[str, Any] | None:
    """Object-store credentials of the run (`storage_options`), pyarrow form."""
    opts = cfg.get("storage_options")
    return OmegaConf.to_container(opts, resolve=True) if opts else None


def redacted_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config for a summary file, without credentials."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if config.get("storage_options"):
        config["storage_options"] = {k: "<redacted>" for k in config["storage_options"]}
    return config


@dataclass(frozen=True)
class OutputLayout:
    root: str

    @property
    def clips(self) -> str:
        return join(self.root, "clips.lance")

    @property
    def videos(self) -> str:
        return join(self.root, "videos.lance")

    @property
    def summary(self) -> str:
        return join(self.root, "summary.json")

    def path(self, *parts: str) -> str:
        """A file or folder inside the output (`dedup/`, `exports/`, ...)."""
        return join(self.root, *parts)

    def open_clips(self, storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
        """The clip table of an existing output, for the tasks that read it."""
        return _open_table(self.clips, "clip table", storage_options)

    def open_videos(self, storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
        """The video table of an existing output."""
        return _open_table(self.videos, "video table", storage_options)

    def snapshot(self, storage_options: dict[str, Any] | None = None) -> tuple[lance.LanceDataset, lance.LanceDataset]:
        """(clips, videos) at matching versions: every video row has all of its
        clips and every clip has its video row, even while a curate run is
        still committing. Each videos.lance version records the clips.lance
        version it completes; a clip table without that record is returned
        as it is."""
        videos = self.open_videos(storage_options)
        clips = self.open_clips(storage_options)
        recorded = None
        for version in range(videos.version, 0, -1):  # past the videos table's own compactions
            transaction = videos.read_transaction(version)
            if transaction is None or type(transaction.operation).__name__ != "Rewrite":
                props = (transaction.transaction_properties or {}) if transaction else {}
                recorded = props.get(CLIPS_VERSION_PROPERTY)
                break
        if recorded is not None and int(recorded) != clips.version and not _only_rewrites(clips, int(recorded)):
            clips = clips.checkout_version(int(recorded))
        return clips, videos

    def exists(self, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether the output already holds a clip table."""
        if not scheme_of(self.root):
            return os.path.exists(self.clips) or os.path.exists(self.videos)
        try:
            lance.dataset(self.clips, storage_options=storage_options)
            return True
        except (FileNotFoundError, ValueError, OSError):
            return False

    def make_root(self) -> None:
        if not scheme_of(self.root):
            os.makedirs(self.root, exist_ok=True)


def _open_table(uri: str, what: str, storage_options: dict[str, Any] | None) -> lance.LanceDataset:
    try:
        return lance.dataset(uri, storage_options=storage_options)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise FileNotFoundError(f"no {what} at {uri}: run task=curate on this output first "
                                f"({type(exc).__name__}: {exc})") from exc


def _only_rewrites(table: lance.LanceDataset, since: int) -> bool:
    """Whether every version of `table` after `since` is a compaction (same
    rows, merged fragments), so its latest version holds what `since` held."""
    return all(type(getattr(table.read_transaction(v), "operation", None)).__name__ == "Rewrite"
               for v in range(since + 1, table.version + 1))


def join(root: str, *parts: str) -> str:
    """`root`/parts for a local folder or an object-store prefix."""
    return "/".join([root.rstrip("/"), *parts]) if scheme_of(root) else os.path.join(root, *parts)


def clip_stats(clips: lance.LanceDataset) -> pl.DataFrame:
    return pl.from_arrow(clips.to_table(columns=CLIP_STAT_COLUMNS))


def video_stats(videos: lance.LanceDataset) -> pa.Table:
    return videos.to_table(columns=VIDEO_STAT_COLUMNS)


def summarise(*, videos: pa.Table, stats: pl.DataFrame, stage_times: dict[str, dict[str, float]],
              pipeline_s: float, total_s: float, config: dict[str, Any], exports: dict[str, str],
              run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts over the whole output (`videos`, `stats`: every committed row,
    whichever run made it); `stage_times`, the wall times and `run` describe
    this run."""
    ok = stats.filter(pl.col("error").is_null()) if stats.height else stats
    failed_videos = videos.filter(pc.is_valid(videos.column("error")))
    good_videos = videos.filter(pc.is_null(videos.column("error")))
    hours_in = float(pc.sum(good_videos.column("duration_s")).as_py() or 0.0) / 3600
    hours_out = float((ok["end_s"] - ok["start_s"]).sum()) / 3600 if ok.height else 0.0
    summary = {
        "videos": videos.num_rows,
        "videos_ok": good_videos.num_rows,
        "videos_failed": failed_videos.num_rows,
        "errors": [{"uri": u, "error": e, "codec": c} for u, e, c in zip(
            failed_videos.column("uri").to_pylist(), failed_videos.column("error").to_pylist(),
            failed_videos.column("codec").to_pylist())],
        "clips": ok.height,
        "clips_failed": stats.height - ok.height,
        "clips_passed": int(stats["passed"].fill_null(False).sum()) if stats.height else 0,
        "hours_in": hours_in,
        "hours_out": hours_out,
        "clip_bytes": int(ok["num_bytes"].sum()) if ok.height else 0,
        "wall_s": {"pipeline": pipeline_s, "total": total_s},
        "run": run or {},
        "stages": stage_times,
        "exports": exports,
        "config": config,
    }
    return summary


def read_summary(layout: OutputLayout, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's summary.json (None when there is none or it is not JSON);
    `storage_options` in pyarrow's form, as the config gives them."""
    try:
        if scheme_of(layout.root):
            fs, path = arrow_fs(layout.summary, storage_options)
            with fs.open_input_stream(path) as fh:
                return json.loads(fh.read().decode())
        with open(layout.summary) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_summary(summary: dict[str, Any], layout: OutputLayout, storage_options: dict[str, Any] | None = None) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if scheme_of(layout.root):
        fs, path = arrow_fs(layout.summary, storage_options)
        with fs.open_output_stream(path) as fh:
            fh.write(text.encode())
    else:
        with open(layout.summary, "w") as fh:
            fh.write(text)
