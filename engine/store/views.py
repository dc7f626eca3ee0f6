"""Named views of the clip table, as Lance filters.

The curated view is what loaders and exports read by default: clips that
passed every filter, encoded without error, (once dedup has run) are not
marked duplicates, and that no one rejected in the UI (`labels.lance`,
engine/store/labels.py). Building the filter from the table's own schema
keeps it valid on tables written before a column existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

CURATED = "passed AND error IS NULL"
# Added by the dedup task; absent on tables it has not run on.
DUPLICATE_COLUMN = "duplicate"


def curated_filter(schema: pa.Schema) -> str:
    """`passed AND error IS NULL`, plus `duplicate IS NOT TRUE` when the
    table has dedup's column."""
    if DUPLICATE_COLUMN in schema.names:
        return f"{CURATED} AND {DUPLICATE_COLUMN} IS NOT TRUE"
    return CURATED


def resolve_where(where: str | None, schema: pa.Schema, rejected: Sequence[str] = ()) -> str | None:
    """The filter a reader applies: `where` as given, the curated view when
    None, no filter at all for `"all"`; in each case without the `rejected`
    clips."""
    if where is None:
        base: str | None = curated_filter(schema)
    elif where.strip().lower() in ("all", "true", ""):
        base = None
    else:
        base = where
    return without_clips(base, rejected)


def without_clips(where: str | None, clip_ids: Sequence[str], column: str = "clip_id") -> str | None:
    """`where` AND the row's `column` is none of `clip_ids`."""
    if not clip_ids:
        return where
    listed = ", ".join("'" + str(c).replace("'", "''") + "'" for c in clip_ids)
    clause = f"{column} NOT IN ({listed})"
    return clause if where is None else f"({where}) AND {clause}"


def reader_where(where: str | None, schema: pa.Schema, table_uri: str, storage_options: dict[str, Any] | None,
                 include_rejected: bool) -> str | None:
    """`resolve_where` with the rejected clips of the table at `table_uri`
    left out unless `include_rejected`; `storage_options` in Lance's form."""
    from engine.store.labels import rejected_for

    rejected = () if include_rejected or "clip_id" not in schema.names else rejected_for(table_uri, storage_options)
    return resolve_where(where, schema, rejected)
