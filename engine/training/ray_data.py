"""The clip table's training samples as a Ray Data pipeline, for Ray Train.

`ray_dataset(OUT, ...)` is `ray.data.read_lance` with `ClipDataset`'s filter
(the curated view by default), then `ClipSampleDecoder` on an actor pool:
the same sampler, so the same frames, captions and columns for the same seed
and epoch. Iterate it with `iter_torch_batches(collate_fn=SampleCollate())`
(string columns stay lists), or hand it to a `TorchTrainer` and read
`ray.train.get_dataset_shard(...)` in each worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from engine.training.captions import resolve_caption
from udfs.media.frames import FrameSpec, SkipClip
from engine.training.dataset import COUNT_KEYS, ClipSampler, clips_uri, open_clips
from udfs.uris import lance_storage_options
from engine.store.views import reader_where

log = logging.getLogger(__name__)

# Sample fields that are arrays of the same shape in every sample of a batch.
ARRAY_FIELDS = ("frames", "frame_indices", "caption_frames")


class ClipSampleDecoder:
    """Ray Data UDF: rows read by `read_lance` (with `_rowid`) -> decoded
    samples. Clips the sampler skips (too short, broken media, no caption)
    are left out of the batch, counted and logged."""

    def __init__(self, *, uri: str, version: int, storage_options: dict[str, str] | None, spec: FrameSpec,
                 caption: str | None, columns: Sequence[str], seed: int, decode_threads: int, epoch: int = 0) -> None:
        self.uri, self.version, self.storage_options = uri, version, storage_options
        self.sampler = ClipSampler(spec=spec, caption=caption, columns=columns, seed=seed,
                                   decode_threads=decode_threads)
        self.epoch = epoch
        self.counts = dict.fromkeys(COUNT_KEYS, 0)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        table = open_clips(self.uri, self.version, self.storage_options)
        ids = [int(i) for i in batch.column("_rowid").to_pylist()]
        rows = batch.drop_columns(["_rowid"]).to_pylist()
        blobs = table.take_blobs("mp4", ids=ids) if ids else []
        before = dict(self.counts)
        spec = self.sampler.spec
        # Each clip decodes straight into its slot of the batch's frames.
        frames = torch.empty((len(ids), spec.count, 3, *spec.output_size), dtype=torch.uint8) if spec.output_size else None
        samples = []
        for row_id, row, blob in zip(ids, rows, blobs):
            out = None if frames is None else frames[len(samples)]
            try:
                samples.append(self.sampler.sample(row, blob, epoch=self.epoch, row_id=row_id, counts=self.counts,
                                                   out=out))
            except SkipClip:
                continue
            except Exception as exc:  # noqa: BLE001 - a broken clip is counted and skipped, the run goes on
                self.counts["decode_errors"] += 1
                log.warning("skipping clip %s: %s: %s", row.get("clip_id"), type(exc).__name__, exc)
        skipped = {k: self.counts[k] - before[k] for k in COUNT_KEYS if k != "samples" and self.counts[k] != before[k]}
        if skipped:
            log.warning("clip sampler skipped %s of %d clips in a batch (totals so far %s)", skipped, len(ids),
                        self.counts)
        columns = self.columns_of(samples, skip_frames=frames is not None)
        if frames is not None:
            columns["frames"] = frames[: len(samples)].numpy()
        return columns

    def columns_of(self, samples: list[dict[str, Any]], skip_frames: bool = False) -> dict[str, np.ndarray]:
        names = ["clip_id", "frame_indices"] if skip_frames else ["clip_id", "frames", "frame_indices"]
        if self.sampler.caption is not None:
            names += ["caption", "caption_frames"]
        names += list(self.sampler.columns)
        out: dict[str, np.ndarray] = {}
        for name in names:
            values = [s[name].numpy() if isinstance(s[name], torch.Tensor) else s[name] for s in samples]
            if values and all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
                out[name] = np.stack(values)
            elif not values and name in ARRAY_FIELDS:
                out[name] = np.zeros((0,), dtype=np.uint8 if name == "frames" else np.int64)
            else:
                column = np.empty(len(values), dtype=object)
                column[:] = values
                out[name] = column
        return out


class SampleCollate(NumpyBatchCollateFn):
    """`iter_torch_batches` collate: numeric arrays become tensors, strings
    (clip ids, captions) stay lists, as torch's default collate does."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, values in batch.items():
            if values.dtype.kind in "biuf":
                values = np.ascontiguousarray(values)
                out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
            elif values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
                out[name] = [torch.from_numpy(v) for v in values]
            else:
                out[name] = [v.item() if isinstance(v, np.generic) else v for v in values]
        return out


def ray_dataset(
    output: str,
    *,
    where: str | None = None,
    num_frames: int = 16,
    fps: float | None = None,
    frame_stride: int | None = None,
    size: int | tuple[int, int] | None = None,
    columns: Sequence[str] = (),
    caption: str | None = "auto",
    short_clips: str = "skip",
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    version: int | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 8,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus: float = 1.0,
    decode_threads: int = 1,
    include_rejected: bool = False,
) -> ray.data.Dataset:
    """The clip samples as a Ray Data dataset; arguments as `ClipDataset`'s.
    `shuffle` shuffles the rows (seeded by seed + epoch) before decoding;
    `concurrency` sizes the decoder actor pool (default: 1 up to the
    cluster's CPUs)."""
    uri = clips_uri(output)
    lance_opts = lance_storage_options(storage_options)
    spec = FrameSpec.window(num_frames, fps=fps, frame_stride=frame_stride, size=size, short_clips=short_clips)
    table = open_clips(uri, version, lance_opts)
    caption = resolve_caption(caption, table.schema.names)
    sampler = ClipSampler(spec=spec, caption=caption, columns=columns, seed=seed)
    version = int(table.version)
    flt = reader_where(where, table.schema, uri, lance_opts, include_rejected)
    scanner: dict[str, Any] = {"with_row_id": True}
    if flt is not None:
        scanner["filter"] = flt  # pushed down to Lance, as ClipDataset's
    ds = ray.data.read_lance(uri, version=version, columns=sampler.read_columns(table.schema),
                             storage_options=lance_opts, scanner_options=scanner)
    if shuffle:
        ds = ds.random_shuffle(seed=seed + epoch)
    if concurrency is None:
        concurrency = (1, max(1, int(ray.cluster_resources().get("CPU", 1.0) // max(num_cpus, 1e-3))))
    pool = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    return ds.map_batches(
        ClipSampleDecoder,
        fn_constructor_kwargs={"uri": uri, "version": version, "storage_options": lance_opts, "spec": spec,
                               "caption": caption, "columns": tuple(columns), "seed": seed,
                               "decode_threads": decode_threads, "epoch": epoch},
        batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_cpus=num_cpus,
    )
