"""Writing dedup's columns into only some fragments of the table, for an
incremental run: the fragments that hold a new row or a row whose values
changed get a new data file for those columns; every other fragment keeps
its files. One `DataReplacement` commit, as engine.store.lance_columns makes
for a whole table (whose file layout this follows)."""

from __future__ import annotations

import os
import uuid

import lance
import numpy as np
import pyarrow as pa
from lance.file import LanceFileWriter
from lance.fragment import DataFile

from udfs.uris import scheme_of


def replace_in_fragments(dataset: lance.LanceDataset, values: pa.Table, fields: list[pa.Field], fragments: set[int],
                         storage_options: dict[str, str] | None = None) -> lance.LanceDataset:
    """`fields` of `values` (keyed by `_rowaddr`; every row of the listed
    `fragments` that has values must be in it, the others get nulls) written
    into `fragments` of `dataset` as one new version."""
    if not fragments:
        return dataset
    version = dataset.data_storage_version
    major, minor = (int(p) for p in version.split(".")[:2])
    field_ids = {f.name(): f.id() for f in dataset.lance_schema.fields()}
    ids = [field_ids[f.name] for f in fields]
    file_schema = pa.schema([pa.field(f.name, dataset.schema.field(f.name).type) for f in fields])
    data = pa.Table.from_arrays([values.column(f.name).cast(file_schema.field(f.name).type) for f in fields],
                                schema=file_schema)
    addr = values.column("_rowaddr").to_numpy().astype(np.uint64)
    frag_of = (addr >> np.uint64(32)).astype(np.int64)
    offset = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
    groups, written = [], []
    try:
        for fragment in dataset.get_fragments():
            fid = fragment.fragment_id
            if fid not in fragments:
                continue
            mine = np.flatnonzero(frag_of == fid)
            index = np.full(fragment.physical_rows, -1, dtype=np.int64)
            index[offset[mine]] = mine
            name = f"{uuid.uuid4().hex}.lance"
            path = f"{dataset.uri.rstrip('/')}/data/{name}" if scheme_of(dataset.uri) else os.path.join(
                dataset.uri, "data", name)
            with LanceFileWriter(path, file_schema, version=version, storage_options=storage_options) as writer:
                writer.write_batch(data.take(pa.array(index, mask=index < 0)))
            written.append(path)
            groups.append(lance.LanceOperation.DataReplacementGroup(
                fid, DataFile(name, ids, list(range(len(ids))), major, minor)))
        lance.LanceDataset.commit(dataset.uri, lance.LanceOperation.DataReplacement(groups),
                                  read_version=dataset.version, storage_options=storage_options)
    except BaseException:
        for path in written:
            if not scheme_of(path):
                try:
                    os.remove(path)
                except OSError:
                    pass
        raise
    return lance.dataset(dataset.uri, storage_options=storage_options)
