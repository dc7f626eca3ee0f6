"""Training loaders straight from a curated clip table.

    from engine.training import ClipDataset            # a torch IterableDataset
    from engine.training import ray_dataset            # a Ray Data dataset of samples

`dataset` holds the torch path, `ray_data` the Ray Data path, and
`captions` the caption a sample carries; which frames it holds is a
`udfs.media.frames.FrameSpec`, the clip stages' vocabulary. The Ray Data
names load on first use, so a torch-only loader never imports Ray.
"""

from __future__ import annotations

from typing import Any

from engine.training.dataset import ClipDataset, ClipSampler, open_clips, worker_context

__all__ = ["ClipDataset", "ClipSampler", "SampleCollate", "open_clips", "ray_dataset", "worker_context"]


def __getattr__(name: str) -> Any:
    if name in ("ray_dataset", "SampleCollate"):
        from engine.training import ray_data

        return getattr(ray_data, name)
    raise AttributeError(f"module 'engine.training' has no attribute {name!r}")
