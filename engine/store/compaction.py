"""Keeping an output's tables fast: compacting fragments, retiring versions.

A curate commit adds fragments (one per video and writer batch) and a
version to each table; a million videos would leave a million fragments,
and every scan, UI page and index build pays per fragment. Lance's own
compaction rewrites them into fragments of `target_rows` rows in one
`Rewrite` commit, which readers of older versions never see and which keeps
the rows (and remaps the indexes). Only their `_rowid`s change, and a reader
holds those only with its version pinned.

Versions are retired once superseded for longer than `keep_s`: a reader
that opened a version within that window opened it while it was the latest
or since, so its successor is younger than the window and it is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import lance

log = logging.getLogger(__name__)


@dataclass
class CompactionReport:
    table: str
    fragments_before: int
    fragments_after: int
    version: int
    versions_removed: int = 0
    bytes_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compact_table(dataset: lance.LanceDataset, *, target_rows: int,
                  storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
    """`dataset` with its small fragments merged (a new version), or as it
    is when there is nothing to merge."""
    if len(dataset.get_fragments()) <= 1:
        return dataset
    dataset.optimize.compact_files(target_rows_per_fragment=int(target_rows), materialize_deletions=True)
    return lance.dataset(dataset.uri, storage_options=storage_options)


def retire_versions(dataset: lance.LanceDataset, *, keep_s: float, now: float | None = None) -> tuple[int, int]:
    """Delete the versions superseded more than `keep_s` seconds ago;
    (versions, bytes) removed. The latest version and tagged ones stay."""
    now = time.time() if now is None else now
    versions = sorted(dataset.versions(), key=lambda v: v["version"])
    old = [v["version"] for v, successor in zip(versions, versions[1:])
           if now - successor["timestamp"].timestamp() > keep_s]
    if not old:
        return 0, 0
    stats = dataset.cleanup_old_versions(versions=old, error_if_tagged_old_versions=False)
    return int(stats.old_versions), int(stats.bytes_removed)


def compact_and_retire(uri: str, *, target_rows: int, keep_s: float | None,
                       storage_options: dict[str, Any] | None = None) -> CompactionReport:
    dataset = lance.dataset(uri, storage_options=storage_options)
    before = len(dataset.get_fragments())
    dataset = compact_table(dataset, target_rows=target_rows, storage_options=storage_options)
    report = CompactionReport(uri, before, len(dataset.get_fragments()), dataset.version)
    if keep_s is not None:
        report.versions_removed, report.bytes_removed = retire_versions(dataset, keep_s=float(keep_s))
    if before != report.fragments_after or report.versions_removed:
        log.info("compacted %s: %d -> %d fragments, %d old versions removed", uri, before, report.fragments_after,
                 report.versions_removed)
    return report

