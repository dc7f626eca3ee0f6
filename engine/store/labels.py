"""A person's decisions about clips: `labels.lance`, beside the clip table.

Each accept, reject, clear, tag or untag is one appended row (clip_id, label,
tag, note, time): the table is a log, never rewritten in place, so two writers
cannot lose each other's rows and every decision keeps its time. A clip's
state is read from the log: its latest accept/reject/clear decides its label
(clear: none), its tags are those added and not removed since, its note the
latest one given.

The clip table is never written: a re-run of curate, dedup or index rewrites
`clips.lance` and leaves this table alone, and `clip_id` is a function of the
source and the span (`udfs.schema.clip_id_for`), so a label still finds its
clip after a re-run or a resumed curate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LABELS_TABLE = "labels.lance"
KINDS = ("accept", "reject", "clear", "tag", "untag")
# The decisions that set a clip's label; tag/untag leave it as it is.
DECISIONS = ("accept", "reject", "clear")
SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("tag", pa.string()),
    pa.field("note", pa.string()),
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
])
# Every append is a fragment; past this many they are merged, so reading the
# log stays one small scan however long a person labels.
COMPACT_AFTER_FRAGMENTS = 64


def labels_uri(table_uri: str) -> str:
    """Where the labels of the clip table at `table_uri` live: `labels.lance`
    in the same folder (OUT/clips.lance -> OUT/labels.lance)."""
    root = str(table_uri).rstrip("/")
    parent = root.rsplit("/", 1)[0] if "/" in root else "."
    return f"{parent}/{LABELS_TABLE}"


class LabelStore:
    """The labels beside one clip table. Thread-safe for one process's writers."""

    def __init__(self, table_uri: str, storage_options: dict[str, Any] | None) -> None:
        self.uri = labels_uri(table_uri)
        self.storage_options = storage_options  # Lance's form
        self._lock = threading.Lock()
        self._cache: tuple[int, pa.Table] | None = None

    def _open(self) -> lance.LanceDataset | None:
        try:
            return lance.dataset(self.uri, storage_options=self.storage_options)
        except (FileNotFoundError, ValueError, OSError):
            return None

    def log(self) -> pa.Table:
        """Every decision, in the order written."""
        ds = self._open()
        if ds is None:
            return SCHEMA.empty_table()
        with self._lock:
            if self._cache is not None and self._cache[0] == ds.version:
                return self._cache[1]
        table = ds.to_table()
        with self._lock:
            self._cache = (ds.version, table)
        return table

    def append(self, clip_ids: Sequence[str], label: str, *, tag: str | None = None,
               note: str | None = None) -> int:
        """Record `label` for every clip in `clip_ids` (one commit); the rows written."""
        if label not in KINDS:
            raise ValueError(f"unknown label {label!r}; choose one of {KINDS}")
        if label in ("tag", "untag") and not tag:
            raise ValueError(f"label={label!r} needs a tag")
        if not clip_ids:
            return 0
        now = datetime.now(timezone.utc)
        n = len(clip_ids)
        rows = pa.table({"clip_id": pa.array(list(clip_ids), pa.string()), "label": pa.array([label] * n),
                         "tag": pa.array([tag] * n, pa.string()), "note": pa.array([note] * n, pa.string()),
                         "time": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}, schema=SCHEMA)
        with self._lock:
            ds = self._open()
            if ds is None:
                ds = lance.write_dataset(rows, self.uri, schema=SCHEMA, mode="create",
                                         storage_options=self.storage_options)
            else:
                ds = lance.write_dataset(rows, self.uri, schema=SCHEMA, mode="append",
                                         storage_options=self.storage_options)
                if len(ds.get_fragments()) > COMPACT_AFTER_FRAGMENTS:
                    ds.optimize.compact_files()
            self._cache = None
        return n

    def state(self) -> pa.Table:
        """One row per labelled clip: clip_id, label (accept | reject | null),
        tags (list), note (latest given), time (latest decision)."""
        return label_state(self.log())

    def rejected(self) -> list[str]:
        """The clips whose current label is reject."""
        return rejected_ids(self.log())


def label_state(log: pa.Table) -> pa.Table:
    """The current state per clip of a label log (see `LabelStore.state`)."""
    ids = log.column("clip_id").to_pylist()
    kinds = log.column("label").to_pylist()
    tags_col = log.column("tag").to_pylist()
    notes = log.column("note").to_pylist()
    times = log.column("time").to_pylist()
    state: dict[str, dict[str, Any]] = {}
    for clip_id, kind, tag, note, time in zip(ids, kinds, tags_col, notes, times):
        s = state.setdefault(clip_id, {"clip_id": clip_id, "label": None, "tags": {}, "note": None, "time": time})
        s["time"] = time
        if kind in DECISIONS:
            s["label"] = None if kind == "clear" else kind
        elif kind == "tag":
            s["tags"][tag] = True
        elif kind == "untag":
            s["tags"].pop(tag, None)
        if note:
            s["note"] = note
    rows = [{**s, "tags": list(s["tags"])} for s in state.values()]
    return pa.table({"clip_id": pa.array([r["clip_id"] for r in rows], pa.string()),
                     "label": pa.array([r["label"] for r in rows], pa.string()),
                     "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),
                     "note": pa.array([r["note"] for r in rows], pa.string()),
                     "time": pa.array([r["time"] for r in rows], pa.timestamp("us", tz="UTC"))})


def rejected_ids(log: pa.Table) -> list[str]:
    """Clips whose latest accept/reject/clear in `log` is a reject."""
    decided = log.filter(pc.is_in(log.column("label"), pa.array(DECISIONS)))
    if not decided.num_rows:
        return []
    ids = decided.column("clip_id").to_numpy(zero_copy_only=False)
    kinds = decided.column("label").to_numpy(zero_copy_only=False)
    # The last occurrence of each id: unique over the reversed log.
    _, last = np.unique(ids[::-1], return_index=True)
    last = len(ids) - 1 - last
    return sorted(str(i) for i, k in zip(ids[last], kinds[last]) if k == "reject")


def rejected_for(table_uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    """The rejected clips of the clip table at `table_uri` (none without a labels table)."""
    return LabelStore(table_uri, storage_options).rejected()


def unknown_ids(clip_ids: Iterable[str], known: pa.Array | pa.ChunkedArray) -> list[str]:
    """Those of `clip_ids` not in `known`."""
    wanted = pa.array(list(clip_ids), pa.string())
    found = pc.is_in(wanted, value_set=known)
    return [c for c, ok in zip(wanted.to_pylist(), found.to_pylist()) if not ok]
