"""The keep/drop decision shared by all filter stages.

Filtered clips are never deleted: they keep their row with `passed=false`
and a `filter_reason`. Several filters may run (motion, aesthetic, ...);
each one ANDs its verdict into `passed` and appends its reason, so the final
reason lists every filter a clip failed, separated by "; ".

Rows whose `error` is set get `passed = null`: they were never judged. The
curated view is therefore `passed AND error IS NULL`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from udfs.schema import CLIP_FILTER_FIELDS

REASON_SEPARATOR = "; "

_PASSED_TYPE = CLIP_FILTER_FIELDS[0].type
_REASON_TYPE = CLIP_FILTER_FIELDS[1].type


def row_errors(table: pa.Table) -> list[str | None]:
    if "error" not in table.column_names:
        return [None] * table.num_rows
    return table.column("error").to_pylist()


def ensure_filter_columns(table: pa.Table) -> pa.Table:
    """Add `passed` (true for good rows, null for failed ones) and an empty
    `filter_reason` when no filter stage has added them yet."""
    if "passed" in table.column_names:
        return table
    passed = [True if err is None else None for err in row_errors(table)]
    table = table.append_column(CLIP_FILTER_FIELDS[0], pa.array(passed, _PASSED_TYPE))
    return table.append_column(CLIP_FILTER_FIELDS[1], pa.nulls(table.num_rows, _REASON_TYPE))


def finalize_filter_columns(table: pa.Table) -> pa.Table:
    """The last step before writing: filter columns present, and `passed`
    null wherever a stage after the filters recorded an error."""
    table = ensure_filter_columns(table)
    errors = row_errors(table)
    if all(e is None for e in errors):
        return table
    passed = [None if e is not None else p for e, p in zip(errors, table.column("passed").to_pylist())]
    return table.set_column(table.column_names.index("passed"), CLIP_FILTER_FIELDS[0], pa.array(passed, _PASSED_TYPE))


def set_errors(table: pa.Table, errors: Sequence[str | None]) -> pa.Table:
    """Record per-row errors, keeping an earlier error where one exists."""
    merged = [old if old is not None else new for old, new in zip(row_errors(table), errors)]
    column = pa.array(merged, pa.string())
    if "error" in table.column_names:
        return table.set_column(table.column_names.index("error"), "error", column)
    return table.append_column("error", column)


def apply_filter(table: pa.Table, reasons: Sequence[str | None]) -> pa.Table:
    """Merge one filter's verdicts into `passed`/`filter_reason`.

    `reasons[i]` is None when row i passes this filter, else why it failed.
    Rows with `error` set are left with passed=null whatever the reason.
    """
    if len(reasons) != table.num_rows:
        raise ValueError(f"{len(reasons)} verdicts for {table.num_rows} rows")
    table = ensure_filter_columns(table)
    errors = row_errors(table)
    passed = table.column("passed").to_pylist()
    merged = table.column("filter_reason").to_pylist()
    for i, reason in enumerate(reasons):
        if errors[i] is not None or reason is None:
            continue
        passed[i] = False
        merged[i] = reason if merged[i] is None else merged[i] + REASON_SEPARATOR + reason
    table = table.set_column(table.column_names.index("passed"), CLIP_FILTER_FIELDS[0], pa.array(passed, _PASSED_TYPE))
    return table.set_column(
        table.column_names.index("filter_reason"), CLIP_FILTER_FIELDS[1], pa.array(merged, _REASON_TYPE)
    )
