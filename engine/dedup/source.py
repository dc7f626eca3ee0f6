"""The table task=dedup reads, pinned at the version it was opened at, and
what identifies its data apart from dedup's own columns."""

from __future__ import annotations

from typing import Any

import lance
import numpy as np
from omegaconf import DictConfig

from engine.store import outputs
from engine.store.lance_columns import base_signature
from engine.store.views import CURATED
from udfs.schema import CLIP_DEDUP_FIELDS

DEDUP_COLUMNS = [f.name for f in CLIP_DEDUP_FIELDS]


class DedupSource:
    """The table dedup reads, pinned at the version it was opened at."""

    def __init__(self, cfg: DictConfig, layout: outputs.OutputLayout, lance_options: dict[str, str] | None) -> None:
        dcfg = cfg.dedup
        self.storage_options = lance_options
        if dcfg.get("table"):
            self.uri = str(dcfg.table)
            try:
                self.dataset = lance.dataset(self.uri, storage_options=lance_options)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise FileNotFoundError(f"dedup.table: no Lance dataset at {self.uri} ({type(exc).__name__}: {exc})")
        else:
            self.uri = layout.clips
            self.dataset = layout.open_clips(lance_options)
        self.version = self.dataset.version
        self.id_column = str(dcfg.id_column)
        self.vector_column = str(dcfg.vector_column)
        names = self.dataset.schema.names
        if self.vector_column not in names:
            hint = ("run curate with embed=clip (or embed=cosmos_embed1)" if not dcfg.get("table")
                    else "set dedup.vector_column")
            raise ValueError(f"{self.uri} has no embedding column {self.vector_column!r} (columns: {names}): {hint}")
        if self.id_column not in names:
            raise ValueError(f"{self.uri} has no id column {self.id_column!r} (columns: {names}): set dedup.id_column")
        from udfs.dedup.vectors import check_vector_type, vector_dim

        vtype = self.dataset.schema.field(self.vector_column).type
        try:
            check_vector_type(vtype)
        except TypeError as exc:
            raise ValueError(f"{self.uri}: column {self.vector_column!r}: {exc}") from None
        self.fixed_dim = vector_dim(vtype)
        self.where = self._where(dcfg.get("where"))
        self.total_rows = self.dataset.count_rows()

    def _where(self, where: str | None) -> str | None:
        if where:
            return str(where)
        names = self.dataset.schema.names
        return CURATED if {"passed", "error"} <= set(names) else None

    def matching_row_ids(self, extra: str | None = None) -> np.ndarray:
        """`_rowid` of every row `where` (and `extra`) selects (scalar columns only)."""
        where = " AND ".join(f"({w})" for w in (self.where, extra) if w) or None
        try:
            table = self.dataset.to_table(columns=[], filter=where, with_row_id=True)
        except Exception as exc:  # noqa: BLE001 - Lance's SQL errors come in several types
            raise ValueError(f"dedup.where={self.where!r} is not a valid filter on {self.uri}: {exc}") from exc
        return table.column("_rowid").to_numpy()

    def signature(self) -> list[Any]:
        return base_signature(self.dataset, DEDUP_COLUMNS)
