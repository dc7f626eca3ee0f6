"""task=serve: a local web UI over an output folder.

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
- `/api/search`, `/api/clip/{id}`, `/api/overview`: the same as JSON.

The server only reads: it never writes to the output. It binds to 127.0.0.1
unless told otherwise. Bad queries (unknown clip, bad SQL, a vector search
on a table without embeddings) are shown as messages, never stack traces.
"""

from __future__ import annotations

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

from engine.index import ann

from engine.store import outputs
from engine.search import SearchError, Searcher, UnknownClipError, sql_string
from engine.search import open as open_searcher
from udfs.uris import lance_storage_options

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parent / "ui"
CHUNK = 256 * 1024
# Float columns that are positions or media facts, not scores to filter by.
NOT_SCORES = {"start_s", "end_s", "fps"}
MAX_VIDEO_CHOICES = 1000


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

    @classmethod
    def from_params(cls, params: Any, score_columns: list[str]) -> Filters:
        ranges = {c: (params.get(f"min_{c}", "").strip(), params.get(f"max_{c}", "").strip()) for c in score_columns}
        return cls(passed=params.get("passed", "any"), duplicate=params.get("duplicate", "any"),
                   status=params.get("status", "ok"), video=params.get("video", "").strip(),
                   where=params.get("where", "").strip(), ranges=ranges)

    def sql(self, columns: tuple[str, ...]) -> str | None:
        """The filters as one SQL predicate (None: no filter)."""
        parts: list[str] = []
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
                    try:
                        value = float(bound)
                    except ValueError:
                        raise SearchError(f"{column}: {bound!r} is not a number") from None
                    if not math.isfinite(value):
                        raise SearchError(f"{column}: {bound!r} is not a finite number")
                    parts.append(f"{column} {op} {value!r}")
        if self.where:
            parts.append(f"({self.where})")
        return " AND ".join(parts) or None

    def query_items(self) -> list[tuple[str, str]]:
        items = [("passed", self.passed), ("duplicate", self.duplicate), ("status", self.status),
                 ("video", self.video), ("where", self.where)]
        for column, (low, high) in (self.ranges or {}).items():
            items += [(f"min_{column}", low), (f"max_{column}", high)]
        return [(k, v) for k, v in items if v not in ("", None)]


class RunView:
    """The searcher plus what the pages need about the run, computed once."""

    def __init__(self, searcher: Searcher, layout: outputs.OutputLayout | None, page_size: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.searcher = searcher
        self.layout = layout
        self.page_size = page_size
        self.storage_options = storage_options  # pyarrow's form; Lance's is derived where a table opens
        self._lock = threading.Lock()

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
def make_app(output: str, *, model: str | None = None, device: str = "auto", page_size: int = 48,
             storage_options: dict[str, str] | None = None) -> Any:
    """The Starlette application over `output` (an output folder or a .lance
    table); `storage_options` as the config gives them (pyarrow's form)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates

    searcher = open_searcher(output, model=model, device=device,
                             storage_options=lance_storage_options(storage_options))
    view = RunView(searcher, searcher.layout, page_size, storage_options)
    templates = Jinja2Templates(directory=str(UI_DIR / "templates"))
    env = templates.env
    env.filters["basename"] = lambda p: os.path.basename(p or "")
    env.filters["num"] = _num
    env.filters["hours"] = lambda s: f"{(s or 0) / 3600:.2f}"
    env.globals["caps"] = searcher.capabilities
    env.globals["title"] = os.path.basename(str(output).rstrip("/")) or str(output)

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def error_status(exc: Exception) -> int:
        return 404 if isinstance(exc, UnknownClipError) else 400

    def gallery_state(request: Request) -> dict[str, Any]:
        params = request.query_params
        filters = Filters.from_params(params, view.score_columns)
        q = params.get("q", "").strip()
        like = params.get("like", "").strip()
        mode = params.get("mode", "auto")
        order = params.get("order", "")
        try:
            page_no = max(1, int(params.get("page", "1") or 1))
        except ValueError:
            page_no = 1
        return {"filters": filters, "q": q, "like": like, "mode": mode, "order": order, "page": page_no}

    def run_gallery(state: dict[str, Any]) -> tuple[pa.Table, int | None]:
        where = state["filters"].sql(searcher.capabilities.columns)
        extra = view.score_columns + [c for c in ("passed", "duplicate", "error", "video_id")
                                      if c in searcher.capabilities.columns]
        if state["q"]:
            return searcher.search(text=state["q"], mode=state["mode"], where=where, k=page_size, columns=extra), None
        if state["like"]:
            return searcher.search(clip_id=state["like"], where=where, k=page_size, columns=extra), None
        order = state["order"] if state["order"] in view.score_columns else None
        total = searcher.count(where)
        rows = searcher.browse(where=where, limit=page_size, offset=(state["page"] - 1) * page_size, columns=extra,
                               order_by=order, descending=True)
        return rows, total

    def gallery(request: Request) -> Response:
        state = gallery_state(request)
        context: dict[str, Any] = {**state, "view": view, "results": [], "total": None, "error": None,
                                   "query_string": urlencode(state["filters"].query_items())}
        status = 200
        try:
            results, total = run_gallery(state)
            context["results"] = results.to_pylist()
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
        column, media_type = {"clip.mp4": ("mp4", "video/mp4"),
                              "preview.webp": ("preview_webp", "image/webp")}[request.path_params["name"]]
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
        Route("/favicon.ico", favicon),
        Mount("/static", app=StaticFiles(directory=str(UI_DIR / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal_error})
    app.state.searcher = searcher
    app.state.view = view
    return app


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


def run(cfg: Any) -> dict[str, Any]:
    """`task=serve`: serve the UI until interrupted."""
    import uvicorn

    node = cfg.get("serve") or {}
    host, port = str(node.get("host", "127.0.0.1")), int(node.get("port", 8000))
    app = make_app(str(cfg.output), model=node.get("model"), device=str(node.get("device", "auto")),
                   page_size=int(node.get("page_size", 48)),
                   storage_options=outputs.storage_options(cfg))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s: anyone who can reach this machine can browse the output", host)
    log.info("serve: http://%s:%d/ (Ctrl-C stops)", host, port)
    started = time.perf_counter()
    uvicorn.run(app, host=host, port=port, log_level="info")
    return {"url": f"http://{host}:{port}/", "served_s": round(time.perf_counter() - started, 1)}
