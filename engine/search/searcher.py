"""Retrieval over a curated clip table.

    import engine.search
    searcher = engine.search.open("out")            # an output folder or a .lance table
    searcher.search(text="a red car at night", where="passed AND duplicate IS NOT TRUE", k=10)
    searcher.search(clip_id="5f0c...")                # more like this clip
    searcher.search(image="frame.jpg")                # or an (H, W, 3) uint8 array
    searcher.search(video="query.mp4")
    searcher.search(vector=np.ones(512))
    searcher.search(text="red car", mode="fts")       # BM25 over captions; "hybrid": both, fused

Every search returns a `pyarrow.Table` with `clip_id`, `score`, `source_uri`,
`start_s`, `end_s`, `caption` (null where the table has no such column) and
the extra `columns` asked for, best first. `score` is the cosine similarity
for vector searches, BM25 for full-text search and the reciprocal-rank-fusion
score for hybrid search.

Text goes through the text tower of the embedding model named in the
table's schema metadata (`embedding_name`, `embedding_model`, written by the
curate task), images and videos through its vision tower, by the embed
stage's own code (`udfs.models.embed.EmbedStage`, after
`udfs.analysis.clip_analysis.ClipAnalysis` for videos), so queries and clips
share one space. `where` is a SQL filter applied before ranking. Vector
search uses the knobs `task=index` measured (`engine.index.ann`); a table nobody
indexed is searched exactly.

Queries that cannot be answered raise `SearchError` (a `ValueError`) with a
message meant for the user: an unknown clip id, a bad filter, a vector search
on a table without embeddings, a text search with no model or captions.
"""

from __future__ import annotations

import builtins
import functools
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import reelsift_conf
from engine.index import ann
from engine.store.labels import LabelStore
from engine.store.outputs import OutputLayout
from engine.store.views import without_clips

# Always in a result, in this order; then the requested columns.
RESULT_FIELDS = [
    pa.field("clip_id", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("source_uri", pa.string()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("caption", pa.string()),
]
BLOB_COLUMNS = ("mp4", "preview_webp")
DEFAULT_FTS_COLUMN = "caption"
Mode = Literal["auto", "vector", "fts", "hybrid"]
MODES = ("auto", "vector", "fts", "hybrid")


class SearchError(ValueError):
    """A query that cannot be answered; the message says why, for the user."""


class UnknownClipError(SearchError):
    """No clip has the given id."""


class FilterError(SearchError):
    """The `where` filter is not valid SQL for this table."""


class CapabilityError(SearchError):
    """The table (or its model) cannot answer this kind of query."""


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


_SOURCE_LOCATION = re.compile(r",?\s*/\S+\.rs:\d+:\d+")


def _first_line(exc: BaseException) -> str:
    """An exception's message for a user: first line, without Lance's Rust source location."""
    text = str(exc).strip().splitlines()
    return _SOURCE_LOCATION.sub("", text[0]).strip() if text else type(exc).__name__


@dataclass(frozen=True)
class Capabilities:
    """What a table can answer: drives the API's errors and the UI's controls."""

    rows: int
    vector_column: str | None
    dim: int | None
    model: str | None
    model_name: str | None
    fts_columns: tuple[str, ...]
    has_previews: bool
    has_media: bool
    columns: tuple[str, ...] = field(default=())

    @property
    def vector(self) -> bool:
        return self.vector_column is not None

    @property
    def text_vector(self) -> bool:
        return self.vector and self.model is not None

    @property
    def fts(self) -> bool:
        return bool(self.fts_columns)


def open(path: str | os.PathLike[str], *, model: str | None = None, device: str = "auto",
         storage_options: dict[str, str] | None = None, vector_column: str | None = None,
         id_column: str | None = None, include_rejected: bool = False) -> Searcher:
    """A searcher over an output folder (its `clips.lance`) or a Lance table.

    `model` overrides the embedding model recorded in the table (a folder or a
    hub id), e.g. when the weights moved. `vector_column` / `id_column`
    default to what `task=index` recorded, else `embedding` / `clip_id`.
    Clips rejected in the UI (`labels.lance` beside the table) are left out
    of every query unless `include_rejected`."""
    root = str(path)
    if root.rstrip("/").endswith(".lance"):
        table_uri, layout = root, None
    else:
        layout = OutputLayout(root)
        table_uri = layout.clips
    try:
        ds = lance.dataset(table_uri, storage_options=storage_options)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise FileNotFoundError(f"no Lance table at {table_uri}: run task=curate first, or pass a .lance path "
                                f"({_first_line(exc)})") from exc
    labels = LabelStore(table_uri, storage_options) if not include_rejected else None
    return Searcher(ds, layout=layout, model=model, device=device, vector_column=vector_column,
                    id_column=id_column, labels=labels)


class Searcher:
    """Search one clip table. Thread-safe for concurrent queries (the web UI)."""

    def __init__(self, dataset: lance.LanceDataset, *, layout: OutputLayout | None = None, model: str | None = None,
                 device: str = "auto", vector_column: str | None = None, id_column: str | None = None,
                 labels: LabelStore | None = None) -> None:
        self.dataset = dataset
        # Whose rejected clips every query leaves out (None: none left out).
        self.labels = labels
        self.layout = layout
        self.device = device
        names = set(dataset.schema.names)
        stored = ann.read_tuned(dataset, vector_column)
        self.id_column = id_column or (stored.id_column if stored else "clip_id")
        if self.id_column not in names:
            raise SearchError(f"the table has no id column {self.id_column!r}; its columns: {sorted(names)}")
        column = vector_column or (stored.column if stored else "embedding")
        meta = {k.decode(): v.decode() for k, v in (dataset.schema.metadata or {}).items()}
        self.metadata = meta
        has_vector = column in names and pa.types.is_fixed_size_list(dataset.schema.field(column).type)
        self.tuned = (stored or ann.default_tuned(dataset, column)) if has_vector else None
        fts = tuple(sorted(ix["fields"][0] for ix in ann.list_indexes(dataset)
                           if ix["type"] in ("INVERTED", "FTS") and len(ix["fields"]) == 1))
        self.capabilities = Capabilities(
            rows=dataset.count_rows(),
            vector_column=column if has_vector else None,
            dim=dataset.schema.field(column).type.list_size if has_vector else None,
            model=model or meta.get("embedding_model"),
            model_name=meta.get("embedding_name", "clip" if model else None),
            fts_columns=fts,
            has_previews="preview_webp" in names,
            has_media="mp4" in names,
            columns=tuple(dataset.schema.names),
        )
        self._model_revision = None if model else meta.get("embedding_model_revision")
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()        # the caches
        self._model_lock = threading.RLock()  # one model load / query through the model at a time
        self._rowids: OrderedDict[str, int] = OrderedDict()

    # ------------------------------------------------------------- queries
    def search(self, *, text: str | None = None, clip_id: str | None = None,
               image: str | os.PathLike[str] | np.ndarray | Any | None = None,
               video: str | os.PathLike[str] | None = None, vector: Sequence[float] | np.ndarray | None = None,
               where: str | None = None, k: int = 10, columns: Sequence[str] = (), mode: Mode = "auto") -> pa.Table:
        """The `k` clips nearest the one query given, best first.

        Exactly one of `text`, `clip_id`, `image`, `video`, `vector`. `mode`
        applies to `text`: `vector` (the model's text tower), `fts` (BM25 on
        captions), `hybrid` (both, fused by reciprocal rank), `auto` (hybrid
        when both are possible, else whichever is). A `clip_id` query leaves
        that clip itself out of the results."""
        given = {name: v for name, v in (("text", text), ("clip_id", clip_id), ("image", image), ("video", video),
                                         ("vector", vector)) if v is not None}
        if len(given) != 1:
            raise SearchError("give exactly one query: text, clip_id, image, video or vector"
                              + (f" (got {sorted(given)})" if given else ""))
        if mode not in MODES:
            raise SearchError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        where = self._visible(where)
        extra = self._extra_columns(columns)
        if text is not None:
            text = str(text).strip()
            if not text:
                raise SearchError("the text query is empty")
            return self._text_search(text, mode=mode, where=where, k=k, extra=extra)
        if mode not in ("auto", "vector"):
            raise SearchError(f"mode={mode!r} applies to text queries only")
        if clip_id is not None:
            q = self.vector_of(clip_id)
            found = self._vector_search(q, where=where, k=k + 1, extra=extra)
            found = found.filter(pc.not_equal(found.column("clip_id"), str(clip_id)))
            return found.slice(0, k)
        if image is not None:
            q = self.embed_image(image)
        elif video is not None:
            q = self.embed_video(video)
        else:
            q = self._as_query_vector(vector)
        return self._vector_search(q, where=where, k=k, extra=extra)

    def browse(self, *, where: str | None = None, limit: int = 48, offset: int = 0,
               columns: Sequence[str] = (), order_by: str | None = None, descending: bool = False) -> pa.Table:
        """Clips matching `where` without a query (score is null), in table
        order or by `order_by`: the UI's gallery when nothing is searched."""
        where = self._visible(where)
        if where:
            self._count(where)  # a clear error for a bad filter
        extra = self._extra_columns(columns)
        cols = self._select(extra)
        if order_by is not None:
            if order_by not in self.capabilities.columns or order_by in BLOB_COLUMNS:
                raise SearchError(f"cannot order by {order_by!r}: no such column")
            from lance.dataset import ColumnOrdering

            ordering = [ColumnOrdering(order_by, ascending=not descending, nulls_first=False)]
            # with_row_id: Lance's plan for a sort on a column outside the
            # projection needs the row ids to take the other columns.
            table = self.dataset.to_table(columns=cols, filter=where, limit=limit, offset=offset, order_by=ordering,
                                          with_row_id=True)
        else:
            table = self.dataset.to_table(columns=cols, filter=where, limit=limit, offset=offset)
        return self._result(table, None, extra)

    def count(self, where: str | None = None) -> int:
        """Rows matching `where` (all rows for None); a bad filter raises FilterError."""
        return self._count(self._visible(where))

    def _visible(self, where: str | None) -> str | None:
        """`where` without the rejected clips (when this searcher leaves them out)."""
        where = (where or "").strip() or None
        if self.labels is None:
            return where
        return without_clips(where, self.labels.rejected(), self.id_column)

    def _count(self, where: str | None) -> int:
        where = (where or "").strip() or None
        if where is None:
            return self.capabilities.rows
        with self._lock:
            if where in self._counts:
                self._counts.move_to_end(where)
                return self._counts[where]
        try:
            n = self.dataset.count_rows(where)
        except (OSError, ValueError) as exc:
            if _is_user_input_error(exc):
                raise FilterError(f"invalid where filter {where!r}: {_first_line(exc)}") from None
            raise
        with self._lock:
            self._counts[where] = n
            if len(self._counts) > 256:
                self._counts.popitem(last=False)
        return n

    def clip(self, clip_id: str) -> dict[str, Any]:
        """Every non-media column of one clip."""
        cols = [c for c in self.capabilities.columns if c not in BLOB_COLUMNS]
        table = self.dataset.to_table(columns=cols, filter=f"{self.id_column} = {sql_string(clip_id)}", limit=1)
        if table.num_rows == 0:
            raise UnknownClipError(f"no clip with {self.id_column} {clip_id!r} in this table")
        return table.to_pylist()[0]

    def vector_of(self, clip_id: str) -> np.ndarray:
        """The stored vector of a clip."""
        column = self._require_vectors("a clip_id search")
        table = self.dataset.to_table(columns=[column], filter=f"{self.id_column} = {sql_string(clip_id)}", limit=1)
        if table.num_rows == 0:
            raise UnknownClipError(f"no clip with {self.id_column} {clip_id!r} in this table")
        value = table.column(column)[0].as_py()
        if value is None:
            raise SearchError(f"clip {clip_id!r} has no {column} (its embedding failed or was skipped)")
        return np.asarray(value, dtype=np.float32)

    def media(self, clip_id: str, column: str = "mp4") -> Any:
        """A seekable file object over one clip's blob (`mp4` or `preview_webp`);
        `.size()` is its length. None when the clip has no such media."""
        if column not in BLOB_COLUMNS or column not in self.capabilities.columns:
            raise CapabilityError(f"the table has no {column} column")
        rowid = self._rowid(clip_id)
        blob = self.dataset.take_blobs(column, ids=[rowid])[0]
        return blob

    # ----------------------------------------------------------- embedding
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors for `texts` (the table's model, text tower)."""
        stage = self._embedder("a text search")
        with self._model_lock:
            return np.asarray(stage.embed_text(list(texts)), dtype=np.float32)

    def embed_image(self, image: str | os.PathLike[str] | np.ndarray | Any) -> np.ndarray:
        """A query vector for one image: a path, an (H, W, 3) uint8 array or a PIL image."""
        from udfs.media.frames import FrameShaper, FrameSpec

        stage = self._embedder("an image search")
        spec = FrameSpec.from_config("embed", self._frame_spec())
        # Scaled and cropped by the same swscale call that shapes clip frames.
        frame = FrameShaper().shape_image(_image_array(image), spec)
        return self._embed_frames(stage, frame[None])

    def embed_video(self, video: str | os.PathLike[str]) -> np.ndarray:
        """A query vector for a video file: its frames are picked and embedded
        exactly as a clip's are (ClipAnalysis, then the embed stage)."""
        from udfs.analysis.clip_analysis import ClipAnalysis
        from udfs.media.probe import probe_video

        stage = self._embedder("a video search")
        path = os.fspath(video)
        if not os.path.isfile(path):
            raise SearchError(f"query video not found: {path}")
        facts = probe_video(path)
        if facts.get("error"):
            raise SearchError(f"cannot read query video {path}: {facts['error']}")
        with builtins.open(path, "rb") as fh:
            data = fh.read()
        batch = pa.table({"mp4": pa.array([data], pa.large_binary()), "num_frames": [facts.get("num_frames")],
                          "error": pa.array([None], pa.string())})
        analysed = ClipAnalysis(**reelsift_conf.stage_args("frames", consumers={"embed": self._frame_spec()}, motion=None))(batch)
        error = analysed.column("error")[0].as_py()
        if error:
            raise SearchError(f"cannot take frames from query video {path}: {error}")
        with self._model_lock:
            out = stage(analysed)
        return self._vector_from_stage(out)

    # ------------------------------------------------------------ internals
    def _embedder(self, purpose: str) -> Any:
        self._require_vectors(purpose)
        caps = self.capabilities
        if caps.model is None:
            raise CapabilityError(f"{purpose} needs the embedding model, but the table's metadata names none "
                                  "(embedding_model): pass model=PATH to engine.search.open, or search by vector")
        with self._model_lock:
                return _load_embed_stage(caps.model_name or "clip", caps.model, self._model_revision, self.device,
                                     _freeze(self._frame_spec()))

    def _frame_spec(self) -> dict[str, Any]:
        """The frames the embed stage saw for each clip: from the run's
        summary.json config when there is one, else conf/embed/<name>.yaml."""
        return frame_spec_for(self.capabilities.model_name or "clip", self.layout)

    def _embed_frames(self, stage: Any, frames: np.ndarray) -> np.ndarray:
        from udfs.schema import frame_fields
        from udfs.media.video import pack_frames

        blobs, idx, hw = pack_frames(frames, list(range(len(frames))))
        fields = frame_fields("embed")
        batch = pa.table({fields[0].name: pa.array([blobs], fields[0].type), fields[1].name: pa.array([idx], fields[1].type),
                          fields[2].name: pa.array([hw], fields[2].type), "error": pa.array([None], pa.string())})
        with self._model_lock:
            out = stage(batch)
        return self._vector_from_stage(out)

    @staticmethod
    def _vector_from_stage(out: pa.Table) -> np.ndarray:
        error = out.column("error")[0].as_py() if "error" in out.column_names else None
        value = out.column("embedding")[0].as_py()
        if error or value is None:
            raise SearchError(f"embedding the query failed: {error or 'no vector'}")
        return np.asarray(value, dtype=np.float32)

    def _require_vectors(self, purpose: str) -> str:
        if not self.capabilities.vector:
            raise CapabilityError(f"{purpose} needs embeddings, but this table has no embedding column "
                                  "(run curate with embed=clip or embed=cosmos_embed1); browse or filter instead"
                                  + (", or search captions with mode='fts'" if self.capabilities.fts else ""))
        return self.capabilities.vector_column  # type: ignore[return-value]

    def _as_query_vector(self, vector: Sequence[float] | np.ndarray) -> np.ndarray:
        self._require_vectors("a vector search")
        q = np.asarray(vector, dtype=np.float32)
        if q.ndim != 1 or q.shape[0] != self.capabilities.dim:
            raise SearchError(f"the query vector has shape {q.shape}; this table's vectors have {self.capabilities.dim} dims")
        if not np.isfinite(q).all() or not np.any(q):
            raise SearchError("the query vector must be finite and not all zeros")
        return q

    def _extra_columns(self, columns: Sequence[str]) -> list[str]:
        if isinstance(columns, str):
            columns = [columns]
        fixed = {f.name for f in RESULT_FIELDS}
        extra: list[str] = []
        for name in columns:
            if name in BLOB_COLUMNS:
                raise SearchError(f"{name!r} is media: read it with Searcher.media(clip_id, {name!r})")
            if name not in self.capabilities.columns:
                raise SearchError(f"no column {name!r}; the table has {sorted(self.capabilities.columns)}")
            if name not in fixed and name not in extra:
                extra.append(name)
        return extra

    def _select(self, extra: list[str]) -> list[str]:
        names = self.capabilities.columns
        base = [self.id_column] + [f.name for f in RESULT_FIELDS[2:] if f.name in names]
        return list(dict.fromkeys(base + extra))

    def _result(self, table: pa.Table, score: pa.Array | None, extra: list[str]) -> pa.Table:
        n = table.num_rows
        columns: list[pa.Array] = []
        for fld in RESULT_FIELDS:
            name = self.id_column if fld.name == "clip_id" else fld.name
            if fld.name == "score":
                columns.append(pa.nulls(n, fld.type) if score is None else score.cast(fld.type))
            elif name in table.column_names:
                columns.append(table.column(name).cast(fld.type))
            else:
                columns.append(pa.nulls(n, fld.type))
        schema_fields = list(RESULT_FIELDS)
        for name in extra:
            columns.append(table.column(name))
            schema_fields.append(pa.field(name, table.schema.field(name).type))
        return pa.Table.from_arrays(columns, schema=pa.schema(schema_fields))

    def _vector_search(self, q: np.ndarray, *, where: str | None, k: int, extra: list[str]) -> pa.Table:
        self._require_vectors("a vector search")
        table = self._vector_candidates(q, where=where, k=k, extra=extra)
        distance = table.column("_distance")
        # Lance's cosine and dot distances are 1 - similarity; l2 has no similarity, so its score is -distance.
        metric = self.tuned.metric if self.tuned else "cosine"
        score = pc.subtract(1.0, distance) if metric in ("cosine", "dot") else pc.negate(distance)
        return self._result(table, score, extra)

    def _vector_candidates(self, q: np.ndarray, *, where: str | None, k: int, extra: list[str]) -> pa.Table:
        """The raw Lance result (with `_rowid`, `_distance`) of one vector query."""
        assert self.tuned is not None
        selectivity = matching = None
        if where:
            matching = self._count(where)
            if matching == 0:
                return self.dataset.to_table(columns=self._select(extra), limit=0, with_row_id=True).append_column(
                    "_distance", pa.array([], pa.float32()))
            selectivity = matching / max(1, self.capabilities.rows)
        knobs = self.tuned.knobs_for(selectivity, matching)
        nearest = knobs.nearest(self.tuned.column, q, k, self.tuned.metric)
        # A bad `where` was reported by count() above: what fails here is not the filter.
        return self.dataset.to_table(columns=self._select(extra) + ["_distance"], nearest=nearest, filter=where,
                                     prefilter=where is not None, with_row_id=True)

    def _fts_candidates(self, text: str, *, where: str | None, k: int, extra: list[str]) -> pa.Table:
        if not self.capabilities.fts:
            captions = "caption" in self.capabilities.columns
            raise CapabilityError("full-text search needs a full-text index on the captions: "
                                  + ("run task=index on this output" if captions else
                                     "this table has no captions (run curate with caption=qwen_vl)"))
        if where:
            self._count(where)
        column = DEFAULT_FTS_COLUMN if DEFAULT_FTS_COLUMN in self.capabilities.fts_columns else self.capabilities.fts_columns[0]
        try:
            return self.dataset.to_table(columns=self._select(extra) + ["_score"],
                                         full_text_query={"query": text, "columns": [column]}, filter=where,
                                         prefilter=where is not None, limit=k, with_row_id=True)
        except (OSError, ValueError) as exc:
            if _is_user_input_error(exc):  # the query text itself (the filter was checked above)
                raise SearchError(f"full-text search for {text!r} failed: {_first_line(exc)}") from None
            raise

    def _text_search(self, text: str, *, mode: Mode, where: str | None, k: int, extra: list[str]) -> pa.Table:
        caps = self.capabilities
        if mode == "auto":
            mode = "hybrid" if caps.text_vector and caps.fts else "vector" if caps.text_vector else "fts" if caps.fts else "vector"
        if mode == "fts":
            table = self._fts_candidates(text, where=where, k=k, extra=extra)
            return self._result(table, table.column("_score"), extra)
        q = self.embed_text([text])[0]
        if mode == "vector":
            return self._vector_search(q, where=where, k=k, extra=extra)
        # Hybrid: each side ranks twice as many candidates as asked, and
        # LanceDB's reciprocal-rank fusion merges them.
        from lancedb.rerankers import RRFReranker

        vec = self._vector_candidates(q, where=where, k=2 * k, extra=extra)
        fts = self._fts_candidates(text, where=where, k=2 * k, extra=extra)
        fused = RRFReranker().rerank_hybrid(text, vec.drop_columns(["_distance"]), fts.drop_columns(["_score"]))
        fused = fused.slice(0, k)
        return self._result(fused, fused.column("_relevance_score"), extra)

    def _rowid(self, clip_id: str) -> int:
        with self._lock:
            if clip_id in self._rowids:
                return self._rowids[clip_id]
        table = self.dataset.to_table(columns=[], filter=f"{self.id_column} = {sql_string(clip_id)}", limit=1,
                                      with_row_id=True)
        if table.num_rows == 0:
            raise UnknownClipError(f"no clip with {self.id_column} {clip_id!r} in this table")
        rowid = int(table.column("_rowid")[0].as_py())
        with self._lock:
            self._rowids[clip_id] = rowid
            if len(self._rowids) > 4096:
                self._rowids.popitem(last=False)
        return rowid

    def lancedb_table(self) -> Any:
        """The same table through LanceDB (`lancedb.table.Table`), for its own query builder."""
        import lancedb

        uri = self.dataset.uri
        parent, name = os.path.split(uri.rstrip("/"))
        return lancedb.connect(parent).open_table(name[: -len(".lance")] if name.endswith(".lance") else name)


# ------------------------------------------------------------------ helpers
def _freeze(spec: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items()))


@functools.lru_cache(maxsize=4)
def _load_embed_stage(name: str, model: str, revision: str | None, device: str,
                      frames: tuple[tuple[str, Any], ...]) -> Any:
    """The embed stage for queries, loaded once per process and model."""
    from udfs.models.embed import EMBED_STAGES
    from udfs.models.loading import ModelNotFoundError, resolve_model

    if name not in EMBED_STAGES:
        raise CapabilityError(f"the table's embedding_name {name!r} is not an embedder we know ({sorted(EMBED_STAGES)})")
    try:
        folder = resolve_model(model, revision=revision)
    except ModelNotFoundError as exc:
        raise CapabilityError(f"cannot load the table's embedding model: {exc}; pass model=PATH to "
                              "engine.search.open") from None
    # Queries are a frame or a few: one forward pass, nothing filtered, the
    # folder already resolved (so no revision to pin again).
    return EMBED_STAGES[name](model=folder, device=device, dtype="auto", frames=dict(frames), frame_batch_size=64,
                              skip_filtered=False, revision=None)


CONF_DIR = Path(reelsift_conf.DIR)


def frame_spec_for(name: str, layout: OutputLayout | None) -> dict[str, Any]:
    """The embed stage's frame spec of a run (summary.json), else the config default."""
    import json

    if layout is not None:
        try:
            with builtins.open(layout.summary) as fh:
                frames = json.load(fh).get("config", {}).get("embed", {}).get("frames")
            if frames:
                return dict(frames)
        except (OSError, ValueError):
            pass
    from omegaconf import OmegaConf

    conf = CONF_DIR / "embed" / f"{name}.yaml"
    if conf.exists():
        frames = OmegaConf.to_container(OmegaConf.load(conf)).get("frames")
        if frames:
            return dict(frames)
    return {"policy": "uniform", "count": 8, "size": 224, "crop": True}


def _is_user_input_error(exc: BaseException) -> bool:
    """Lance reports a query it cannot parse or plan as "Invalid user input"
    (an OSError, as it reports I/O failures, which are not the user's)."""
    return "Invalid user input" in str(exc)


def _image_array(image: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise SearchError(f"query image not found: {path}")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise SearchError(f"cannot read query image {path}: {_first_line(exc)}") from None
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise SearchError(f"cannot read the query image: {_first_line(exc)}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise SearchError(f"an image query must be (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


# ------------------------------------------------------------ task=search
def format_table(table: pa.Table, *, caption_width: int = 60) -> str:
    """Ranked results as a fixed-width text table for a terminal."""
    rows = table.to_pylist()
    if not rows:
        return "no matching clips"
    extra = [n for n in table.column_names if n not in {f.name for f in RESULT_FIELDS}]
    header = ["#", "score", "clip_id", "source", "span_s", *extra, "caption"]
    lines = []
    for rank, r in enumerate(rows, 1):
        span = "" if r["start_s"] is None else f"{r['start_s']:.2f}-{r['end_s']:.2f}"
        caption = (r["caption"] or "").replace("\n", " ")
        if len(caption) > caption_width:
            caption = caption[: caption_width - 1] + "…"
        values = [str(rank), "" if r["score"] is None else f"{r['score']:.4f}", r["clip_id"] or "",
                  os.path.basename(r["source_uri"] or ""), span, *(_cell(r[n]) for n in extra), caption]
        lines.append(values)
    widths = [max(len(h), *(len(v[i]) for v in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*v).rstrip() for v in lines]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def run(cfg: Any) -> dict[str, Any]:
    """`task=search`: print the ranked clips for one query (`query`, `clip_id`,
    `image` or `video`), as a table or (`jsonl=true`) JSON lines."""
    import json
    import sys

    from engine.store import outputs
    from udfs.uris import lance_storage_options

    query = {"text": cfg.get("query"), "clip_id": cfg.get("clip_id"), "image": cfg.get("image"),
             "video": cfg.get("video")}
    query = {k: str(v) for k, v in query.items() if v is not None}
    try:
        searcher = open(str(cfg.output), model=cfg.get("model"),
                        storage_options=lance_storage_options(outputs.storage_options(cfg)),
                        include_rejected=bool(cfg.get("include_rejected")))
        if not query:
            raise SearchError("nothing to search for: give query=TEXT, clip_id=ID, image=PATH or video=PATH")
        result = searcher.search(**query, where=cfg.get("where"), k=int(cfg.get("k", 10)),
                                 columns=list(cfg.get("columns") or []), mode=str(cfg.get("mode", "auto")))
    except (SearchError, FileNotFoundError) as exc:
        print(f"search: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.get("jsonl"):
        for row in result.to_pylist():
            print(json.dumps(row, default=str))
    else:
        print(format_table(result))
    sys.stdout.flush()
    return {"query": query, "where": cfg.get("where"), "results": result.num_rows}
