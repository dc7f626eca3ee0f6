"""Writing computed columns back into an existing Lance table, in one new
version, without rewriting the columns already there (media blobs included).

- Columns the table lacks are added with Lance's merge on `_rowid`: each
  fragment gets a new data file holding only the new columns.
- Columns the table already has are replaced with a `DataReplacement`
  commit: each fragment gets a new data file holding only those columns,
  and the old files stop serving them. Replacing one column (`duplicate`)
  rewrites that column alone.

Rows absent from the values get nulls. Either way it is a single commit: a
failure before it leaves the table exactly as it was.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import lance
import numpy as np
import pyarrow as pa
from lance.file import LanceFileWriter
from lance.fragment import DataFile

from udfs.uris import scheme_of

log = logging.getLogger(__name__)


def write_columns(dataset: lance.LanceDataset, values: pa.Table, fields: list[pa.Field],
                  storage_options: dict[str, str] | None = None) -> lance.LanceDataset:
    """`fields` of `values` (keyed by its `_rowid` and `_rowaddr` columns)
    written into `dataset` as one new version; returns the new version."""
    names = [f.name for f in fields]
    present = [n for n in names if n in dataset.schema.names]
    if not present:
        return add_columns(dataset, values, fields, storage_options)
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise ValueError(f"{dataset.uri} has some of the columns {names} but not {missing}: drop the others first "
                         f"(lance.dataset(...).drop_columns({present}))")
    return replace_columns(dataset, values, fields, storage_options)


def add_columns(dataset: lance.LanceDataset, values: pa.Table, fields: list[pa.Field],
                storage_options: dict[str, str] | None = None) -> lance.LanceDataset:
    schema = pa.schema([pa.field("_rowid", pa.uint64()), *fields])
    table = pa.Table.from_arrays([values.column("_rowid").cast(pa.uint64()),
                                  *(values.column(f.name).cast(f.type) for f in fields)], schema=schema)
    dataset.merge(table, left_on="_rowid", right_on="_rowid")
    return lance.dataset(dataset.uri, storage_options=storage_options)


def replace_columns(dataset: lance.LanceDataset, values: pa.Table, fields: list[pa.Field],
                    storage_options: dict[str, str] | None = None) -> lance.LanceDataset:
    """Replace existing columns `fields` with `values`, fragment by fragment."""
    version = dataset.data_storage_version
    if version.startswith("0."):
        raise ValueError(f"{dataset.uri} uses the legacy Lance file format {version}; replacing columns needs "
                         "format 2.x (rewrite the table with data_storage_version='stable')")
    major, minor = (int(p) for p in version.split(".")[:2])
    field_ids = {f.name(): f.id() for f in dataset.lance_schema.fields()}
    ids = [field_ids[f.name] for f in fields]
    file_schema = pa.schema([pa.field(f.name, dataset.schema.field(f.name).type) for f in fields])
    data = pa.Table.from_arrays([values.column(f.name).cast(file_schema.field(f.name).type) for f in fields],
                                schema=file_schema)
    addr = values.column("_rowaddr").to_numpy().astype(np.uint64)
    frag_of = (addr >> np.uint64(32)).astype(np.int64)
    offset = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
    groups = []
    written: list[str] = []
    try:
        for fragment in dataset.get_fragments():
            fid = fragment.fragment_id
            n = fragment.physical_rows
            mine = np.flatnonzero(frag_of == fid)
            # Physical positions (deleted rows included) -> row of `data`, or null.
            index = np.full(n, -1, dtype=np.int64)
            index[offset[mine]] = mine
            taken = data.take(pa.array(index, mask=index < 0))
            name = f"{uuid.uuid4().hex}.lance"
            path = _data_path(dataset.uri, name)
            with LanceFileWriter(path, file_schema, version=version, storage_options=storage_options) as writer:
                writer.write_batch(taken)
            written.append(path)
            groups.append(lance.LanceOperation.DataReplacementGroup(
                fid, DataFile(name, ids, list(range(len(ids))), major, minor)))
        lance.LanceDataset.commit(dataset.uri, lance.LanceOperation.DataReplacement(groups),
                                  read_version=dataset.version, storage_options=storage_options)
    except BaseException:
        _remove_local(written)
        raise
    return lance.dataset(dataset.uri, storage_options=storage_options)


def _data_path(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/data/{name}" if scheme_of(uri) else os.path.join(uri, "data", name)


def _remove_local(paths: list[str]) -> None:
    """Best effort: files of a commit that never happened (Lance's cleanup
    removes unreferenced files on object stores)."""
    for path in paths:
        if not scheme_of(path):
            try:
                os.remove(path)
            except OSError:
                pass


def base_signature(dataset: lance.LanceDataset, own_columns: list[str]) -> list[Any]:
    """What identifies the table's data apart from `own_columns`: per
    fragment, its rows, deletions and the data files of every other column.
    Equal signatures mean a reader of those columns sees the same rows."""
    field_ids = {f.name(): f.id() for f in dataset.lance_schema.fields()}
    own = {field_ids[n] for n in own_columns if n in field_ids}
    sig = []
    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        deletion = meta.deletion_file
        files = sorted(f.path for f in fragment.data_files() if any(i >= 0 and i not in own for i in f.fields))
        sig.append([fragment.fragment_id, fragment.physical_rows,
                    None if deletion is None else [deletion.id, deletion.num_deleted_rows], files])
    return sig
