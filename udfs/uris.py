"""Input listing and opening, by URI.

Everything downstream holds URIs (``/abs/path.mp4``, ``file://``, ``s3://``,
``http(s)://``), never open handles, so rows can move between workers and
machines. Local paths are normalised to absolute paths.

Listing streams (`iter_inputs`), so a run over a huge prefix never needs the
whole listing at once. Remote reads (HTTP, object stores) go through file
objects that retry a dropped connection or a transient store error with
exponential backoff, resuming at the byte they had reached; after the last
attempt the error is raised as an `OSError`, which the stages record as the
video's error.
"""

from __future__ import annotations

import glob
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".mxf"}
)

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "hdfs")
HTTP_SCHEMES = ("http", "https")


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    # A Windows drive letter or bare path parses as a one-letter scheme.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def has_video_extension(name: str, extensions: frozenset[str] = VIDEO_EXTENSIONS) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _join(root: str, rel: str) -> str:
    if not root:
        return rel
    if scheme_of(rel):
        return rel
    if scheme_of(root):
        return root.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(root, rel)


def arrow_fs(uri: str, storage_options: dict[str, Any] | None):
    import pyarrow.fs as pafs

    storage_options = store_options(storage_options)
    if storage_options and scheme_of(uri) == "s3":
        parsed = urlparse(uri)
        fs = pafs.S3FileSystem(**storage_options)
        return fs, parsed.netloc + parsed.path
    return pafs.FileSystem.from_uri(uri)


# pyarrow S3FileSystem option -> Lance (object_store) storage option.
_LANCE_S3_KEYS = {
    "access_key": "aws_access_key_id",
    "secret_key": "aws_secret_access_key",
    "session_token": "aws_session_token",
    "region": "aws_region",
}


def lance_storage_options(storage_options: dict[str, Any] | None) -> dict[str, str] | None:
    """The same credentials/endpoint in the form Lance's object store takes,
    so users give `storage_options` once, in pyarrow's S3FileSystem form."""
    storage_options = store_options(storage_options)
    if not storage_options:
        return None
    out: dict[str, str] = {}
    scheme = str(storage_options.get("scheme", "https"))
    for key, value in storage_options.items():
        if key in _LANCE_S3_KEYS:
            out[_LANCE_S3_KEYS[key]] = str(value)
        elif key == "endpoint_override":
            endpoint = str(value)
            out["aws_endpoint"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        elif key != "scheme":
            out[key] = str(value)  # already in Lance's form
    if scheme == "http":
        out["allow_http"] = "true"
    return out


def _list_remote(uri: str, extensions: frozenset[str], storage_options: dict[str, Any] | None) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = arrow_fs(uri, storage_options)
    info = fs.get_file_info(path)
    scheme = scheme_of(uri)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File and has_video_extension(i.path, extensions)
    )


def _expand_json_list(path: str, root: str | None, storage_options: dict[str, Any] | None) -> list[str]:
    with open_uri(path, storage_options) as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        root = root if root is not None else data.get("root", "")
        items = data.get("videos", data.get("files"))
    else:
        items = data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of paths, or an object with a 'videos' list")
    out = []
    for item in items:
        rel = item["uri"] if isinstance(item, dict) else item
        if not isinstance(rel, str):
            raise ValueError(f"{path}: list entries must be strings or {{'uri': ...}} objects, got {item!r}")
        out.append(normalise(_join(root or "", rel)))
    return out


def normalise(uri: str) -> str:
    scheme = scheme_of(uri)
    if scheme == "file":
        return os.path.abspath(urlparse(uri).path)
    if scheme:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def iter_inputs(
    spec: str | list[str],
    *,
    root: str | None = None,
    extensions: frozenset[str] | list[str] = VIDEO_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Video URIs of an input spec, streamed, each once.

    ``spec`` is a file, a directory (recursive, filtered by extension), a glob,
    a ``.json`` file list (entries joined to ``root``), an ``s3://`` prefix or
    object, an ``http(s)://`` URL, or a list of any of these. A file named
    explicitly is kept whatever its extension: the user asked for it, and if it
    is not a video the probe records why.

    Directories are walked in sorted order and yielded as they are walked, so
    the first inputs are known at once and the caller holds only what it keeps.
    A spec that matches nothing raises `FileNotFoundError` when it is reached.
    """
    extensions = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    specs = [str(s) for s in ([spec] if isinstance(spec, str) else list(spec))]
    for item in specs:  # a typo in the third spec fails now, not an hour in
        if not scheme_of(item) and not item.lower().endswith(".json"):
            path = normalise(_join(root or "", item) if root and not os.path.isabs(item) else item)
            if not os.path.exists(path) and not glob.has_magic(path):
                raise FileNotFoundError(f"input not found: {item}")
    # Duplicates only arise across specs; remember a 64-bit digest per URI,
    # not the URI itself.
    seen: set[int] = set()
    for item in specs:
        for uri in _expand(str(item), root, extensions, storage_options):
            key = hash(uri)
            if key not in seen:
                seen.add(key)
                yield uri


def _expand(item: str, root: str | None, extensions: frozenset[str],
            storage_options: dict[str, Any] | None) -> Iterator[str]:
    scheme = scheme_of(item)
    if item.lower().endswith(".json"):
        yield from _expand_json_list(item, root, storage_options)
    elif scheme in HTTP_SCHEMES:
        yield item
    elif scheme in REMOTE_SCHEMES:
        yield from _list_remote(item, extensions, storage_options)
    else:
        path = normalise(_join(root or "", item) if root and not os.path.isabs(item) else item)
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                yield from (os.path.join(dirpath, f) for f in sorted(filenames) if has_video_extension(f, extensions))
        elif os.path.isfile(path):
            yield path
        elif glob.has_magic(path):
            yield from (p for p in sorted(glob.iglob(path, recursive=True))
                        if os.path.isfile(p) and has_video_extension(p, extensions))
        else:
            raise FileNotFoundError(f"input not found: {item}")


def list_inputs(
    spec: str | list[str],
    *,
    root: str | None = None,
    extensions: frozenset[str] | list[str] = VIDEO_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """`iter_inputs` as a sorted list (small inputs, tests, tools)."""
    return sorted(iter_inputs(spec, root=root, extensions=extensions, storage_options=storage_options))


# ------------------------------------------------------------------ reading

# The key of `storage_options` under which the engine passes the read retry
# policy to the stages (it rides along with the credentials they already get);
# it is stripped before options reach pyarrow or Lance.
READ_RETRIES_KEY = "read_retries"


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a remote read is retried."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, failure: int) -> float:
        """Seconds to wait after the `failure`-th consecutive failure (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failure - 1))

    @classmethod
    def of(cls, storage_options: dict[str, Any] | None) -> RetryPolicy:
        given = (storage_options or {}).get(READ_RETRIES_KEY) or {}
        return cls(**{k: v for k, v in dict(given).items() if v is not None})


def store_options(storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """`storage_options` without the engine's own keys: what the store takes."""
    if not storage_options:
        return None
    out = {k: v for k, v in storage_options.items() if k != READ_RETRIES_KEY}
    return out or None


class PermanentReadError(OSError):
    """A read that retrying cannot fix (404, access denied, not found)."""


T = TypeVar("T")


def with_retries(what: str, policy: RetryPolicy, fn: Callable[[], T]) -> T:
    """`fn()`, retried with backoff on transient errors; the last error is
    raised as an `OSError` naming `what` and the number of attempts."""
    failures = 0
    while True:
        try:
            return fn()
        except PermanentReadError:
            raise
        except _TRANSIENT as exc:
            if _is_permanent(exc):
                raise
            failures += 1
            if failures >= policy.attempts:
                raise OSError(f"{what}: giving up after {failures} attempts: {_describe(exc)}") from exc
            delay = policy.delay(failures)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, _describe(exc), failures, policy.attempts - 1, delay)
            time.sleep(delay)


# Errors worth another try: connections dropped or refused, timeouts, short
# bodies, 5xx/429 answers, object-store I/O errors.
_TRANSIENT = (OSError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError)


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code not in (408, 425, 429) and exc.code < 500
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip() or type(exc).__name__}"


def open_uri(uri: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A seekable binary file object for any supported URI."""
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return open(normalise(uri), "rb")
    policy = RetryPolicy.of(storage_options)
    if scheme in HTTP_SCHEMES:
        return HttpRangeFile(uri, policy)
    return RetryingStoreFile(uri, store_options(storage_options), policy)


def av_source(uri: str, storage_options: dict[str, Any] | None = None) -> str | IO[bytes]:
    """What to hand ``av.open``: local paths as paths (FFmpeg's own file I/O);
    HTTP and object stores as retrying file objects, so a dropped connection
    costs a retry, not the video."""
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return normalise(uri)
    return open_uri(uri, storage_options)


def size_of(uri: str, storage_options: dict[str, Any] | None = None) -> int | None:
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return os.path.getsize(normalise(uri))
    policy = RetryPolicy.of(storage_options)
    if scheme in HTTP_SCHEMES:
        def head() -> int | None:
            req = urllib.request.Request(uri, method="HEAD")
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                length = resp.headers.get("Content-Length")
                return int(length) if length is not None else None

        return with_retries(uri, policy, head)
    fs, path = arrow_fs(uri, storage_options)
    return with_retries(uri, policy, lambda: fs.get_file_info(path).size)


HTTP_TIMEOUT_S = 60.0
# Bytes discarded at most to reach an offset on a server without range support
# before reopening counts as a failure of its own.
_CHUNK = 1 << 20


class _RetryingReader:
    """Read-only, seekable file object over a remote stream that can be
    reopened at an offset. Subclasses open the stream; this class keeps the
    position and retries failed opens and reads."""

    def __init__(self, uri: str, policy: RetryPolicy) -> None:
        self.uri = uri
        self.policy = policy
        self._pos = 0
        self._size: int | None = None
        self._closed = False
        self._stream: Any = None  # what `_open_at` returned, until dropped

    # -- subclass hooks -----------------------------------------------------
    def _open_at(self, pos: int) -> Any:
        """A readable stream positioned at `pos`."""
        raise NotImplementedError

    def _stat_size(self) -> int | None:
        raise NotImplementedError

    # -- the open stream ----------------------------------------------------
    def _read_open(self, n: int) -> bytes:
        if self._stream is None:
            self._stream = self._open_at(self._pos)
        return self._stream.read(n)

    def _drop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None

    # -- file protocol ------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            target = offset
        elif whence == 1:
            target = self._pos + offset
        elif whence == 2:
            size = self.size()
            if size is None:
                raise OSError(f"{self.uri}: size unknown, cannot seek from the end")
            target = size + offset
        else:
            raise ValueError(f"unsupported whence {whence}")
        target = max(0, target)
        if target != self._pos:
            self._drop()
            self._pos = target
        return self._pos

    def size(self) -> int | None:
        if self._size is None:
            self._size = with_retries(self.uri, self.policy, self._stat_size)
        return self._size

    def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read of a closed file")
        if n is None or n < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0 or (self._size is not None and self._pos >= self._size):
            return b""

        def attempt() -> bytes:
            try:
                data = self._read_open(n)
            except BaseException:
                self._drop()
                raise
            if not data and (self._size is None or self._pos < self._size):
                # A body that ends before its length: the connection dropped.
                self._drop()
                if self._size is None:
                    return b""
                raise http.client.IncompleteRead(b"", self._size - self._pos)
            return data

        data = with_retries(self.uri, self.policy, attempt)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._drop()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> _RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.read().splitlines(keepends=True))


class HttpRangeFile(_RetryingReader):
    """An HTTP(S) resource as a seekable file: one streaming GET from the
    current offset (a `Range` request), reopened after a seek or a drop.
    Servers without range support are read from the start and skipped."""

    def __init__(self, uri: str, policy: RetryPolicy | None = None) -> None:
        super().__init__(uri, policy or RetryPolicy())

    def _open_at(self, pos: int) -> http.client.HTTPResponse:
        req = urllib.request.Request(self.uri, headers={"Range": f"bytes={pos}-"} if pos else {})
        resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S)
        total = _total_size(resp, pos)
        if total is not None:
            self._size = total
        if pos and resp.status != 206:
            # No range support: the body starts at 0; skip to `pos`.
            skip = pos
            while skip:
                got = resp.read(min(skip, _CHUNK))
                if not got:
                    resp.close()
                    raise http.client.IncompleteRead(b"", skip)
                skip -= len(got)
        return resp

    def _stat_size(self) -> int | None:
        req = urllib.request.Request(self.uri, method="HEAD")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length is not None else None


def _total_size(resp: http.client.HTTPResponse, pos: int) -> int | None:
    content_range = resp.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = resp.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (pos if resp.status == 206 else 0)


class RetryingStoreFile(_RetryingReader):
    """An object-store object (pyarrow filesystem) as a seekable file whose
    failed reads are retried by reopening the object at the same offset."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, policy: RetryPolicy | None = None) -> None:
        super().__init__(uri, policy or RetryPolicy())
        self._fs, self._path = arrow_fs(uri, storage_options)
        self._size = self.size()

    def _open_at(self, pos: int) -> Any:
        stream = self._fs.open_input_file(self._path)
        if pos:
            stream.seek(pos)
        return stream

    def _stat_size(self) -> int | None:
        import pyarrow.fs as pafs

        info = self._fs.get_file_info(self._path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {self.uri}")
        return info.size


def read_all(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with open_uri(uri, storage_options) as fh:
        return fh.read()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
