"""How a curate run publishes its work: whole videos, in commits that hold up
after a crash at any point.

Each commit publishes a set of complete videos in two Lance datasets with one
decision:

1. The writers have written every clip row of those videos as fragments of
   `clips.lance` (files no reader sees until a commit references them).
2. The driver writes the videos' rows as fragments of `videos.lance` (also
   unseen).
3. The decision: one `Append` to `clips.lance` with all their clip fragments;
   its transaction records the video fragments (`reelsift.video_fragments`).
4. One `Append` to `videos.lance` with those fragments; its transaction
   records the clip-table version it completes (`reelsift.clips_version`).

A crash before 3 leaves only unreferenced files: the next start removes them
and redoes the videos. A crash between 3 and 4 is rolled forward by the next
start from what 3 recorded. A video is therefore in both tables or in
neither, and its clips are all there or none are; `videos.lance` lists
exactly the videos a resumed run skips.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import lance
import pyarrow as pa

from engine.store.lance_io import (
    FRAGMENT_SCHEMA,
    commit_append,
    create_dataset,
    remove_dataset,
    remove_orphan_files,
    transaction_properties,
    write_rows,
)
from engine.store.compaction import compact_and_retire
from engine.store.outputs import CLIPS_VERSION_PROPERTY, OutputLayout
from udfs.schema import VIDEO_SCHEMA

log = logging.getLogger(__name__)

CLIPS_VERSION = CLIPS_VERSION_PROPERTY
VIDEO_FRAGMENTS = "reelsift.video_fragments"
RUN_ID = "reelsift.run"

# How far back to look in videos.lance for the last version this protocol
# committed (other tasks may add versions of their own after it).
_SCAN_BACK = 64


class OutputStore:
    """The clip and video tables of one output, committed as described above."""

    def __init__(self, layout: OutputLayout, clip_schema: pa.Schema, storage_options: dict[str, Any] | None) -> None:
        self.layout = layout
        self.clip_schema = clip_schema
        self.storage_options = storage_options
        self.clips_version = 0
        self.videos_version = 0
        self.commits = 0
        self.fragments_since_compaction = 0

    # -- opening ------------------------------------------------------------
    def _open(self, uri: str) -> lance.LanceDataset | None:
        try:
            return lance.dataset(uri, storage_options=self.storage_options)
        except (FileNotFoundError, ValueError, OSError):
            return None

    def clips(self) -> lance.LanceDataset:
        return lance.dataset(self.layout.clips, storage_options=self.storage_options)

    def videos(self) -> lance.LanceDataset:
        return lance.dataset(self.layout.videos, storage_options=self.storage_options)

    def existing_clips(self) -> lance.LanceDataset | None:
        """The clip table already in the output, if any."""
        return self._open(self.layout.clips)

    def create(self, *, overwrite: bool, run_id: str) -> None:
        """Fresh, empty tables (replacing old ones when `overwrite`)."""
        if overwrite:
            remove_dataset(self.layout.clips)
            remove_dataset(self.layout.videos)
        self.layout.make_root()
        clips = create_dataset(self.layout.clips, self.clip_schema, self.storage_options, overwrite=overwrite,
                               properties={RUN_ID: run_id})
        self.clips_version = clips.version
        self._create_videos(overwrite=overwrite, run_id=run_id)

    def _create_videos(self, *, overwrite: bool, run_id: str) -> None:
        videos = create_dataset(self.layout.videos, VIDEO_SCHEMA, self.storage_options, overwrite=overwrite,
                                properties={RUN_ID: run_id, CLIPS_VERSION: str(self.clips_version)})
        self.videos_version = videos.version

    def reopen(self, *, run_id: str) -> int:
        """Continue an existing output: finish a commit a crash interrupted,
        remove orphaned fragment files. Returns the commits rolled forward."""
        clips = self.clips()
        self.clips_version = clips.version
        videos = self._open(self.layout.videos)
        if videos is None:  # killed between creating the two tables
            self.clips_version = 0
            self._create_videos(overwrite=False, run_id=run_id)
            self.clips_version = clips.version
            videos = self.videos()
        self.videos_version = videos.version
        rolled = self._roll_forward(clips, videos, run_id)
        removed = remove_orphan_files(self.clips()) + remove_orphan_files(self.videos())
        if removed:
            log.info("removed %d bytes of fragments no commit references", removed)
        return rolled

    def _roll_forward(self, clips: lance.LanceDataset, videos: lance.LanceDataset, run_id: str) -> int:
        recorded = self._recorded_clips_version(videos)
        rolled = 0
        for version in range(recorded + 1, clips.version + 1):
            fragments = transaction_properties(clips, version).get(VIDEO_FRAGMENTS)
            if fragments is None:
                continue
            log.warning("completing commit %d of %s: its clips were committed, its video rows were not",
                        version, self.layout.clips)
            self._commit_videos(json.loads(fragments), version, run_id)
            rolled += 1
        return rolled

    def _recorded_clips_version(self, videos: lance.LanceDataset) -> int:
        for version in range(videos.version, max(0, videos.version - _SCAN_BACK), -1):
            recorded = transaction_properties(videos, version).get(CLIPS_VERSION)
            if recorded is not None:
                return int(recorded)
        # An output from before this protocol: nothing to roll forward.
        return self.clips_version

    def done_video_ids(self) -> set[str]:
        """Videos the output already holds in full."""
        return set(self.videos().to_table(columns=["video_id"]).column("video_id").to_pylist())

    # -- committing -----------------------------------------------------------
    def commit(self, video_rows: pa.Table, clip_fragments: list[str], run_id: str) -> None:
        """Publish complete videos: their rows and all their clip fragments."""
        video_fragments = write_rows(video_rows, self.layout.videos, VIDEO_SCHEMA, self.storage_options)
        if clip_fragments:
            clips = commit_append(self.layout.clips, clip_fragments, self.clips_version, self.storage_options,
                                  properties={VIDEO_FRAGMENTS: json.dumps(video_fragments), RUN_ID: run_id})
            self.clips_version = clips.version
        self._commit_videos(video_fragments, self.clips_version, run_id)
        self.commits += 1
        self.fragments_since_compaction += len(clip_fragments) + len(video_fragments)

    def compact(self, *, target_rows: int, keep_s: float | None) -> list[dict[str, Any]]:
        """Merge both tables' small fragments and retire superseded versions,
        between two commits (never between a commit's two steps, so what
        roll-forward reads is untouched: a Rewrite records no video
        fragments). The next commits build on the compacted versions."""
        reports = [compact_and_retire(uri, target_rows=target_rows, keep_s=keep_s,
                                      storage_options=self.storage_options)
                   for uri in (self.layout.clips, self.layout.videos)]
        self.clips_version, self.videos_version = reports[0].version, reports[1].version
        self.fragments_since_compaction = 0
        return [r.as_dict() for r in reports]

    def _commit_videos(self, fragments: list[str], clips_version: int, run_id: str) -> None:
        videos = commit_append(self.layout.videos, fragments, self.videos_version, self.storage_options,
                               properties={CLIPS_VERSION: str(clips_version), RUN_ID: run_id})
        self.videos_version = videos.version

    def remove_orphans(self) -> int:
        return remove_orphan_files(self.clips()) + remove_orphan_files(self.videos())


# ------------------------------------------------------------------ progress

@dataclass
class RunTotals:
    """What this run has committed so far (for its progress display)."""

    videos: int = 0
    videos_failed: int = 0
    clips_passed: int = 0
    clips_filtered: int = 0
    clip_errors: int = 0
    seconds_in: float = 0.0
    seconds_out: float = 0.0

    def add(self, video: _Video, row: dict[str, Any]) -> None:
        self.videos += 1
        self.videos_failed += row.get("error") is not None
        self.clips_passed += video.passed
        self.clips_filtered += video.filtered
        self.clip_errors += video.errors
        self.seconds_in += float(row.get("duration_s") or 0.0) if row.get("error") is None else 0.0
        self.seconds_out += video.passed_s


@dataclass
class _Video:
    # The report's row as Python values: a one-row Arrow table per video
    # (tens of KB of buffers and metadata each) made the driver grow by
    # ~2 GB with 100,000 inputs between two commits.
    row: dict[str, Any] | None = None
    expected: set[str] | None = None
    written: set[str] = field(default_factory=set)
    fragments: list[str] = field(default_factory=list)
    errors: int = 0
    passed: int = 0
    filtered: int = 0
    passed_s: float = 0.0
    first_error: tuple[int, str] | None = None
    conflicted: bool = False


class Progress:
    """The driver's view of the videos in flight: which clips each video
    emitted (from the ledger) and which are written (from the writers).
    A video is complete when every clip it emitted is written."""

    def __init__(self) -> None:
        self.videos: dict[str, _Video] = {}
        self.committed: set[str] = set()
        self.late_fragments = 0
        self.totals = RunTotals()

    def add_written(self, table: pa.Table) -> None:
        for row in table.select(FRAGMENT_SCHEMA.names).to_pylist():
            video_id = row["video_id"]
            if video_id in self.committed:
                self.late_fragments += 1  # a retried writer's copy: left unreferenced
                continue
            video = self.videos.setdefault(video_id, _Video())
            ids = set(row["clip_ids"])
            overlap = ids & video.written
            if overlap == ids:
                self.late_fragments += 1
                continue
            if overlap:
                # Cannot publish the new rows without duplicating the others.
                log.error("video %s: fragments overlap (%d clip rows twice); it is left for a later run",
                          video_id, len(overlap))
                video.conflicted = True
            video.written |= ids
            video.fragments.extend(row["fragments"])
            video.errors += row["num_errors"]
            video.passed += row["num_passed"]
            video.filtered += row["num_filtered"]
            video.passed_s += row["passed_s"]
            if row["first_error"] is not None:
                candidate = (row["first_error_index"] if row["first_error_index"] is not None else 1 << 30,
                             row["first_error"])
                if video.first_error is None or candidate < video.first_error:
                    video.first_error = candidate

    def add_reports(self, reports: list[tuple[pa.Table, list[str]]]) -> None:
        for row, clip_ids in reports:
            video_id = row.column("video_id")[0].as_py()
            if video_id in self.committed:
                continue
            video = self.videos.setdefault(video_id, _Video())
            video.row = row.to_pylist()[0]
            video.expected = set(clip_ids)

    def complete(self) -> list[str]:
        """Videos ready to commit: every clip they emitted is written."""
        return [video_id for video_id, video in self.videos.items()
                if video.row is not None and not video.conflicted and video.expected is not None
                and video.expected <= video.written]

    def incomplete(self) -> list[str]:
        """At the end of the stream: videos that will not complete in this run
        (a block a stage dropped, see `ray.max_errored_blocks`). They stay
        uncommitted, so the next run redoes them."""
        return list(self.videos)

    def take(self, video_ids: list[str]) -> tuple[pa.Table, list[str], int]:
        """(video rows with their clip counts, clip fragments, clip rows) of
        `video_ids`, which leave the in-flight set."""
        rows, fragments, clip_rows = [], [], 0
        for video_id in video_ids:
            video = self.videos.pop(video_id)
            self.committed.add(video_id)
            fragments.extend(video.fragments)
            clip_rows += len(video.written)
            rows.append(_video_row(video))
            self.totals.add(video, rows[-1])
        return pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA), fragments, clip_rows


def _video_row(video: _Video) -> dict[str, Any]:
    """The video's row for the video table: clip counts, and for a video whose
    clips all failed, the first clip error as its own."""
    assert video.row is not None
    row = dict(video.row)
    ok = len(video.written) - video.errors
    row["num_clips"] = ok
    row["num_clip_errors"] = video.errors
    if row.get("error") is None and ok == 0 and video.first_error is not None:
        row["error"] = video.first_error[1]
    return row


@dataclass
class CommitPolicy:
    """When to commit: as soon as the first video is complete (readers see
    output within seconds), then every `every_s` seconds or `every_rows` clip
    rows, whichever comes first; with neither, only at the end."""

    every_s: float | None = 60.0
    every_rows: int | None = None
    last: float | None = None

    def due(self, ready_videos: int, ready_rows: int, now: float | None = None) -> bool:
        if not ready_videos:
            return False
        now = time.monotonic() if now is None else now
        if self.every_rows and ready_rows >= self.every_rows:
            return True
        if not self.every_s:
            return False
        return self.last is None or now - self.last >= self.every_s

    def committed(self, now: float | None = None) -> None:
        self.last = time.monotonic() if now is None else now


def ready_rows(progress: Progress, video_ids: list[str]) -> int:
    return sum(len(progress.videos[v].written) for v in video_ids)
