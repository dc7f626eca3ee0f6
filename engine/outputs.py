"""What a run leaves in its output folder: where each table lives, the video
table and summary.json, and the run settings every task shares."""

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

from engine.lance_io import remove_dataset, write_table
from engine.uris import arrow_fs, scheme_of

# The clip columns the video table's counts and the summary need: one scan,
# no media blobs.
CLIP_STAT_COLUMNS = ["video_id", "start_s", "end_s", "num_bytes", "error", "passed"]


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
        try:
            return lance.dataset(self.clips, storage_options=storage_options)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise FileNotFoundError(f"no clip table at {self.clips}: run task=curate on this output first "
                                    f"({type(exc).__name__}: {exc})") from exc

    def prepare(self, *, overwrite: bool) -> None:
        if scheme_of(self.root):
            return  # object stores: Lance creates prefixes on write
        if not overwrite and (os.path.exists(self.clips) or os.path.exists(self.videos)):
            raise FileExistsError(f"{self.root} already holds a reelsift output; pass overwrite=true to replace it")
        # Workers write fragments into the clip dataset as they go, so the old
        # one must be gone before the run starts.
        remove_dataset(self.clips)
        remove_dataset(self.videos)
        os.makedirs(self.root, exist_ok=True)


def join(root: str, *parts: str) -> str:
    """`root`/parts for a local folder or an object-store prefix."""
    return "/".join([root.rstrip("/"), *parts]) if scheme_of(root) else os.path.join(root, *parts)


def clip_stats(clips: lance.LanceDataset) -> pl.DataFrame:
    return pl.from_arrow(clips.to_table(columns=CLIP_STAT_COLUMNS))


def write_video_table(video_table: pa.Table, stats: pl.DataFrame, layout: OutputLayout, schema: pa.Schema,
                      storage_options: dict[str, Any] | None) -> pa.Table:
    """The video table with per-video clip counts from `clip_stats`; a video
    whose clips all failed gets the first clip error as its own."""
    per_video = (
        stats.group_by("video_id")
        .agg(
            pl.col("error").is_null().sum().cast(pl.Int32).alias("num_clips"),
            pl.col("error").is_not_null().sum().cast(pl.Int32).alias("num_clip_errors"),
            pl.col("error").drop_nulls().first().alias("first_clip_error"),
        )
        if stats.height
        else pl.DataFrame(schema={"video_id": pl.String, "num_clips": pl.Int32, "num_clip_errors": pl.Int32,
                                  "first_clip_error": pl.String})
    )
    videos = pl.from_arrow(video_table.drop_columns([c for c in ("num_clips", "num_clip_errors")
                                                     if c in video_table.column_names]))
    videos = (
        videos.join(per_video, on="video_id", how="left")
        .with_columns(
            pl.col("num_clips").fill_null(0),
            pl.col("num_clip_errors").fill_null(0),
            pl.when(pl.col("error").is_null() & (pl.col("num_clips") == 0) & pl.col("first_clip_error").is_not_null())
            .then(pl.col("first_clip_error"))
            .otherwise(pl.col("error"))
            .alias("error"),
        )
        .drop("first_clip_error")
        .sort("uri")
    )
    table = videos.to_arrow()
    write_table(table, layout.videos, schema, storage_options)
    return table


def summarise(*, videos: pa.Table, stats: pl.DataFrame, stage_times: dict[str, dict[str, float]],
              pipeline_s: float, total_s: float, config: dict[str, Any], exports: dict[str, str]) -> dict[str, Any]:
    ok = stats.filter(pl.col("error").is_null()) if stats.height else stats
    failed_videos = videos.filter(pc.is_valid(videos.column("error")))
    good_videos = videos.filter(pc.is_null(videos.column("error")))
    hours_in = float(pc.sum(good_videos.column("duration_s")).as_py() or 0.0) / 3600
    hours_out = float((ok["end_s"] - ok["start_s"]).sum()) / 3600 if ok.height else 0.0
    summary = {
        "videos": videos.num_rows,
        "videos_ok": good_videos.num_rows,
        "videos_failed": failed_videos.num_rows,
        "errors": [{"uri": u, "error": e} for u, e in zip(failed_videos.column("uri").to_pylist(),
                                                        failed_videos.column("error").to_pylist())],
        "clips": ok.height,
        "clips_failed": stats.height - ok.height,
        "clips_passed": int(stats["passed"].fill_null(False).sum()) if stats.height else 0,
        "hours_in": hours_in,
        "hours_out": hours_out,
        "clip_bytes": int(ok["num_bytes"].sum()) if ok.height else 0,
        "wall_s": {"pipeline": pipeline_s, "total": total_s},
        "stages": stage_times,
        "exports": exports,
        "config": config,
    }
    return summary


def write_summary(summary: dict[str, Any], layout: OutputLayout, storage_options: dict[str, Any] | None = None) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if scheme_of(layout.root):
        fs, path = arrow_fs(layout.summary, storage_options)
        with fs.open_output_stream(path) as fh:
            fh.write(text.encode())
    else:
        with open(layout.summary, "w") as fh:
            fh.write(text)
