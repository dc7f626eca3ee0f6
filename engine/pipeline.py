"""Pipeline assembly: config -> stages -> one Ray Data job -> tables on disk.

The job has two phases. Video stages (probe, split) run over the video table,
which is materialised once: it is small, and both the clip stages and the
video table on disk need it. Clip stages then stream: transcode fans each
video out into clip rows, later stages add columns, and workers write Lance
fragments directly, committed once at the end.
"""

from __future__ import annotations

import importlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf
from ray.data import ActorPoolStrategy

from engine import outputs
from engine.lance_io import FragmentWriter, commit_fragments, create_empty
from engine.ray_session import cluster_resources, ensure_ray
from engine.schema import VIDEO_SCHEMA, clip_schema
from engine.timing import start_clock, timed
from engine.uris import list_inputs

# Implementations by config name, imported only when selected, so a run never
# loads the models (or GPU libraries) of stages it does not use.
SPLITTERS = {
    "fixed_stride": "udfs.split:FixedStrideSplit",
    "transnetv2": "udfs.scenes:TransNetV2Split",
    "content": "udfs.scenes:ContentSplit",
}

# Keys of a stage's config node that are for the engine, not the stage.
ENGINE_KEYS = ("name", "resources", "enabled")


def load_class(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class StageStep:
    """One `map_batches` step: which class, its arguments, its resources."""

    name: str
    cls: type
    params: dict[str, Any]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int | None = 1
    concurrency: int | None = None
    extra_fields: list[pa.Field] = field(default_factory=list)

    @classmethod
    def from_node(cls, name: str, impl: str | type, node: DictConfig | dict, *, params: dict[str, Any] | None = None,
                  extra_fields: list[pa.Field] | None = None) -> StageStep:
        data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        resources = data.get("resources") or {}
        stage_params = {k: v for k, v in data.items() if k not in ENGINE_KEYS}
        if params:
            stage_params.update(params)
        return cls(
            name=name,
            cls=load_class(impl) if isinstance(impl, str) else impl,
            params=stage_params,
            num_cpus=float(resources.get("num_cpus", 1) or 0),
            num_gpus=float(resources.get("num_gpus", 0) or 0),
            batch_size=resources.get("batch_size", 1),
            concurrency=resources.get("concurrency"),
            extra_fields=list(extra_fields or []),
        )


def plan_video_stages(cfg: DictConfig) -> list[StageStep]:
    storage = {"storage_options": _storage_options(cfg)}
    split_name = cfg.split.name
    if split_name not in SPLITTERS:
        raise ValueError(f"unknown split={split_name!r}; choose one of {sorted(SPLITTERS)}")
    return [
        StageStep.from_node("probe", "udfs.probe:ProbeVideos", cfg.probe, params=storage),
        StageStep.from_node(f"split_{split_name}", SPLITTERS[split_name], cfg.split),
    ]


def plan_clip_stages(cfg: DictConfig) -> list[StageStep]:
    preview = OmegaConf.to_container(cfg.preview, resolve=True)
    return [
        StageStep.from_node("transcode", "udfs.transcode:ClipTranscoder", cfg.transcode,
                            params={"preview": preview, "storage_options": _storage_options(cfg)}),
    ]


def _storage_options(cfg: DictConfig) -> dict[str, Any] | None:
    opts = cfg.get("storage_options")
    return OmegaConf.to_container(opts, resolve=True) if opts else None


def _pool(step: StageStep, num_items: int) -> ActorPoolStrategy:
    if step.concurrency:
        return ActorPoolStrategy(size=int(step.concurrency))
    cpus, gpus = cluster_resources()
    if step.num_gpus > 0:
        if gpus < step.num_gpus:
            raise RuntimeError(f"stage {step.name} asks for {step.num_gpus} GPU per worker; the cluster has {gpus}")
        limit = int(gpus // step.num_gpus)
    else:
        limit = int(cpus // step.num_cpus) if step.num_cpus > 0 else int(cpus)
    upper = max(1, min(limit, num_items))
    # Autoscaling from one actor lets concurrent stages share the cluster.
    return ActorPoolStrategy(min_size=1, max_size=upper)


def _apply(ds: ray.data.Dataset, step: StageStep, clock_name: str, num_items: int) -> ray.data.Dataset:
    return ds.map_batches(
        timed(step.cls, step.name, clock_name),
        fn_constructor_kwargs=step.params,
        batch_format="pyarrow",
        batch_size=step.batch_size,
        num_cpus=step.num_cpus,
        num_gpus=step.num_gpus or None,
        compute=_pool(step, num_items),
    )


def _blocks(table: pa.Table, max_blocks: int) -> list[pa.Table]:
    """`table` cut into at most `max_blocks` contiguous, near-equal blocks."""
    n = max(1, min(table.num_rows, max_blocks))
    size = -(-table.num_rows // n)
    return [table.slice(i, size) for i in range(0, table.num_rows, size)] or [table]


def run(cfg: DictConfig, output: str | None = None) -> dict[str, Any]:
    """Run the job described by `cfg`; returns the summary written to disk."""
    started = time.perf_counter()
    output = output or cfg.output
    layout = outputs.OutputLayout(output)
    layout.prepare(overwrite=bool(cfg.overwrite))
    storage_options = _storage_options(cfg)

    uris = list_inputs(
        OmegaConf.to_container(cfg.input, resolve=True) if OmegaConf.is_list(cfg.input) else str(cfg.input),
        root=cfg.input_root,
        extensions=list(cfg.input_extensions),
        storage_options=storage_options,
    )
    if cfg.limit:
        uris = uris[: int(cfg.limit)]
    if not uris:
        raise FileNotFoundError(f"no input videos found under {cfg.input}")

    video_steps = plan_video_stages(cfg)
    clip_steps = plan_clip_stages(cfg)
    final_clip_schema = clip_schema(f for step in clip_steps for f in step.extra_fields)

    ensure_ray(cfg.ray)
    clock, clock_name = start_clock(uuid.uuid4().hex[:12])
    try:
        ray_start = time.perf_counter()
        # Blocks are cut here rather than by `repartition`, whose shuffle tasks
        # need CPUs that the stage actors already hold on a small machine.
        videos_ds = ray.data.from_arrow(_blocks(pa.table({"uri": uris}), 256))
        for step in video_steps:
            videos_ds = _apply(videos_ds, step, clock_name, len(uris))
        videos_ds = videos_ds.materialize()
        video_table = pa.concat_tables(ray.get(videos_ds.to_arrow_refs()), promote_options="default")

        # One video per block, so videos spread over the transcode actors.
        clips_ds = ray.data.from_arrow(_blocks(video_table, 10_000))
        for step in clip_steps:
            clips_ds = _apply(clips_ds, step, clock_name, len(uris))
        empty = create_empty(layout.clips, final_clip_schema, storage_options)
        writer = StageStep.from_node("write", FragmentWriter, cfg.write, params={
            "uri": layout.clips, "schema": final_clip_schema, "storage_options": storage_options})
        fragments = [row["fragment"] for row in _apply(clips_ds, writer, clock_name, len(uris)).take_all()]
        clips = commit_fragments(layout.clips, fragments, empty.version, storage_options)
        pipeline_s = time.perf_counter() - ray_start
        stage_times = ray.get(clock.snapshot.remote())
    finally:
        ray.kill(clock)

    videos = outputs.write_video_table(video_table, clips, layout, VIDEO_SCHEMA, storage_options)
    exports = outputs.write_exports(cfg.export, clips, layout)
    summary = outputs.summarise(
        videos=videos, clips=clips, stage_times=stage_times, pipeline_s=pipeline_s,
        total_s=time.perf_counter() - started, config=OmegaConf.to_container(cfg, resolve=True), exports=exports,
    )
    outputs.write_summary(summary, layout)
    return summary
