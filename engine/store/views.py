"""Named views of the clip table, as Lance filters.

The curated view is what loaders and exports read by default: clips that
passed every filter, encoded without error, and (once dedup has run) are not
marked duplicates. Building the filter from the table's own schema keeps it
valid on tables written before a column existed.
"""

from __future__ import annotations

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


def resolve_where(where: str | None, schema: pa.Schema) -> str | None:
    """The filter a reader applies: `where` as given, the curated view when
    None, no filter at all for `"all"`."""
    if where is None:
        return curated_filter(schema)
    if where.strip().lower() in ("all", "true", ""):
        return None
    return where
