"""Input listing and opening, by URI.

Everything downstream holds URIs (``/abs/path.mp4``, ``file://``, ``s3://``,
``http(s)://``), never open handles, so rows can move between workers and
machines. Local paths are normalised to absolute paths.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlparse

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


def list_inputs(
    spec: str | list[str],
    *,
    root: str | None = None,
    extensions: frozenset[str] | list[str] = VIDEO_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Expand an input spec into a sorted, de-duplicated list of video URIs.

    ``spec`` is a file, a directory (recursive, filtered by extension), a glob,
    a ``.json`` file list (entries joined to ``root``), an ``s3://`` prefix or
    object, an ``http(s)://`` URL, or a list of any of these. A file named
    explicitly is kept whatever its extension: the user asked for it, and if it
    is not a video the probe records why.
    """
    extensions = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    specs = [spec] if isinstance(spec, str) else list(spec)
    found: list[str] = []
    for item in specs:
        item = str(item)
        scheme = scheme_of(item)
        if item.lower().endswith(".json"):
            found.extend(_expand_json_list(item, root, storage_options))
        elif scheme in HTTP_SCHEMES:
            found.append(item)
        elif scheme in REMOTE_SCHEMES:
            found.extend(_list_remote(item, extensions, storage_options))
        else:
            path = normalise(_join(root or "", item) if root and not os.path.isabs(item) else item)
            if os.path.isdir(path):
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    found.extend(
                        os.path.join(dirpath, f) for f in sorted(filenames) if has_video_extension(f, extensions)
                    )
            elif os.path.isfile(path):
                found.append(path)
            elif glob.has_magic(path):
                found.extend(
                    p for p in sorted(glob.glob(path, recursive=True)) if os.path.isfile(p) and has_video_extension(p, extensions)
                )
            else:
                raise FileNotFoundError(f"input not found: {item}")
    return sorted(dict.fromkeys(found))


def open_uri(uri: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A seekable binary file object for any supported URI."""
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return open(normalise(uri), "rb")
    if scheme in HTTP_SCHEMES:
        return _HttpFile(uri)
    fs, path = arrow_fs(uri, storage_options)
    return fs.open_input_file(path)


def av_source(uri: str, storage_options: dict[str, Any] | None = None) -> str | IO[bytes]:
    """What to hand ``av.open``: FFmpeg reads local paths and HTTP itself
    (with range requests); object stores go through a file object."""
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return normalise(uri)
    if scheme in HTTP_SCHEMES:
        return uri
    return open_uri(uri, storage_options)


def size_of(uri: str, storage_options: dict[str, Any] | None = None) -> int | None:
    scheme = scheme_of(uri)
    if not scheme or scheme == "file":
        return os.path.getsize(normalise(uri))
    if scheme in HTTP_SCHEMES:
        import urllib.request

        req = urllib.request.Request(uri, method="HEAD")
        with urllib.request.urlopen(req, timeout=30) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length is not None else None
    fs, path = arrow_fs(uri, storage_options)
    return fs.get_file_info(path).size


class _HttpFile:
    """Minimal read-only HTTP file (the whole body, fetched once), for JSON
    lists and other small reads; video decoding goes through FFmpeg's own
    HTTP client, which does range requests."""

    def __init__(self, url: str) -> None:
        import urllib.request

        with urllib.request.urlopen(url, timeout=60) as resp:
            self._data = resp.read()
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._data = b""

    def __enter__(self) -> _HttpFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._data.splitlines(keepends=True))
