"""Reading Lance rows by row id (`_rowid`), the one private Lance API we use.

Lance's public `take` reads by offset, which changes when rows are deleted
or a table is compacted; dedup, the index's recall sample and the training
loader hold row ids (stable across versions of one table), and only the
private `_take_rows` reads by those. It lives behind this function, and
tests/test_private_apis.py fails when a pylance upgrade moves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa


class PrivateApiChanged(RuntimeError):
    """A private API of a dependency is not where this version of reelsift expects it."""


def take_rows(dataset: Any, row_ids: Sequence[int], columns: Sequence[str]) -> pa.Table:
    """The `columns` of the rows `row_ids` of a `lance.LanceDataset`, in the order given."""
    take = getattr(dataset, "_take_rows", None)
    if take is None:
        import lance

        raise PrivateApiChanged(f"pylance {lance.__version__} has no LanceDataset._take_rows; "
                                "udfs/lance_rows.py must move to its replacement")
    return take([int(i) for i in row_ids], columns=list(columns))
