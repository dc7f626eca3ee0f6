"""task=serve: a local curation workbench over an output folder.

    python -m engine task=serve output=OUT serve.host=127.0.0.1 serve.port=8000

Pages (server-rendered with Jinja2 on Starlette; no JavaScript build):

- `/`: search box (text through the table's model and/or the captions),
  filters (scores, `passed`, `duplicate`, source video, failed clips, raw
  SQL), a gallery of the clips' WebP previews with caption, scores and span;
  `?like=CLIP_ID` shows the clips most like one clip;
- `/clip/{clip_id}`: the clip playing straight from the Lance blob column,
  its columns, caption windows, and "more like this";
- `/overview`: the run from `summary.json` and `videos.lance` (counts, hours
  in and out, input errors, filter reasons, histograms of scores and clip
  lengths) and the state of the indexes;
- `/media/{clip_id}/clip.mp4`, `/media/{clip_id}/preview.webp`: blob bytes
  with HTTP range requests, so the browser can seek without the whole clip;
- `/map`: the clip embeddings in 2-D (engine/index/projection.py), coloured
  by a column; a box or lasso selection opens the gallery of those clips;
- `/duplicates`: dedup's groups and an eps slider over `dedup_max_sim`;
- `/thresholds`: one slider per filter bound, with the clips and hours kept;
- accept / reject / tag on cards, clip pages and selections, stored in
  `labels.lance` beside the table (engine/store/labels.py);
- `/api/search`, `/api/clip/{id}`, `/api/overview`, `/api/map`,
  `/api/map/select`, `/api/duplicates`, `/api/thresholds`, `/api/labels`:
  the same as JSON.

`clips.lance` is never written. Labels are written only by POSTs carrying
the page's token, behind the Host/Origin checks of engine/serve/security.py;
`serve.read_only=true` refuses them all. It binds to 127.0.0.1 unless told
otherwise (another host needs `serve.allow_remote=true`). Bad queries are
shown as messages, never stack traces.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.index import ann, projection
from engine.search import SearchError, Searcher, UnknownClipError, sql_string
from engine.search import open as open_searcher
from engine.serve import duplicates as dup
from engine.serve import mapview
from engine.serve.columns import TableColumns, finite_number
from engine.serve.security import TOKEN_HEADER, BodyTooLarge, Guard, new_token
from engine.serve.settings import ServeSettings, default_config, filter_settings
from engine.serve.thresholds import Thresholds
from engine.store import outputs
from engine.store.labels import LabelStore
from udfs import registry
from udfs.uris import lance_storage_options

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parent / "ui"
CHUNK = 256 * 1024
# Float columns that are positions or media facts, not scores to filter by.
NOT_SCORES = {"start_s", "end_s", "fps"}
MAX_VIDEO_CHOICES = 1000
MEDIA = {"clip.mp4": ("mp4", "video/mp4"), "preview.webp": ("preview_webp", "image/webp")}
LABEL_FILTERS = ("any", "accept", "reject", "unlabelled", "hide-rejected")
MAX_TEXT = 1000  # characters of a tag or a note
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


# --------------------------------------------------------------- the model
@dataclass
class Filters:
    """The gallery's filter form, as submitted (strings), and its SQL."""

    passed: str = "any"          # any | yes | no
    duplicate: str = "any"       # any | hide | only
    status: str = "ok"           # ok (no error) | failed | all
    video: str = ""
    where: str = ""
    ranges: dict[str, tuple[str, str]] | None = None
    label: str = "any"           # LABEL_FILTERS

    @classmethod
    def from_params(cls, params: Any, score_columns: list[str]) -> Filters:
        ranges = {c: (params.get(f"min_{c}", "").strip(), params.get(f"max_{c}", "").strip()) for c in score_columns}
        return cls(passed=params.get("passed", "any"), duplicate=params.get("duplicate", "any"),
                   status=params.get("status", "ok"), video=params.get("video", "").strip(),
                   where=params.get("where", "").strip(), ranges=ranges, label=params.get("label", "any"))

    def sql(self, columns: tuple[str, ...], labelled: dict[str, list[str]] | None = None) -> str | None:
        """The filters as one SQL predicate (None: no filter); `labelled`:
        the clip ids whose label is accept / reject, for the label filter."""
        parts: list[str] = []
        if self.label not in LABEL_FILTERS:
            raise SearchError(f"label: {self.label!r} is not one of {LABEL_FILTERS}")
        if self.label != "any":
            labelled = labelled or {}
            listed = {k: ", ".join(sql_string(c) for c in labelled.get(k, [])) for k in ("accept", "reject")}
            if self.label in ("accept", "reject"):
                parts.append(f"clip_id IN ({listed[self.label]})" if listed[self.label] else "false")
            elif self.label == "hide-rejected" and listed["reject"]:
                parts.append(f"clip_id NOT IN ({listed['reject']})")
            elif self.label == "unlabelled":
                both = ", ".join(x for x in listed.values() if x)
                if both:
                    parts.append(f"clip_id NOT IN ({both})")
        if "passed" in columns:
            if self.passed == "yes":
                parts.append("passed = true")
            elif self.passed == "no":
                parts.append("passed = false")
        if "duplicate" in columns:
            if self.duplicate == "hide":
                parts.append("duplicate IS NOT TRUE")
            elif self.duplicate == "only":
                parts.append("duplicate = true")
        if "error" in columns:
            if self.status == "ok":
                parts.append("error IS NULL")
            elif self.status == "failed":
                parts.append("error IS NOT NULL")
        if self.video and "video_id" in columns:
            parts.append(f"video_id = {sql_string(self.video)}")
        for column, (low, high) in (self.ranges or {}).items():
            for bound, op in ((low, ">="), (high, "<=")):
                if bound:
                    parts.append(f"{column} {op} {finite_number(column, bound, SearchError)!r}")
        if self.where:
            parts.append(f"({self.where})")
        return " AND ".join(parts) or None

    def query_items(self) -> list[tuple[str, str]]:
        items = [("passed", self.passed), ("duplicate", self.duplicate), ("status", self.status),
                 ("video", self.video), ("where", self.where), ("label", "" if self.label == "any" else self.label)]
        for column, (low, high) in (self.ranges or {}).items():
            items += [(f"min_{column}", low), (f"max_{column}", high)]
        return [(k, v) for k, v in items if v not in ("", None)]


class RunView:
    """The searcher plus what the pages need about the run, computed once."""

    def __init__(self, searcher: Searcher, layout: outputs.OutputLayout | None, settings: ServeSettings,
                 storage_options: dict[str, Any] | None, filter_settings: dict[str, dict[str, Any]]) -> None:
        self.searcher = searcher
        self.layout = layout
        self.settings = settings
        self.page_size = settings.page_size
        self.storage_options = storage_options  # pyarrow's form; Lance's is derived where a table opens
        self.filter_settings = filter_settings
        self.table_uri = searcher.dataset.uri
        self.cols = TableColumns(searcher.dataset, searcher.id_column)
        self.labels = LabelStore(self.table_uri, lance_storage_options(storage_options))
        self._lock = threading.Lock()
        self._map: mapview.MapView | None = None
        self.map_source: str | None = None
        self.warmed = threading.Event()  # set once warm_up is done (benchmarks wait for it)
        self.warm_s: float | None = None

    @cached_property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.cols, registry.FILTERS, self.filter_settings)

    @cached_property
    def duplicates(self) -> dup.Duplicates:
        return dup.Duplicates(self.cols, dup.load_run(self.layout, self.table_uri, self.storage_options))

    def map(self) -> mapview.MapView:
        """The map, read from beside the table, or projected on first use
        (and stored, unless read-only)."""
        with self._lock:
            if self._map is None:
                caps = self.searcher.capabilities
                node = self.settings.map
                table, self.map_source = projection.ensure(
                    self.searcher.dataset, self.table_uri, vector_column=caps.vector_column,
                    id_column=self.searcher.id_column, fit_rows=node.fit_rows, seed=node.seed, umap=node.umap,
                    storage_options=self.storage_options, write=not self.settings.read_only)
                self._map = mapview.MapView(self.cols, table, node.max_points, node.bins)
            return self._map

    def warm_up(self) -> None:
        """Read what the panels answer from while nobody waits yet: the map,
        the thresholds' columns and histograms, dedup's similarities, the id
        lookup labels validate against, then every slider column's sort
        (seconds at a million rows;
        a request meanwhile waits for the part it needs, no longer)."""
        steps: list[tuple[str, Any]] = []
        if self.searcher.capabilities.vector_column is not None:
            steps.append(("map", self.map))
        steps.append(("thresholds", lambda: self.thresholds.answer({}, "")))
        if dup.missing_reason(self.cols) is None:
            steps.append(("duplicates", lambda: (self.duplicates.histogram(), self.duplicates.partners())))
        steps.append(("ids", lambda: self.cols.positions([])))
        steps.append(("slider sorts", lambda: self.thresholds.prepare_sorts()))
        started = time.perf_counter()
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the request that needs it reports it
                log.debug("serve: warming %s failed: %s", name, exc)
        self.warm_s = time.perf_counter() - started
        self.warmed.set()

    def default_eps(self, dedup_node: dict[str, Any]) -> float:
        """The eps the last task=dedup ran with, else the config's."""
        return float((self.duplicates.run.summary or {}).get("eps", dedup_node.get("eps")))

    def labelled(self) -> dict[str, list[str]]:
        """Clip ids by current label (accept / reject)."""
        state = self.labels.state()
        out: dict[str, list[str]] = {"accept": [], "reject": []}
        for clip_id, label in zip(state.column("clip_id").to_pylist(), state.column("label").to_pylist()):
            if label in out:
                out[label].append(clip_id)
        return out

    def label_of(self, clip_ids: list[str]) -> dict[str, dict[str, Any]]:
        state = self.labels.state()
        wanted = set(clip_ids)
        return {r["clip_id"]: r for r in state.to_pylist() if r["clip_id"] in wanted}

    @cached_property
    def score_columns(self) -> list[str]:
        schema = self.searcher.dataset.schema
        return [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in NOT_SCORES]

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        if self.layout is None:
            return None
        return outputs.read_summary(self.layout, self.storage_options)

    @cached_property
    def videos(self) -> pa.Table | None:
        if self.layout is None:
            return None
        try:
            ds = self.layout.open_videos(lance_storage_options(self.storage_options))
        except FileNotFoundError:  # a clip table without its run (browse-only)
            return None
        wanted = [c for c in ("video_id", "uri", "duration_s", "width", "height", "fps", "num_clips",
                              "num_clip_errors", "error") if c in ds.schema.names]
        return ds.to_table(columns=wanted)

    @cached_property
    def video_choices(self) -> list[tuple[str, str]]:
        """(video_id, label) for the source-video filter."""
        if "video_id" not in self.searcher.capabilities.columns:
            return []
        if self.videos is not None and "video_id" in self.videos.column_names:
            rows = self.videos.to_pylist()
            choices = [(r["video_id"], os.path.basename(r.get("uri") or r["video_id"])) for r in rows
                       if r.get("num_clips", 1)]
        else:
            cols = ["video_id"] + (["source_uri"] if "source_uri" in self.searcher.capabilities.columns else [])
            table = self.searcher.dataset.to_table(columns=cols)
            seen: dict[str, str] = {}
            for r in table.to_pylist():
                seen.setdefault(r["video_id"], os.path.basename(r.get("source_uri") or r["video_id"]))
            choices = list(seen.items())
        return sorted(choices, key=lambda c: c[1])[:MAX_VIDEO_CHOICES]

    def overview(self) -> dict[str, Any]:
        caps = self.searcher.capabilities
        ds = self.searcher.dataset
        names = caps.columns
        stat_cols = [c for c in ("start_s", "end_s", "passed", "filter_reason", "error", *self.score_columns)
                     if c in names]
        clips = ds.to_table(columns=stat_cols) if stat_cols else pa.table({})
        out: dict[str, Any] = {"rows": caps.rows, "summary": self.summary, "histograms": [], "filter_reasons": [],
                               "clip_errors": 0, "index": self.index_state()}
        if "error" in names:
            out["clip_errors"] = int(pc.sum(pc.is_valid(clips.column("error"))).as_py() or 0)
        if "filter_reason" in names:
            reasons = pc.value_counts(pc.drop_null(clips.column("filter_reason"))).to_pylist()
            out["filter_reasons"] = sorted(((r["values"], r["counts"]) for r in reasons), key=lambda r: -r[1])
        if "passed" in names:
            out["passed"] = int(pc.sum(pc.fill_null(clips.column("passed"), False)).as_py() or 0)
        if "start_s" in names and "end_s" in names:
            lengths = pc.subtract(clips.column("end_s"), clips.column("start_s"))
            out["histograms"].append(histogram("clip length (s)", lengths))
            out["seconds_out"] = float(pc.sum(lengths).as_py() or 0.0)
        for column in self.score_columns:
            out["histograms"].append(histogram(column, clips.column(column)))
        if self.videos is not None:
            videos = self.videos.to_pylist()
            out["videos"] = videos
            out["video_errors"] = [v for v in videos if v.get("error")]
            if "duration_s" in self.videos.column_names:
                ok = [v["duration_s"] or 0 for v in videos if not v.get("error")]
                out["seconds_in"] = float(sum(ok))
        return out

    def index_state(self) -> dict[str, Any]:
        caps = self.searcher.capabilities
        tuned = self.searcher.tuned
        state: dict[str, Any] = {"vector_column": caps.vector_column, "model": caps.model,
                                 "fts_columns": list(caps.fts_columns)}
        if tuned is not None:
            state.update({"index_type": tuned.index_type or "none (exact search)",
                          "recall": None if math.isnan(tuned.unfiltered.recall) else tuned.unfiltered.recall,
                          "k": tuned.k, "notes": tuned.notes[:1]})
        state["indexes"] = sorted(f"{', '.join(ix['fields'])} ({ix['type']})" for ix in ann.list_indexes(self.searcher.dataset))
        return state


def histogram(name: str, values: pa.ChunkedArray | pa.Array, bins: int = 20) -> dict[str, Any]:
    """Counts in equal-width bins, for an SVG bar chart."""
    data = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
    data = data[np.isfinite(data)]
    if not len(data):
        return {"name": name, "bins": [], "n": 0}
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        hi = lo + 1e-9
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    peak = int(counts.max()) or 1
    return {"name": name, "n": int(len(data)), "min": lo, "max": float(data.max()), "mean": float(data.mean()),
            "bins": [{"lo": float(a), "hi": float(b), "count": int(c), "height": c / peak}
                     for a, b, c in zip(edges[:-1], edges[1:], counts)]}


# ------------------------------------------------------------ HTTP ranges
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single `Range: bytes=...` header; None for
    the whole body. Raises ValueError for a range that cannot be served."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(f"unsupported range {header!r}")
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:  # suffix: the last N bytes
        start = max(0, size - int(m.group(2)))
        end = size - 1
    end = min(end, size - 1)
    if start > end or start >= size:
        raise ValueError(f"range {header!r} is outside the {size}-byte body")
    return start, end


def _blob_chunks(blob: Any, start: int, end: int) -> Iterator[bytes]:
    offset = start
    while offset <= end:
        n = min(CHUNK, end - offset + 1)
        data = blob.read_range(offset, n)
        if not data:
            break
        yield data
        offset += len(data)


# ------------------------------------------------------------------- the app
def make_app(output: str, *, settings: ServeSettings | None = None,
             filters: dict[str, dict[str, Any]] | None = None, dedup: dict[str, Any] | None = None,
             storage_options: dict[str, str] | None = None, **overrides: Any) -> Any:
    """The application over `output` (an output folder or a .lance table).

    `settings`: the `serve` config node (None: conf/config.yaml's), with
    `overrides` of its fields (`page_size=24`, `read_only=True`);
    `filters`: the {node: settings} the thresholds panel starts from (None:
    the default config's filter nodes, under what task=filter last applied);
    `dedup`: the `dedup` node the copied dedup command is relative to (None:
    the default config's); `storage_options` as the config gives them
    (pyarrow's form)."""
    import dataclasses

    cfg = default_config() if settings is None or filters is None or dedup is None else None
    if cfg is not None:
        from omegaconf import OmegaConf

        settings = settings or ServeSettings.from_config(cfg.serve)
        dedup = dedup if dedup is not None else OmegaConf.to_container(cfg.dedup, resolve=True)
    settings = dataclasses.replace(settings, **overrides) if overrides else settings
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates

    page_size = settings.page_size
    # The UI shows rejected clips (to undo a decision); its label filter hides them.
    searcher = open_searcher(output, model=settings.model, device=settings.device,
                             storage_options=lance_storage_options(storage_options), include_rejected=True)
    if filters is None:
        assert cfg is not None
        root = searcher.layout.root if searcher.layout is not None else None
        filters = filter_settings(cfg, root, storage_options)
    view = RunView(searcher, searcher.layout, settings, storage_options, filters)
    if settings.warm_up:
        threading.Thread(target=view.warm_up, name="serve-warm-up", daemon=True).start()
    token = new_token()
    output_arg = str(output)
    templates = Jinja2Templates(directory=str(UI_DIR / "templates"))
    env = templates.env
    env.filters["basename"] = lambda p: os.path.basename(p or "")
    env.filters["num"] = _num
    env.filters["hours"] = lambda s: f"{(s or 0) / 3600:.2f}"
    env.globals["caps"] = searcher.capabilities
    env.globals["title"] = os.path.basename(str(output).rstrip("/")) or str(output)
    env.globals["token"] = token
    env.globals["token_header"] = TOKEN_HEADER
    env.globals["read_only"] = settings.read_only

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def error_status(exc: Exception) -> int:
        return 404 if isinstance(exc, UnknownClipError) else 400

    def gallery_state(request: Request) -> dict[str, Any]:
        params = request.query_params
        filters = Filters.from_params(params, view.score_columns)
        selection = None
        if params.get("poly"):
            selection = (params.get("method", "pca"), params["poly"])
        q = params.get("q", "").strip()
        like = params.get("like", "").strip()
        mode = params.get("mode", "auto")
        order = params.get("order", "")
        try:
            page_no = max(1, int(params.get("page", "1") or 1))
        except ValueError:
            page_no = 1
        return {"filters": filters, "q": q, "like": like, "mode": mode, "order": order, "page": page_no,
                "selection": selection}

    def run_gallery(state: dict[str, Any]) -> tuple[pa.Table, int | None]:
        filters = state["filters"]
        where = filters.sql(searcher.capabilities.columns, view.labelled() if filters.label != "any" else None)
        extra = view.score_columns + [c for c in ("passed", "duplicate", "error", "video_id", "camera_motion",
                                                  "cut_inside") if c in searcher.capabilities.columns]
        if state["selection"] is not None:
            # The clips a map selection holds, in map order, a page at a time.
            method, raw = state["selection"]
            at = select_positions(method, parse_polygon(raw))
            page_ids = view.cols.ids(at[(state["page"] - 1) * page_size:state["page"] * page_size])
            listed = ", ".join(sql_string(i) for i in page_ids) or "NULL"
            rows = searcher.browse(where=f"clip_id IN ({listed})", limit=page_size, columns=extra)
            rank = {c: i for i, c in enumerate(page_ids)}
            rows = rows.take(pa.array(sorted(range(rows.num_rows), key=lambda i: rank[rows.column("clip_id")[i].as_py()])))
            return rows, len(at)
        if state["q"]:
            return searcher.search(text=state["q"], mode=state["mode"], where=where, k=page_size, columns=extra), None
        if state["like"]:
            return searcher.search(clip_id=state["like"], where=where, k=page_size, columns=extra), None
        order = state["order"] if state["order"] in view.score_columns else None
        total = searcher.count(where)
        rows = searcher.browse(where=where, limit=page_size, offset=(state["page"] - 1) * page_size, columns=extra,
                               order_by=order, descending=True)
        return rows, total

    def select_positions(method: str, polygon: list[tuple[float, float]]) -> np.ndarray:
        if searcher.capabilities.vector_column is None:
            raise SearchError(mapview.missing_reason(None))
        try:
            return view.map().select(method, polygon)
        except ValueError as exc:
            raise SearchError(str(exc)) from None

    def gallery(request: Request) -> Response:
        state = gallery_state(request)
        items = state["filters"].query_items()
        if state["selection"] is not None:
            items += [("method", state["selection"][0]), ("poly", request.query_params["poly"])]
        context: dict[str, Any] = {**state, "view": view, "results": [], "total": None, "error": None,
                                   "query_string": urlencode(items), "labels": {}}
        status = 200
        try:
            results, total = run_gallery(state)
            context["results"] = results.to_pylist()
            context["labels"] = view.label_of([r["clip_id"] for r in context["results"]])
            context["total"] = total
            if state["like"]:
                context["like_clip"] = searcher.clip(state["like"])
        except SearchError as exc:
            context["error"], status = str(exc), error_status(exc)
        context["page_size"] = page_size
        return page(request, "gallery.html", context, status)

    def clip_page(request: Request) -> Response:
        clip_id = request.path_params["clip_id"]
        context: dict[str, Any] = {"view": view, "clip": None, "similar": [], "error": None, "similar_error": None}
        try:
            context["clip"] = searcher.clip(clip_id)
            context["labels"] = view.label_of([clip_id])
        except SearchError as exc:
            context["error"] = str(exc)
            return page(request, "clip.html", context, error_status(exc))
        if searcher.capabilities.vector:
            try:
                context["similar"] = searcher.search(clip_id=clip_id, k=12, where="error IS NULL"
                                                     if "error" in searcher.capabilities.columns else None).to_pylist()
            except SearchError as exc:
                context["similar_error"] = str(exc)
        context["score_columns"] = view.score_columns
        return page(request, "clip.html", context)

    def overview_page(request: Request) -> Response:
        return page(request, "overview.html", {"view": view, "o": view.overview(), "error": None})

    def media(request: Request) -> Response:
        clip_id = request.path_params["clip_id"]
        name = request.path_params["name"]
        if name not in MEDIA:
            return Response(f"no media {name!r}; a clip has {sorted(MEDIA)}", status_code=404, media_type="text/plain")
        column, media_type = MEDIA[name]
        try:
            blob = searcher.media(clip_id, column)
        except UnknownClipError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        except SearchError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        if blob is None:
            return Response(f"clip {clip_id} has no {column}", status_code=404, media_type="text/plain")
        size = blob.size()
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
        try:
            span = parse_range(request.headers.get("range"), size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if size == 0:
            return Response(b"", media_type=media_type, headers=headers)
        start, end = span or (0, size - 1)
        headers["Content-Length"] = str(end - start + 1)
        status = 200
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            status = 206
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type=media_type)
        return StreamingResponse(_blob_chunks(blob, start, end), status_code=status, headers=headers,
                                 media_type=media_type)

    def api_search(request: Request) -> Response:
        state = gallery_state(request)
        try:
            results, total = run_gallery(state)
        except SearchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=error_status(exc))
        return JSONResponse({"total": total, "results": _jsonable(results.to_pylist())})

    def api_clip(request: Request) -> Response:
        try:
            return JSONResponse(_jsonable(searcher.clip(request.path_params["clip_id"])))
        except SearchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=error_status(exc))

    def api_overview(request: Request) -> Response:
        return JSONResponse(_jsonable(view.overview()))

    # ------------------------------------------------------------ workbench
    def map_reason() -> str | None:
        return mapview.missing_reason(searcher.capabilities.vector_column)

    def api_map(request: Request) -> Response:
        if (why := map_reason()) is not None:
            return JSONResponse({"error": why}, status_code=400)
        params = request.query_params
        try:
            box = [float(v) for v in params["view"].split(",")] if params.get("view") else None
            if box is not None and (len(box) != 4 or not all(math.isfinite(v) for v in box)):
                raise ValueError("view is x0,x1,y0,y1")
            m = view.map()
            column = params.get("color") or None
            if column is not None and column not in m.colour_columns(view.score_columns):
                raise ValueError(f"cannot colour by {column!r}; choose one of {m.colour_columns(view.score_columns)}")
            labels = view.labels.state() if column == "label" else None
            out = m.answer(params.get("method", "pca"), column, tuple(box) if box else None, labels,
                           params.get("encoding", "lists"))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        out["colours"] = m.colour_columns(view.score_columns)
        out["source"] = view.map_source
        return JSONResponse(out)

    def api_map_select(request: Request) -> Response:
        params = request.query_params
        try:
            at = select_positions(params.get("method", "pca"), parse_polygon(params.get("poly", "")))
        except SearchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        limit = settings.max_label_ids
        return JSONResponse({"n": len(at), "clip_ids": view.cols.ids(at[:limit]), "truncated": len(at) > limit})

    def map_page(request: Request) -> Response:
        why = map_reason()
        return page(request, "map.html", {"view": view, "error": why}, 200 if why is None else 400)

    def dup_reason() -> str | None:
        return dup.missing_reason(view.cols)

    def api_duplicates(request: Request) -> Response:
        if (why := dup_reason()) is not None:
            return JSONResponse({"error": why}, status_code=400)
        params = request.query_params
        try:
            eps = float(params.get("eps", view.default_eps(dedup)))
            if not math.isfinite(eps):
                raise ValueError("eps must be finite")
            groups = min(200, max(0, int(params.get("groups", "0"))))
            offset = max(0, int(params.get("offset", "0")))
            out = view.duplicates.answer(eps, output_arg, groups=groups, offset=offset, defaults=dedup)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if params.get("histogram", "1") != "0":
            out["histogram"] = view.duplicates.histogram()
        return JSONResponse(_jsonable(out))

    def duplicates_page(request: Request) -> Response:
        why = dup_reason()
        context = {"view": view, "error": why, "eps": view.default_eps(dedup) if why is None else None}
        return page(request, "duplicates.html", context, 200 if why is None else 400)

    def api_thresholds(request: Request) -> Response:
        try:
            out = view.thresholds.answer(request.query_params, output_arg)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        stored = int(pc.sum(pc.fill_null(view.cols.column("passed"), False)).as_py() or 0) \
            if view.cols.has("passed") else None
        out["stored_passed"] = stored
        return JSONResponse(_jsonable(out))

    def thresholds_page(request: Request) -> Response:
        why = None if view.thresholds.sliders else "the table has no filter score columns (motion, aesthetic, quality)"
        return page(request, "thresholds.html", {"view": view, "error": why})

    def api_labels_get(request: Request) -> Response:
        state = view.labels.state()
        wanted = request.query_params.getlist("clip_id")
        rows = [r for r in state.to_pylist() if not wanted or r["clip_id"] in wanted]
        counts = {"accept": sum(r["label"] == "accept" for r in rows), "reject": sum(r["label"] == "reject" for r in rows)}
        return JSONResponse(_jsonable({"labels": rows, "counts": counts, "read_only": settings.read_only,
                                       "uri": view.labels.uri}))

    async def api_labels_post(request: Request) -> Response:
        if settings.read_only:
            return JSONResponse({"error": "this server is read-only (serve.read_only=true)"}, status_code=403)
        try:
            body = json.loads(await request.body())
        except BodyTooLarge:  # a chunked body has no Content-Length for the guard to refuse first
            return JSONResponse({"error": f"request body over {settings.max_body_bytes} bytes"}, status_code=413)
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        try:
            clip_ids, label, tag, note = parse_label_body(body, settings.max_label_ids)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        unknown = [c for c, at in zip(clip_ids, view.cols.positions(clip_ids)) if at < 0]
        if unknown:
            return JSONResponse({"error": f"unknown clip ids: {unknown[:5]}", "unknown": len(unknown)}, status_code=400)
        written = await asyncio.to_thread(view.labels.append, clip_ids, label, tag=tag, note=note)
        return JSONResponse({"written": written, "label": label})

    def favicon(request: Request) -> Response:
        return Response(FAVICON, media_type="image/svg+xml")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/media/")):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return page(request, "message.html", {"view": view, "error": f"{exc.status_code}: {exc.detail}"},
                    exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("serve: %s failed", request.url.path)
        message = f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if request.url.path.startswith(("/api/", "/media/")):
            return JSONResponse({"error": message}, status_code=500)
        return page(request, "message.html", {"view": view, "error": message}, 500)

    routes = [
        Route("/", gallery),
        Route("/clip/{clip_id}", clip_page),
        Route("/overview", overview_page),
        Route("/media/{clip_id}/{name:str}", media, methods=["GET", "HEAD"]),
        Route("/api/search", api_search),
        Route("/api/clip/{clip_id}", api_clip),
        Route("/api/overview", api_overview),
        Route("/map", map_page),
        Route("/duplicates", duplicates_page),
        Route("/thresholds", thresholds_page),
        Route("/api/map", api_map),
        Route("/api/map/select", api_map_select),
        Route("/api/duplicates", api_duplicates),
        Route("/api/thresholds", api_thresholds),
        Route("/api/labels", api_labels_get, methods=["GET"]),
        Route("/api/labels", api_labels_post, methods=["POST"]),
        Route("/favicon.ico", favicon),
        Mount("/static", app=StaticFiles(directory=str(UI_DIR / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal_error})
    app.state.searcher = searcher
    app.state.view = view
    guarded = Guard(app, bound_host=settings.host, token=token, max_body=settings.max_body_bytes,
                    any_host=settings.allow_remote and settings.host in WILDCARD_HOSTS)
    guarded.state = app.state  # tests and notebooks reach the view through either
    guarded.token = token
    return guarded


def parse_polygon(raw: str) -> list[tuple[float, float]]:
    """"x1,y1,x2,y2,..." -> corners; a bad one raises SearchError."""
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        raise SearchError(f"poly: {raw[:80]!r} is not a list of numbers") from None
    if len(values) < 6 or len(values) % 2 or not all(math.isfinite(v) for v in values):
        raise SearchError("poly needs at least three x,y corners of finite numbers")
    return list(zip(values[0::2], values[1::2]))


def parse_label_body(body: Any, max_ids: int) -> tuple[list[str], str, str | None, str | None]:
    """(clip_ids, label, tag, note) of a label POST; ValueError says what is wrong."""
    from engine.store.labels import KINDS

    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    ids = body.get("clip_ids", [body["clip_id"]] if "clip_id" in body else None)
    if not isinstance(ids, list) or not ids or not all(isinstance(c, str) and 0 < len(c) <= 256 for c in ids):
        raise ValueError("clip_ids must be a non-empty list of clip id strings")
    if len(ids) > max_ids:
        raise ValueError(f"at most {max_ids} clips per request (got {len(ids)})")
    label = body.get("label")
    if label not in KINDS:
        raise ValueError(f"label must be one of {list(KINDS)}")
    tag, note = body.get("tag"), body.get("note")
    for name, value in (("tag", tag), ("note", note)):
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")
    if label in ("tag", "untag") and not tag:
        raise ValueError(f"label={label!r} needs a tag")
    return list(dict.fromkeys(ids)), label, tag or None, note or None


FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           b'fill="#2b6cb0"/><path d="M6 4l6 4-6 4z" fill="#fff"/></svg>')


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# ----------------------------------------------------------------- running
class BackgroundServer:
    """Serve an app from a thread (tests, notebooks): `with BackgroundServer(app) as url:`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the web server did not start")
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class RemoteRefused(ValueError):
    """serve.host is not local and serve.allow_remote is not set."""


def check_host(settings: ServeSettings) -> None:
    """A non-local bind is refused unless allowed; allowed, it is said loudly."""
    if settings.host in ("127.0.0.1", "localhost", "::1"):
        return
    if not settings.allow_remote:
        raise RemoteRefused(f"serve.host={settings.host} would let anyone who can reach this machine browse and "
                            "label the output: the UI has no authentication. Set serve.allow_remote=true to "
                            "do it anyway (or serve.read_only=true as well, to refuse writes)")
    log.warning("serve: listening on %s with NO AUTHENTICATION: anyone who can reach it can browse the output%s%s",
                settings.host, "" if settings.read_only else " and write labels (serve.read_only=true refuses them)",
                "; every Host header is accepted (no DNS-rebinding check on a wildcard bind)"
                if settings.host in WILDCARD_HOSTS else "")


def run(cfg: Any) -> dict[str, Any]:
    """`task=serve`: serve the UI until interrupted."""
    import uvicorn

    settings = ServeSettings.from_config(cfg.serve)
    check_host(settings)
    from omegaconf import OmegaConf

    options = outputs.storage_options(cfg)
    app = make_app(str(cfg.output), settings=settings, filters=filter_settings(cfg, str(cfg.output), options),
                   dedup=OmegaConf.to_container(cfg.dedup, resolve=True), storage_options=options)
    log.info("serve: http://%s:%d/ (Ctrl-C stops)%s", settings.host, settings.port,
             " read-only" if settings.read_only else "")
    started = time.perf_counter()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return {"url": f"http://{settings.host}:{settings.port}/", "served_s": round(time.perf_counter() - started, 1)}
