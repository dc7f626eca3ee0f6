"""WebDataset tar shards binned like Cosmos-Curate's shard pipeline:

    resolution_{1080|720|lt_720}/aspect_ratio_{W}_{H}/duration_{lo}_{hi}/part_{NNNNNN}/{MMMMMM}.tar

Each clip is one sample: `{clip_id}.mp4`, `{clip_id}.json` (its metadata,
captions and scores) and, when the table has embeddings, `{clip_id}.npy`.
A shard closes when the next clip would take it past the target size. Each
export adds a new part folder to every bin it writes, numbered after the
parts already there, so exporting again into the same folder never
overwrites a shard. Clips with a broken size or rate go to no bin and are
counted. Cosmos-Curate drops clips under 5 s; the default duration bins keep
them in `duration_0_5`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import lance
import numpy as np

from engine.export.exporters.rows import duration_s, jsonable, scan_clips
from engine.export.exporters.target import ExportTarget

# (upper bound of w/h, aspect-ratio name), as in Cosmos-Curate's bins.
ASPECT_BINS = ((0.65, "9_16"), (0.88, "3_4"), (1.16, "1_1"), (1.55, "4_3"), (float("inf"), "16_9"))
DEFAULT_DURATION_BINS = (0.0, 5.0, 10.0, 30.0)
PART_RE = re.compile(r"part_(\d+)$")


def resolution_bin(width: int, height: int) -> str:
    short = min(width, height)
    return "1080" if short >= 1080 else "720" if short >= 720 else "lt_720"


def aspect_bin(width: int, height: int) -> str:
    ratio = width / height
    return next(name for bound, name in ASPECT_BINS if ratio <= bound)


def duration_bin(seconds: float, edges: tuple[float, ...] = DEFAULT_DURATION_BINS) -> str:
    """`{lo}_{hi}` of the half-open bin [lo, hi) holding `seconds`; the last
    bin is `{lo}_inf`."""
    name = None
    for i, lo in enumerate(edges):
        if seconds >= lo:
            hi = edges[i + 1] if i + 1 < len(edges) else None
            name = f"{_num(lo)}_{_num(hi) if hi is not None else 'inf'}"
    if name is None:
        raise ValueError(f"duration {seconds} s is below the first bin edge {edges[0]}")
    return name


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x).replace(".", "p")


def bin_path(row: dict[str, Any], edges: tuple[float, ...] = DEFAULT_DURATION_BINS) -> str:
    w, h = int(row.get("width") or 0), int(row.get("height") or 0)
    if w <= 0 or h <= 0:
        raise ValueError("clip has no size")
    return (f"resolution_{resolution_bin(w, h)}/aspect_ratio_{aspect_bin(w, h)}/"
            f"duration_{duration_bin(duration_s(row), edges)}")


@dataclass
class _BinWriter:
    """The open shard of one bin in this export."""

    target: ExportTarget
    bin_dir: str
    part: int
    shard_bytes: int
    max_clips: int | None
    shards: list[str] = field(default_factory=list)
    _stream: Any = None
    _tar: Any = None
    _bytes: int = 0
    _clips: int = 0

    def write(self, sample: dict[str, Any], size: int) -> None:
        full = self._tar is not None and (self._bytes + size > self.shard_bytes
                                          or (self.max_clips is not None and self._clips >= self.max_clips))
        if full:
            self.close()
        if self._tar is None:
            # Here, not at the top: webdataset imports torch (~2 s), which a
            # curate run without exports or model stages never needs.
            import webdataset as wds

            name = f"{len(self.shards):06d}.tar"
            self.shards.append(self.target.uri(self.bin_dir, f"part_{self.part:06d}", name))
            self._stream = self.target.open(self.bin_dir, f"part_{self.part:06d}", name)
            # Fixed mtime: the same clips make byte-identical shards.
            self._tar = wds.TarWriter(self._stream, mtime=0)
        self._tar.write(sample)
        self._bytes += size
        self._clips += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
        self._tar = self._stream = None
        self._bytes = self._clips = 0


def next_part(target: ExportTarget, bin_dir: str) -> int:
    parts = [int(m.group(1)) for d in target.list_dirs(bin_dir) if (m := PART_RE.match(d))]
    return max(parts, default=-1) + 1


def write_webdataset(clips: lance.LanceDataset, target: ExportTarget, where: str | None, *,
                     chunk_rows: int = 64, shard_size_mb: float = 500, max_clips_per_shard: int | None = None,
                     duration_bins_s: tuple[float, ...] = DEFAULT_DURATION_BINS,
                     embedding: bool = True) -> dict[str, Any]:
    """Shards under `target`; returns the counts, parts and shard paths per bin."""
    edges = tuple(float(e) for e in duration_bins_s)
    if list(edges) != sorted(edges) or len(set(edges)) != len(edges):
        raise ValueError(f"duration bin edges must increase: {list(duration_bins_s)}")
    with_embedding = embedding and "embedding" in clips.schema.names
    shard_bytes = int(float(shard_size_mb) * 1024 * 1024)
    writers: dict[str, _BinWriter] = {}
    counts = {"clips": 0, "unbinned": 0, "no_media": 0}
    try:
        for chunk in scan_clips(clips, where, chunk_rows=chunk_rows):
            for row, blobs in chunk.rows():
                mp4 = blobs.get("mp4")
                if mp4 is None:
                    counts["no_media"] += 1
                    continue
                try:
                    bin_dir = bin_path(row, edges)
                except (ValueError, ZeroDivisionError):
                    counts["unbinned"] += 1
                    continue
                if bin_dir not in writers:
                    writers[bin_dir] = _BinWriter(target, bin_dir, next_part(target, bin_dir), shard_bytes,
                                                  max_clips_per_shard)
                meta = jsonable(row, drop=("embedding",))
                meta["bin"] = bin_dir
                sample: dict[str, Any] = {"__key__": row["clip_id"], "mp4": mp4, "json": meta}
                size = len(mp4)
                if with_embedding and row.get("embedding") is not None:
                    buf = io.BytesIO()
                    np.save(buf, np.asarray(row["embedding"], dtype=np.float32))
                    sample["npy"] = buf.getvalue()
                    size += len(sample["npy"])
                writers[bin_dir].write(sample, size)
                counts["clips"] += 1
    finally:
        for writer in writers.values():
            writer.close()
    return {
        "path": target.uri(),
        **counts,
        "shards": sum(len(w.shards) for w in writers.values()),
        "bins": {b: {"part": w.part, "shards": w.shards} for b, w in sorted(writers.items())},
    }
