"""Planning a curate run: its steps from the stage registry and the config,
the clip table's metadata, and how much of the cluster each step and the
admission limit get."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig

from engine.curate.resume import SETTINGS_KEY, clip_settings, encode
from engine.runtime.stages import StageStep, fit_to_cluster, node_dict, stage_params, worker_slots
from engine.store import outputs
from udfs import registry
from udfs.media.encoders import EncoderChoice, EncoderUnavailable, choose_encoder
from udfs.media.nvdec import DecoderChoice, NvdecUnavailable, choose_decoder
from udfs.schema import CLIP_FILTER_FIELDS, clip_schema
from udfs.spec import StageSpec
from udfs.uris import READ_RETRIES_KEY

# URIs per input chunk (one read task), at most: the unit the ledger admits.
# A quarter of the in-flight limit, so admission stays fine-grained.
MAX_INPUT_CHUNK = 256


@dataclass(frozen=True)
class StagePlan:
    """A curate run's steps by role: the video stages (probe, split),
    transcode (which turns videos into clips), the clip stages after it, and
    the writer once the stream adds one."""

    video: list[StageStep]
    transcode: StageStep
    clip: list[StageStep] = field(default_factory=list)
    writer: StageStep | None = None

    @property
    def steps(self) -> list[StageStep]:
        return [*self.video, self.transcode, *self.clip, *([self.writer] if self.writer else [])]

    def clip_schema(self) -> pa.Schema:
        """The clip table every step's columns make, before its metadata."""
        added = [f for step in [self.transcode, *self.clip] for f in step.extra_fields]
        return clip_schema([*added, *CLIP_FILTER_FIELDS])

    def with_steps(self, steps: list[StageStep]) -> StagePlan:
        """The same roles holding `steps` (as many as `self.steps`, in its order)."""
        if len(steps) != len(self.steps):
            raise ValueError(f"a plan of {len(self.steps)} steps cannot hold {len(steps)}")
        n = len(self.video)
        clip_end = n + 1 + len(self.clip)
        return StagePlan(video=steps[:n], transcode=steps[n], clip=steps[n + 1:clip_end],
                         writer=steps[clip_end] if self.writer else None)

    def fitted(self, cpus: float, gpus: float) -> StagePlan:
        """Every step's pool sized to fit the cluster (`fit_to_cluster`)."""
        return self.with_steps(fit_to_cluster(self.steps, cpus, gpus))


def stage_storage_options(cfg: DictConfig) -> dict[str, Any]:
    """What the stages that read inputs get: the credentials plus the read
    retry policy (`read_retries`)."""
    options = dict(outputs.storage_options(cfg) or {})
    options[READ_RETRIES_KEY] = node_dict(cfg, "read_retries")
    return options


def _dotted(params: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """(the dict holding dotted `key`, its last part); None when a level is missing."""
    *parents, leaf = key.split(".")
    holder: Any = params
    for part in parents:
        holder = holder.get(part) if isinstance(holder, dict) else None
    return (holder if isinstance(holder, dict) else None), leaf


def resolve_models(spec: StageSpec, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the spec's models resolved on the driver: a hub id is
    downloaded once here rather than in every actor, a missing folder or file
    fails the run before any video is decoded, naming it."""
    if not (spec.models or spec.weights or spec.files):
        return params
    import copy

    out = copy.deepcopy(params)
    if spec.models or spec.weights:
        from udfs.models.loading import resolve_model

    for key in spec.models:
        holder, leaf = _dotted(out, key)
        if holder is not None and holder.get(leaf):
            holder[leaf] = resolve_model(str(holder[leaf]), revision=holder.get("revision"))
    for key in spec.weights:  # a weights file or folder as it is, else a hub id
        holder, leaf = _dotted(out, key)
        if holder is not None and holder.get(leaf) and not os.path.exists(str(holder[leaf])):
            holder[leaf] = resolve_model(str(holder[leaf]), revision=holder.get("revision"))
    for key in spec.files:
        holder, leaf = _dotted(out, key)
        path = holder.get(leaf) if holder is not None else None
        if not path or not os.path.exists(str(path)):
            raise FileNotFoundError(f"{spec.node}.{key} not found: {path!r}")
        # Absolute: actors may not share the driver's working directory.
        holder[leaf] = os.path.abspath(str(path))
    return out


def stage_step(cfg: DictConfig, spec: StageSpec, **extra: Any) -> StageStep:
    """The Ray Data step of a registered stage, from its config node: the
    node's keys, the arguments the engine supplies, its models resolved."""
    node = node_dict(cfg, spec.node)
    params = {k: v for k, v in stage_params(node).items() if k not in spec.engine_only}
    for key in spec.supplied:
        if key == "storage_options":
            params[key] = stage_storage_options(cfg)
        elif key == "name":
            params[key] = node["name"]
        elif key in registry.NODES:  # a node that feeds this stage (motion, preview, quality)
            params[key] = registry.prepare_node(key, node_dict(cfg, key))
    params.update(extra)
    params = resolve_models(spec, params)
    return StageStep.from_node(spec.step or spec.node, spec.impl, {"resources": node.get("resources") or {}},
                               params=params, extra_fields=spec.added_columns(params))


def active_specs(cfg: DictConfig, level: str) -> list[StageSpec]:
    """The registered stages of `level` this config turns on, in pipeline order
    (stages without a class of their own, and the frame decode, excluded)."""
    out = []
    for node in registry.NODES:
        data = node_dict(cfg, node)
        spec = registry.spec_for(node, data)
        if spec is not None and spec.level == level and spec.is_on(data):
            out.append(spec)
    return out


def plan_stages(cfg: DictConfig) -> StagePlan:
    """Probe and the split the config names; transcode (with the motion
    scores and previews of the nodes that feed it); then, when a model stage
    needs frames, one decode of each clip for them; then the model stages.

    Models are resolved here, on the driver, before any video is decoded: a
    missing path fails the run at once, and a hub id downloads once. (Model
    loading imports torch, ~2 s: only runs with a model stage pay for it.)"""
    video = [stage_step(cfg, spec) for spec in active_specs(cfg, "video")]
    specs = active_specs(cfg, "clip")
    transcode = stage_step(cfg, next(s for s in specs if s.node == "transcode"))
    # Columns of the nodes that feed transcode (the motion scores) are its own.
    fed = [f for s in specs if s.impl is None for f in s.added_columns(node_dict(cfg, s.node))]
    transcode = dataclasses.replace(transcode, extra_fields=[*transcode.extra_fields, *fed])
    consumers: dict[str, Any] = {}
    model_steps: list[StageStep] = []
    for spec in specs:
        if spec.impl is None or spec.node == "transcode" or spec.serves_frames:
            continue
        model_steps.append(stage_step(cfg, spec))
        if spec.frames:
            holder, leaf = _dotted(node_dict(cfg, spec.frames.split(".")[0]), spec.frames.split(".", 1)[1])
            consumer = model_steps[-1].params.get("consumer", spec.frame_consumer)
            consumers[consumer] = holder.get(leaf) if holder is not None else None
    decode: list[StageStep] = []
    if consumers:
        missing = [name for name, frame_spec in consumers.items() if not frame_spec]
        if missing:
            raise ValueError(f"no frame spec for consumer(s) {missing}: set frames.consumers.aesthetic, "
                             "embed.frames or caption.frames")
        decoder = next(s for s in registry.STAGES if s.serves_frames)
        decode.append(stage_step(cfg, decoder, consumers=consumers, motion=None))
    return StagePlan(video=video, transcode=transcode, clip=[*decode, *model_steps])


def table_metadata(cfg: DictConfig, schema: pa.Schema) -> dict[str, str]:
    """Facts a reader of the clip table needs: which model made the vectors,
    and which settings made the clips (checked when a run resumes)."""
    meta = {"reelsift.split": str(cfg.split.name), SETTINGS_KEY: encode(clip_settings(cfg))}
    if "embedding" in schema.names:
        meta.update({
            "embedding_name": str(cfg.embed.name),
            "embedding_model": str(cfg.embed.model),
            "embedding_dim": str(schema.field("embedding").type.list_size),
        })
        if cfg.embed.get("revision"):
            meta["embedding_model_revision"] = str(cfg.embed.revision)
    return meta


def transcode_batch(step: StageStep, videos: int, cpus: float, gpus: float) -> int | None:
    """Videos per transcode task: the configured batch, but never so large
    that fewer tasks than the cluster's transcode slots would get videos
    (a few videos on a big cluster spread over its nodes)."""
    if not step.batch_size:
        return step.batch_size
    spread = max(1, -(-videos // max(1, worker_slots(step, cpus, gpus))))
    return max(1, min(int(step.batch_size), spread))


def admission(cfg: DictConfig, cpus: float, gpus: float, plan: StagePlan) -> tuple[int, int]:
    """(videos admitted at once, URIs per input chunk).

    A video is in flight from admission to the end of its transcode task
    (never fused with the stage after it). Every stage waits for a full
    batch before it starts, and admitted videos can sit in each of those
    batches at once, so a limit below their sum plus a chunk could stall the
    stream; it never goes below that. Unset, it is also large enough for
    every transcode slot of the cluster to hold a batch at once."""
    configured = cfg.write.get("max_videos_in_flight")
    transcode = plan.transcode
    batch = transcode.batch_size or 1
    upstream = sum(s.batch_size or 1 for s in plan.video)
    if configured:
        wanted = int(configured)
    else:
        wanted = max(int(4 * cpus), upstream + max(1, worker_slots(transcode, cpus, gpus)) * batch)
    chunk = max(1, min(MAX_INPUT_CHUNK, wanted // 4))
    floor = upstream + batch + chunk
    return max(wanted, floor), chunk


def encoder_threads(step: StageStep, node_cpus: float) -> StageStep:
    """`step` with `threads: 0` bounded on a big node.

    x264's own choice is 1.5 threads per core of the node, for each of the
    node's encoders: on a node with many transcode slots that is thousands
    of threads, each holding frames. There, an encoder gets at most 4
    threads per CPU its task holds; a small node keeps x264's choice."""
    if step.params.get("threads") or step.num_gpus > 0:
        return step
    cap = max(2, math.ceil(4 * step.num_cpus))
    if 1.5 * node_cpus <= cap:
        return step
    return dataclasses.replace(step, params={**step.params, "threads": cap})


# Ray hides every GPU from a task that asks for none.
NO_WORKER_GPU = "the transcode workers ask for no GPU (transcode.resources.num_gpus=0), so they see none"


def on_transcode_workers(transcode: StageStep, choose: Any, requested: str) -> Any:
    """`choose(requested)` run where the transcode workers run: a Ray task
    with their GPU share, so it sees the GPU they will see."""
    probe = ray.remote(num_gpus=transcode.num_gpus, num_cpus=0)(choose)
    return ray.get(probe.remote(requested))


def check_encoder(transcode: StageStep) -> EncoderChoice:
    """The encoder the transcode workers will get, found out before any
    video is decoded: probed where they run (a task with their GPU share), so
    `h264_nvenc` on a GPU without NVENC fails here, naming the GPU, and
    `auto` records its fallback. Each worker probes again for itself."""
    requested = str(transcode.params["encoder"])
    if requested == "libx264":
        return choose_encoder(requested)
    if transcode.num_gpus <= 0:
        if requested == "h264_nvenc":
            raise EncoderUnavailable(f"transcode.encoder=h264_nvenc cannot run: {NO_WORKER_GPU}; set "
                                     "transcode.resources.num_gpus (e.g. 0.25), or use libx264")
        return EncoderChoice(requested, "libx264",
                             f"NVENC unusable: {NO_WORKER_GPU}; encoding with libx264 on the CPUs")
    return on_transcode_workers(transcode, choose_encoder, requested)


def _probe_decoder(requested: str) -> DecoderChoice:
    # choose_decoder is lru_cached; Ray takes a plain function.
    return choose_decoder(requested)


def check_decoder(transcode: StageStep) -> DecoderChoice:
    """The source decoder the transcode workers will get, found out as
    `check_encoder` finds the encoder: where they run, before any video is
    decoded. `nvdec` without PyNvVideoCodec or a GPU there fails here;
    `auto` records why it decodes on the CPUs. Each worker chooses again
    for itself, and a video NVDEC cannot take still goes to the CPUs."""
    requested = str(transcode.params["decode"])
    if requested == "cpu":
        return choose_decoder(requested)
    if transcode.num_gpus <= 0:
        if requested == "nvdec":
            raise NvdecUnavailable(f"transcode.decode=nvdec cannot run: {NO_WORKER_GPU}; set "
                                   "transcode.resources.num_gpus (e.g. 0.02), or use decode=auto or cpu")
        return DecoderChoice(requested, "cpu", f"NVDEC unusable: {NO_WORKER_GPU}; decoding on the CPUs")
    return on_transcode_workers(transcode, _probe_decoder, requested)
