"""Pipeline assembly: config -> stages -> one Ray Data job -> tables on disk.

The job has two phases. Video stages (probe, split) run over the video table,
which is materialised once: it is small, and both the clip stages and the
video table on disk need it. Clip stages then stream: transcode fans each
video out into clip rows, later stages add columns, and workers write Lance
fragments directly, committed once at the end.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from engine import outputs
from engine.lance_io import FragmentWriter, commit_fragments, create_empty
from engine.ray_session import cluster_resources, ensure_ray
from engine.schema import (
    CLIP_AESTHETIC_FIELDS,
    CLIP_CAPTION_FIELDS,
    CLIP_FILTER_FIELDS,
    CLIP_MOTION_FIELDS,
    VIDEO_SCHEMA,
    clip_embedding_fields,
    clip_schema,
)
from engine.timing import start_clock, timed
from engine.uris import lance_storage_options, list_inputs, scheme_of
from udfs.analysis.filtering import finalize_filter_columns

log = logging.getLogger(__name__)

# Implementations by config name, imported only when selected, so a run never
# loads the models (or GPU libraries) of stages it does not use.
SPLITTERS = {
    "fixed_stride": "udfs.split.fixed_stride:FixedStrideSplit",
    "transnetv2": "udfs.split.scenes:TransNetV2Split",
    "content": "udfs.split.scenes:ContentSplit",
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
    # Stateless stages run as plain Ray tasks: no actor start-up, and they
    # reuse Ray's warm workers. Stages that load models keep an actor pool.
    actors: bool = True
    # Items this stage sees at most in parallel (videos for video-level
    # stages); None when it works on clips, whose count is not known upfront.
    max_parallel: int | None = None
    extra_fields: list[pa.Field] = field(default_factory=list)

    @classmethod
    def from_node(cls, name: str, impl: str | type, node: DictConfig | dict, *, params: dict[str, Any] | None = None,
                  extra_fields: list[pa.Field] | None = None, max_parallel: int | None = None) -> StageStep:
        data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        resources = data.get("resources") or {}
        stage_params = _params(data)
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
            actors=bool(resources.get("actors", True)),
            max_parallel=max_parallel,
            extra_fields=list(extra_fields or []),
        )


def plan_video_stages(cfg: DictConfig, num_videos: int) -> list[StageStep]:
    storage = {"storage_options": _storage_options(cfg)}
    split_name = cfg.split.name
    if split_name not in SPLITTERS:
        raise ValueError(f"unknown split={split_name!r}; choose one of {sorted(SPLITTERS)}")
    split_params: dict[str, Any] = {}
    if "storage_options" in cfg.split:
        split_params.update(storage)
    weights = cfg.split.get("weights")
    if weights and not os.path.exists(str(weights)):
        # A hub id: download once here rather than in every actor.
        from udfs.models.loading import resolve_model

        split_params["weights"] = resolve_model(str(weights), revision=cfg.split.get("revision"))
    return [
        StageStep.from_node("probe", "udfs.media.probe:ProbeVideos", cfg.probe, params=storage, max_parallel=num_videos),
        StageStep.from_node(f"split_{split_name}", SPLITTERS[split_name], cfg.split, params=split_params,
                            max_parallel=num_videos),
    ]


def _node(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = cfg.get(key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _params(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ENGINE_KEYS}


def _require_file(path: str | None, what: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


def plan_clip_stages(cfg: DictConfig, num_videos: int) -> list[StageStep]:
    """Transcode, then (when enabled) one decode of each clip for motion and
    frames, then the model stages that consume those frames.

    Models are resolved here, on the driver, before any video is decoded: a
    missing path fails the run at once, and a hub id downloads once."""
    from udfs.models.loading import resolve_model, resolve_stage_models

    preview = _node(cfg, "preview")
    steps = [
        # Transcode works per video; the stages after it see clips.
        StageStep.from_node("transcode", "udfs.media.transcode:ClipTranscoder", cfg.transcode,
                            params={"preview": preview, "storage_options": _storage_options(cfg)},
                            max_parallel=num_videos),
    ]
    motion, aesthetic, embed, caption = (_node(cfg, k) for k in ("motion", "aesthetic", "embed", "caption"))
    frames = _node(cfg, "frames")
    consumers_cfg = dict(frames.get("consumers") or {})
    consumers: dict[str, Any] = {}
    model_steps: list[StageStep] = []

    if aesthetic.get("enabled"):
        params = _params(aesthetic)
        params["model"] = resolve_model(str(params["model"]), revision=params.get("revision"))
        # Absolute: actors may not share the driver's working directory.
        params["head"] = os.path.abspath(_require_file(params.get("head"), "aesthetic head (aesthetic.head)"))
        consumers[params.get("consumer", "aesthetic")] = consumers_cfg.get("aesthetic")
        model_steps.append(StageStep.from_node("aesthetic", "udfs.analysis.aesthetic:AestheticScorer", aesthetic, params=params,
                                               extra_fields=CLIP_AESTHETIC_FIELDS))
    if embed.get("name", "none") != "none":
        from udfs.models.embed import EMBED_STAGES, embedding_dim

        if embed["name"] not in EMBED_STAGES:
            raise ValueError(f"unknown embed={embed['name']!r}; choose one of {['none', *EMBED_STAGES]}")
        params = resolve_stage_models(_params(embed))
        params["name"] = embed["name"]
        consumers["embed"] = embed.get("frames")
        dim = embedding_dim(embed["name"], params["model"])
        model_steps.append(StageStep.from_node("embed", EMBED_STAGES[embed["name"]], embed, params=params,
                                               extra_fields=clip_embedding_fields(dim)))
    if caption.get("name", "none") != "none":
        from udfs.models.caption import CAPTION_STAGES

        if caption["name"] not in CAPTION_STAGES:
            raise ValueError(f"unknown caption={caption['name']!r}; choose one of {['none', *CAPTION_STAGES]}")
        params = resolve_stage_models(_params(caption))
        consumers["caption"] = caption.get("frames")
        model_steps.append(StageStep.from_node("caption", CAPTION_STAGES[caption["name"]], caption, params=params,
                                               extra_fields=CLIP_CAPTION_FIELDS))

    motion_on = motion.get("mode", "disable") != "disable"
    if motion_on or consumers:
        missing = [name for name, spec in consumers.items() if not spec]
        if missing:
            raise ValueError(f"no frame spec for consumer(s) {missing}: set frames.consumers.aesthetic, "
                             "embed.frames or caption.frames")
        analysis = StageStep.from_node(
            "clip_analysis", "udfs.analysis.clip_analysis:ClipAnalysis", cfg.frames,
            params={"consumers": consumers, "motion": motion},
            extra_fields=CLIP_MOTION_FIELDS if motion_on else [],
        )
        steps.append(analysis)
    return steps + model_steps


def _storage_options(cfg: DictConfig) -> dict[str, Any] | None:
    opts = cfg.get("storage_options")
    return OmegaConf.to_container(opts, resolve=True) if opts else None


def _pool(step: StageStep, cpus: float, gpus: float) -> ActorPoolStrategy:
    if step.concurrency:
        return ActorPoolStrategy(size=int(step.concurrency))
    if step.num_gpus > 0:
        limit = int(gpus // step.num_gpus)
    else:
        limit = int(cpus // step.num_cpus) if step.num_cpus > 0 else int(cpus)
    upper = max(1, min(limit, step.max_parallel or limit))
    # Autoscaling from one actor lets concurrent stages share the cluster.
    return ActorPoolStrategy(min_size=1, max_size=upper)


def check_gpus(steps: list[StageStep], gpus: float) -> None:
    """A stage configured for GPUs must not silently run on a CPU-only cluster."""
    for step in steps:
        if step.num_gpus > 0 and gpus <= 0:
            raise RuntimeError(f"stage {step.name} asks for {step.num_gpus} GPU per worker but the cluster has none; "
                               f"set {step.name}.resources.num_gpus=0 to run it on CPU")


def fit_to_cluster(steps: list[StageStep], cpus: float, gpus: float) -> list[StageStep]:
    """Scale per-worker CPU/GPU requests so every stage's smallest pool fits
    the cluster at once.

    Streaming stages run concurrently; if their minimum pools ask for more
    than the cluster has, downstream actors can hold the CPUs while upstream
    ones wait for them, and the job deadlocks. Requests are logical, so on a
    small machine this means stages share cores; on a big cluster it is a
    no-op."""
    def need(kind: str) -> float:
        return sum(getattr(s, kind) * (s.concurrency or 1) for s in steps)

    scaled = []
    cpu_factor = min(1.0, 0.95 * cpus / need("num_cpus")) if need("num_cpus") else 1.0
    gpu_factor = min(1.0, gpus / need("num_gpus")) if need("num_gpus") else 1.0
    for step in steps:
        scaled.append(dataclasses.replace(step, num_cpus=step.num_cpus * cpu_factor,
                                          num_gpus=step.num_gpus * gpu_factor))
    if cpu_factor < 1.0 or gpu_factor < 1.0:
        log.info("stage resources scaled to fit the cluster (CPU x%.2f, GPU x%.2f)", cpu_factor, gpu_factor)
    return scaled


def _call_stage(batch: pa.Table, *, stage: type, params: dict[str, Any]) -> pa.Table:
    """Task-mode entry point: build the (cheap, stateless) stage per batch."""
    return stage(**params)(batch)


def _apply(ds: ray.data.Dataset, step: StageStep, clock_name: str, cpus: float, gpus: float) -> ray.data.Dataset:
    common = dict(batch_format="pyarrow", batch_size=step.batch_size, num_cpus=step.num_cpus,
                  num_gpus=step.num_gpus or None)
    stage = timed(step.cls, step.name, clock_name)
    if not step.actors:
        compute = TaskPoolStrategy(size=int(step.concurrency)) if step.concurrency else None
        return ds.map_batches(_call_stage, fn_kwargs={"stage": stage, "params": step.params}, compute=compute,
                              **common)
    return ds.map_batches(stage, fn_constructor_kwargs=step.params, compute=_pool(step, cpus, gpus), **common)


def table_metadata(cfg: DictConfig, schema: pa.Schema) -> dict[str, str]:
    """Facts a reader of the clip table needs: which model made the vectors."""
    meta = {"reelsift.split": str(cfg.split.name)}
    if "embedding" in schema.names:
        meta.update({
            "embedding_name": str(cfg.embed.name),
            "embedding_model": str(cfg.embed.model),
            "embedding_dim": str(schema.field("embedding").type.list_size),
        })
        if cfg.embed.get("revision"):
            meta["embedding_model_revision"] = str(cfg.embed.revision)
    return meta


def redacted_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config for summary.json, without credentials."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if config.get("storage_options"):
        config["storage_options"] = {k: "<redacted>" for k in config["storage_options"]}
    return config


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
    lance_options = lance_storage_options(storage_options)

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

    if cfg.export.get("nemo_layout") and scheme_of(str(output)):
        raise ValueError("export.nemo_layout writes plain files and needs a local output directory")
    video_steps = plan_video_stages(cfg, len(uris))
    clip_steps = plan_clip_stages(cfg, len(uris))
    final_clip_schema = clip_schema([*(f for step in clip_steps for f in step.extra_fields), *CLIP_FILTER_FIELDS])
    final_clip_schema = final_clip_schema.with_metadata(table_metadata(cfg, final_clip_schema))

    ensure_ray(cfg.ray)
    clock, clock_name = start_clock(uuid.uuid4().hex[:12])
    try:
        ray_start = time.perf_counter()
        cpus, gpus = cluster_resources()
        check_gpus([*video_steps, *clip_steps], gpus)
        # Blocks are cut here rather than by `repartition`, whose shuffle tasks
        # need CPUs that the stage actors already hold on a small machine.
        videos_ds = ray.data.from_arrow(_blocks(pa.table({"uri": uris}), 256))
        for step in fit_to_cluster(video_steps, cpus, gpus):
            videos_ds = _apply(videos_ds, step, clock_name, cpus, gpus)
        videos_ds = videos_ds.materialize()
        video_table = pa.concat_tables(ray.get(videos_ds.to_arrow_refs()), promote_options="default")

        # One video per block, so videos spread over the transcode actors.
        clips_ds = ray.data.from_arrow(_blocks(video_table, 10_000))
        empty = create_empty(layout.clips, final_clip_schema, lance_options, overwrite=bool(cfg.overwrite))
        writer = StageStep.from_node("write", FragmentWriter, cfg.write, params={
            "uri": layout.clips, "schema": final_clip_schema, "storage_options": lance_options})
        *clip_steps, writer = fit_to_cluster([*clip_steps, writer], cpus, gpus)
        for step in clip_steps:
            clips_ds = _apply(clips_ds, step, clock_name, cpus, gpus)
        # Every good clip passes unless a filter said otherwise; error rows get passed=null.
        clips_ds = clips_ds.map_batches(finalize_filter_columns, batch_format="pyarrow", batch_size=None)
        fragments = [row["fragment"] for row in _apply(clips_ds, writer, clock_name, cpus, gpus).take_all()]
        clips = commit_fragments(layout.clips, fragments, empty.version, lance_options)
        pipeline_s = time.perf_counter() - ray_start
        stage_times = ray.get(clock.snapshot.remote())
    finally:
        ray.kill(clock)

    stats = outputs.clip_stats(clips)
    videos = outputs.write_video_table(video_table, stats, layout, VIDEO_SCHEMA, lance_options)
    exports = outputs.write_exports(cfg.export, clips, layout, storage_options)
    summary = outputs.summarise(
        videos=videos, stats=stats, stage_times=stage_times, pipeline_s=pipeline_s,
        total_s=time.perf_counter() - started, config=redacted_config(cfg), exports=exports,
    )
    outputs.write_summary(summary, layout, storage_options)
    return summary
