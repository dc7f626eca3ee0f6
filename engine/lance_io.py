"""Distributed Lance writes from Ray Data.

Workers write fragments straight into the dataset's storage and return only
their metadata; the driver commits them in one transaction. Clip bytes never
pass through the driver, and a failed run leaves no half-committed table.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import lance
import pyarrow as pa
from lance.fragment import FragmentMetadata, write_fragments

from engine.schema import conform
from engine.uris import scheme_of

FRAGMENT_SCHEMA = pa.schema([pa.field("fragment", pa.string()), pa.field("num_rows", pa.int64())])


class FragmentWriter:
    """Ray Data UDF: write each batch as Lance fragment(s) of the dataset
    made by `create_empty`; emit their metadata."""

    def __init__(self, *, uri: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.schema = schema
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return FRAGMENT_SCHEMA.empty_table()
        batch = conform(batch, self.schema)
        fragments = write_fragments(batch, self.uri, schema=self.schema, storage_options=self.storage_options)
        return pa.table(
            {
                "fragment": [json.dumps(f.to_json()) for f in fragments],
                "num_rows": [f.num_rows for f in fragments],
            },
            schema=FRAGMENT_SCHEMA,
        )


def create_empty(uri: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None, *,
                 overwrite: bool = False) -> lance.LanceDataset:
    """The dataset's first version, empty: it fixes Lance's canonical schema
    (blob columns get sub-field ids) that every worker's fragments then use.
    On object stores, where old datasets are not deleted first, `overwrite`
    starts a new, empty version instead of failing on the existing one."""
    return lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="overwrite" if overwrite else "create",
                               storage_options=storage_options)


def commit_fragments(uri: str, fragments: list[str], read_version: int,
                     storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
    """Append the workers' fragments to the dataset in one commit."""
    metas = [FragmentMetadata.from_json(f) for f in fragments]
    return lance.LanceDataset.commit(uri, lance.LanceOperation.Append(metas), read_version=read_version,
                                     storage_options=storage_options)


def write_table(table: pa.Table, uri: str, schema: pa.Schema,
                storage_options: dict[str, Any] | None = None) -> lance.LanceDataset:
    """Small tables written from the driver (the video table)."""
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
