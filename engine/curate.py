"""The curate task (the default): input videos -> one Ray Data job ->
`clips.lance`, `videos.lance` and `summary.json` in the output folder.

The job has two phases. Video stages (probe, split) run over the video table,
which is materialised once: it is small, and both the clip stages and the
video table on disk need it. Clip stages then stream: transcode fans each
video out into clip rows, later stages add columns, and workers write Lance
fragments directly, committed once at the end.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf

from engine import outputs
from engine.export import check_export_target, write_exports
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
from engine.stages import StageStep, apply_stage, blocks, check_gpus, fit_to_cluster, node_dict, stage_params
from engine.timing import start_clock
from engine.uris import lance_storage_options, list_inputs
from udfs.analysis.filtering import finalize_filter_columns

log = logging.getLogger(__name__)

# Implementations by config name, imported only when selected, so a run never
# loads the models (or GPU libraries) of stages it does not use.
SPLITTERS = {
    "fixed_stride": "udfs.split.fixed_stride:FixedStrideSplit",
    "transnetv2": "udfs.split.scenes:TransNetV2Split",
    "content": "udfs.split.scenes:ContentSplit",
}

def plan_video_stages(cfg: DictConfig, num_videos: int) -> list[StageStep]:
    storage = {"storage_options": outputs.storage_options(cfg)}
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


def _require_file(path: str | None, what: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


def plan_clip_stages(cfg: DictConfig, num_videos: int) -> list[StageStep]:
    """Transcode (with the motion scores), then (when a model stage needs
    frames) one decode of each clip for them, then the model stages.

    Models are resolved here, on the driver, before any video is decoded: a
    missing path fails the run at once, and a hub id downloads once. (Model
    loading imports torch, ~2 s: only runs with a model stage pay for it.)"""
    preview = node_dict(cfg, "preview")
    motion, aesthetic, embed, caption = (node_dict(cfg, k) for k in ("motion", "aesthetic", "embed", "caption"))
    motion_on = motion.get("mode", "disable") != "disable"
    steps = [
        # Transcode works per video; the stages after it see clips. It scores
        # motion from the clips' own packets (no second decode of each clip).
        StageStep.from_node("transcode", "udfs.media.transcode:ClipTranscoder", cfg.transcode,
                            params={"preview": preview, "motion": motion if motion_on else None,
                                    "storage_options": outputs.storage_options(cfg)},
                            extra_fields=CLIP_MOTION_FIELDS if motion_on else [], max_parallel=num_videos),
    ]
    frames = node_dict(cfg, "frames")
    consumers_cfg = dict(frames.get("consumers") or {})
    consumers: dict[str, Any] = {}
    model_steps: list[StageStep] = []

    if aesthetic.get("enabled"):
        from udfs.models.loading import resolve_model

        params = stage_params(aesthetic)
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
        from udfs.models.loading import resolve_stage_models

        params = resolve_stage_models(stage_params(embed))
        params["name"] = embed["name"]
        consumers["embed"] = embed.get("frames")
        dim = embedding_dim(embed["name"], params["model"])
        model_steps.append(StageStep.from_node("embed", EMBED_STAGES[embed["name"]], embed, params=params,
                                               extra_fields=clip_embedding_fields(dim)))
    if caption.get("name", "none") != "none":
        from udfs.models.caption import CAPTION_STAGES

        if caption["name"] not in CAPTION_STAGES:
            raise ValueError(f"unknown caption={caption['name']!r}; choose one of {['none', *CAPTION_STAGES]}")
        from udfs.models.loading import resolve_stage_models

        params = resolve_stage_models(stage_params(caption))
        consumers["caption"] = caption.get("frames")
        model_steps.append(StageStep.from_node("caption", CAPTION_STAGES[caption["name"]], caption, params=params,
                                               extra_fields=CLIP_CAPTION_FIELDS))

    if consumers:
        missing = [name for name, spec in consumers.items() if not spec]
        if missing:
            raise ValueError(f"no frame spec for consumer(s) {missing}: set frames.consumers.aesthetic, "
                             "embed.frames or caption.frames")
        analysis = StageStep.from_node(
            "clip_analysis", "udfs.analysis.clip_analysis:ClipAnalysis", cfg.frames,
            params={"consumers": consumers, "motion": None},
        )
        steps.append(analysis)
    return steps + model_steps


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Curate `cfg.input` into `cfg.output`; returns the summary written to disk."""
    started = time.perf_counter()
    output = str(cfg.output)
    layout = outputs.OutputLayout(output)
    layout.prepare(overwrite=bool(cfg.overwrite))
    storage_options = outputs.storage_options(cfg)
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

    # Checked before any work, not after hours of transcoding.
    check_export_target(cfg.export, output)
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
        videos_ds = ray.data.from_arrow(blocks(pa.table({"uri": uris}), 256))
        for step in fit_to_cluster(video_steps, cpus, gpus):
            videos_ds = apply_stage(videos_ds, step, clock_name, cpus, gpus)
        videos_ds = videos_ds.materialize()
        video_table = pa.concat_tables(ray.get(videos_ds.to_arrow_refs()), promote_options="default")

        # One video per block, so videos spread over the transcode actors.
        clips_ds = ray.data.from_arrow(blocks(video_table, 10_000))
        empty = create_empty(layout.clips, final_clip_schema, lance_options, overwrite=bool(cfg.overwrite))
        writer = StageStep.from_node("write", FragmentWriter, cfg.write, params={
            "uri": layout.clips, "schema": final_clip_schema, "storage_options": lance_options})
        *clip_steps, writer = fit_to_cluster([*clip_steps, writer], cpus, gpus)
        for step in clip_steps:
            clips_ds = apply_stage(clips_ds, step, clock_name, cpus, gpus)
        # Every good clip passes unless a filter said otherwise; error rows get passed=null.
        clips_ds = clips_ds.map_batches(finalize_filter_columns, batch_format="pyarrow", batch_size=None)
        fragments = [row["fragment"] for row in apply_stage(clips_ds, writer, clock_name, cpus, gpus).take_all()]
        clips = commit_fragments(layout.clips, fragments, empty.version, lance_options)
        pipeline_s = time.perf_counter() - ray_start
        stage_times = ray.get(clock.snapshot.remote())
    finally:
        ray.kill(clock)

    stats = outputs.clip_stats(clips)
    videos = outputs.write_video_table(video_table, stats, layout, VIDEO_SCHEMA, lance_options)
    exports = write_exports(cfg.export, clips, layout, storage_options)
    summary = outputs.summarise(
        videos=videos, stats=stats, stage_times=stage_times, pipeline_s=pipeline_s,
        total_s=time.perf_counter() - started, config=outputs.redacted_config(cfg), exports=exports,
    )
    outputs.write_summary(summary, layout, storage_options)
    return summary
