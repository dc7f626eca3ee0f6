"""Where an export writes: a folder on local disk or under an object-store
prefix, written through pyarrow's filesystems so both behave the same."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from udfs.uris import arrow_fs, normalise, scheme_of


@dataclass
class ExportTarget:
    """Files under `root` (a local path or `s3://bucket/prefix`)."""

    root: str
    storage_options: dict[str, Any] | None = None
    fs: pafs.FileSystem = field(init=False)
    base: str = field(init=False)

    def __post_init__(self) -> None:
        if scheme_of(self.root):
            self.fs, self.base = arrow_fs(self.root, self.storage_options)
            self.base = self.base.rstrip("/")
        else:
            self.root = normalise(self.root)
            self.fs, self.base = pafs.LocalFileSystem(), self.root
            self.fs.create_dir(self.base, recursive=True)

    @property
    def local(self) -> bool:
        return not scheme_of(self.root)

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root."""
        return posixpath.join(self.base, *parts)

    def uri(self, *parts: str) -> str:
        """What a user opens: a local path or the object-store URI."""
        return posixpath.join(self.root.rstrip("/"), *parts)

    def open(self, *parts: str) -> Any:
        """A writable stream for the file at `parts` (parent folders made)."""
        path = self.path(*parts)
        if self.local:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
        return self.fs.open_output_stream(path)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open(*parts) as fh:
            fh.write(data)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, default=str).encode(), *parts)

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the folders directly under `parts` ([] if none)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    def remove_dir(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
