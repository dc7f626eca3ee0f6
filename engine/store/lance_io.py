"""Distributed Lance writes from Ray Data, and the commits that publish them.

Workers write fragments straight into the dataset's storage and return only
their metadata; the driver publishes them with `commit_append`, whose
transaction can carry properties (what the commit covers), stored with the
commit itself. Clip bytes never pass through the driver. Fragment files that
no commit references (a run killed before its commit, a retried writer) are
invisible to readers and removed by `remove_orphan_files`.
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from udfs.schema import conform
from udfs.uris import scheme_of

# One row per (writer batch, video): a fragment never mixes videos, so a
# video's clips can be committed as soon as that video is complete.
FRAGMENT_SCHEMA = pa.schema([
    pa.field("video_id", pa.string()),
    pa.field("fragments", pa.list_(pa.string())),
    pa.field("clip_ids", pa.list_(pa.string())),
    pa.field("num_errors", pa.int64()),
    # The error of the group's lowest-index failed clip (for the video row).
    pa.field("first_error_index", pa.int64()),
    pa.field("first_error", pa.string()),
    # For the run's progress: clips kept / filtered out, and the kept seconds.
    pa.field("num_passed", pa.int64()),
    pa.field("num_filtered", pa.int64()),
    pa.field("passed_s", pa.float64()),
])


class FragmentWriter:
    """Ray Data UDF: write each batch as Lance fragments of the dataset made
    by `create_dataset`, one per video in the batch; emit their metadata."""

    def __init__(self, *, uri: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.schema = schema
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return FRAGMENT_SCHEMA.empty_table()
        batch = conform(batch, self.schema)
        rows = []
        for video_id in pc.unique(batch.column("video_id")).to_pylist():
            part = batch.filter(pc.equal(batch.column("video_id"), video_id))
            fragments = write_fragments(part, self.uri, schema=self.schema, storage_options=self.storage_options)
            errors = part.filter(pc.is_valid(part.column("error")))
            first = (errors.sort_by("clip_index").slice(0, 1).to_pylist() or [{}])[0]
            passed = pc.fill_null(part.column("passed"), False) if "passed" in part.column_names else None
            kept = part.filter(passed) if passed is not None else part.slice(0, 0)
            seconds = pc.sum(pc.subtract(kept.column("end_s"), kept.column("start_s"))).as_py() if kept.num_rows else 0.0
            rows.append({
                "video_id": video_id,
                "fragments": [json.dumps(f.to_json()) for f in fragments],
                "clip_ids": part.column("clip_id").to_pylist(),
                "num_errors": errors.num_rows,
                "first_error_index": first.get("clip_index"),
                "first_error": first.get("error"),
                "num_passed": kept.num_rows,
                "num_filtered": part.num_rows - errors.num_rows - kept.num_rows,
                "passed_s": float(seconds or 0.0),
            })
        return pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)


def create_dataset(uri: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None, *,
                   overwrite: bool = False, properties: dict[str, str] | None = None) -> lance.LanceDataset:
    """The dataset's first version, empty: it fixes Lance's canonical schema
    (blob columns get sub-field ids) that every worker's fragments then use.
    On object stores, where old datasets are not deleted first, `overwrite`
    starts a new, empty version instead of failing on the existing one."""
    return lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="overwrite" if overwrite else "create",
                               storage_options=storage_options, transaction_properties=properties or {})


def write_rows(table: pa.Table, uri: str, schema: pa.Schema,
               storage_options: dict[str, Any] | None = None) -> list[str]:
    """Small tables written from the driver as uncommitted fragments of `uri`
    (their metadata, as JSON); published by a later `commit_append`."""
    fragments = write_fragments(conform(table, schema), uri, schema=schema, storage_options=storage_options)
    return [json.dumps(f.to_json()) for f in fragments]


def commit_append(uri: str, fragments: list[str], read_version: int, storage_options: dict[str, Any] | None = None,
                  properties: dict[str, str] | None = None) -> lance.LanceDataset:
    """Append fragments (JSON metadata) to the dataset in one commit whose
    transaction records `properties`."""
    transaction = lance.Transaction(
        read_version=read_version,
        operation=lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in fragments]),
        transaction_properties=dict(properties or {}),
    )
    return lance.LanceDataset.commit(uri, transaction, storage_options=storage_options)


def transaction_properties(dataset: lance.LanceDataset, version: int) -> dict[str, str]:
    """The properties the commit of `version` recorded ({} when none, or
    when the version was retired: engine.store.compaction)."""
    try:
        transaction = dataset.read_transaction(version)
    except OSError as exc:
        if "not found" in str(exc).lower():
            return {}
        raise
    return dict(transaction.transaction_properties or {}) if transaction is not None else {}


def remove_orphan_files(dataset: lance.LanceDataset) -> int:
    """Delete data files no version references; keep every version. Only
    safe while no other writer is between writing fragments and committing
    them (one curate run per output at a time). Returns the bytes removed."""
    stats = dataset.cleanup_old_versions(older_than=timedelta(days=365 * 100), delete_unverified=True,
                                         error_if_tagged_old_versions=False)
    return int(stats.bytes_removed)


def write_table(table: pa.Table, uri: str, schema: pa.Schema,
                storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
    """Small tables written from the driver in one go."""
    return lance.write_dataset(conform(table, schema), uri, schema=schema, mode="overwrite",
                               storage_options=storage_options)


def remove_dataset(uri: str) -> None:
    """Delete a local dataset directory (a re-run with overwrite=true).

    Overwrite commits keep old versions' files; a re-run should not grow the
    directory, so the old dataset goes first."""
    if not scheme_of(uri):
        shutil.rmtree(uri, ignore_errors=True)


def read_blob_bytes(dataset: lance.LanceDataset, column: str, row_ids: list[int]) -> list[bytes | None]:
    """Blob payloads for `row_ids`, in that order (None for null blobs)."""
    found = dict(dataset.read_blobs(column, ids=row_ids))
    return [found.get(i) for i in row_ids]
