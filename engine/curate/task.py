"""The curate task (the default): input videos -> one streaming Ray Data job
-> `clips.lance`, `videos.lance` and `summary.json` in the output folder.

One stream, end to end: the driver lists the inputs into the object store in
chunks (skipping videos the output already holds); each chunk enters when
the ledger admits it (a bounded number of videos in flight); probe and split
feed transcode as they finish; the clip stages add columns; writers write
Lance fragments, one per video per batch. The driver commits complete videos
as they finish (`engine.curate.commits`): the first as soon as one is complete, then
every `write.commit_every_s`. A killed run loses only the videos in flight;
the same command again resumes (`resume=true`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf

from engine.store import outputs
from engine.curate.commits import CommitPolicy, OutputStore, Progress, ready_rows
from engine.export import check_export_target, write_exports
from engine.store.lance_io import FragmentWriter
from engine.curate.input_chunks import InputChunks
from engine.curate.ledger import drain_reports, report_uncut, reporting, start_ledger
from engine.runtime.ray_session import cluster_resources, ensure_ray, largest_node_cpus
from engine.curate.resume import SETTINGS_KEY, ResumeError, check_resumable, clip_settings, encode, resume_mode
from udfs.schema import CLIP_FILTER_FIELDS, clip_schema, video_id_for
from engine.runtime.stages import StageStep, apply_stage, check_gpus, fit_to_cluster, node_dict, stage_params, worker_slots
from udfs.uris import READ_RETRIES_KEY, chunked, iter_inputs, lance_storage_options
from udfs import registry
from udfs.analysis.filtering import finalize_filter_columns
from udfs.spec import StageSpec

log = logging.getLogger(__name__)

# URIs per input chunk (one read task), at most: the unit the ledger admits.
# A quarter of the in-flight limit, so admission stays fine-grained.
MAX_INPUT_CHUNK = 256
# How often the driver looks for finished videos when no output arrives.
POLL_S = 0.5


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
        elif key in registry.NODES:  # a node that feeds this stage (motion, preview)
            params[key] = node_dict(cfg, key)
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


def plan_video_stages(cfg: DictConfig, num_videos: int | None) -> list[StageStep]:
    """Probe, then the split the config names."""
    return [dataclasses.replace(stage_step(cfg, spec), max_parallel=num_videos)
            for spec in active_specs(cfg, "video") if spec.impl]


def plan_clip_stages(cfg: DictConfig, num_videos: int | None) -> list[StageStep]:
    """Transcode (with the motion scores and previews of the nodes that feed
    it), then (when a model stage needs frames) one decode of each clip for
    them, then the model stages.

    Models are resolved here, on the driver, before any video is decoded: a
    missing path fails the run at once, and a hub id downloads once. (Model
    loading imports torch, ~2 s: only runs with a model stage pay for it.)"""
    specs = active_specs(cfg, "clip")
    transcode = [stage_step(cfg, s) for s in specs if s.node == "transcode"]
    # Columns of the nodes that feed transcode (the motion scores) are its own.
    fed = [f for s in specs if s.impl is None for f in s.added_columns(node_dict(cfg, s.node))]
    transcode = [dataclasses.replace(transcode[0], extra_fields=[*transcode[0].extra_fields, *fed],
                                     max_parallel=num_videos)]
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
    steps = transcode
    if consumers:
        missing = [name for name, frame_spec in consumers.items() if not frame_spec]
        if missing:
            raise ValueError(f"no frame spec for consumer(s) {missing}: set frames.consumers.aesthetic, "
                             "embed.frames or caption.frames")
        decode = next(s for s in registry.STAGES if s.serves_frames)
        steps.append(stage_step(cfg, decode, consumers=consumers, motion=None))
    return steps + model_steps


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


def admission(cfg: DictConfig, cpus: float, gpus: float, video_steps: list[StageStep],
              clip_steps: list[StageStep]) -> tuple[int, int]:
    """(videos admitted at once, URIs per input chunk).

    A video is in flight from admission to the end of its transcode task
    (never fused with the stage after it). Every stage waits for a full
    batch before it starts, and admitted videos can sit in each of those
    batches at once, so a limit below their sum plus a chunk could stall the
    stream; it never goes below that. Unset, it is also large enough for
    every transcode slot of the cluster to hold a batch at once."""
    configured = cfg.write.get("max_videos_in_flight")
    transcode = clip_steps[0]
    batch = transcode.batch_size or 1
    upstream = sum(s.batch_size or 1 for s in video_steps)
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


def open_output(store: OutputStore, cfg: DictConfig, run_id: str) -> tuple[set[str], dict[str, Any]]:
    """Create the output's tables, or continue them (`resume`); returns the
    videos already done and what happened, for the summary."""
    resume, force = resume_mode(cfg)
    existing = None if cfg.overwrite else store.existing_clips()
    if existing is None:
        store.create(overwrite=bool(cfg.overwrite) or store.layout.exists(store.storage_options), run_id=run_id)
        return set(), {"resumed": False}
    root = store.layout.root
    if not resume:
        raise FileExistsError(f"{root} already holds a reelsift output; pass overwrite=true to replace it "
                              "or resume=true to continue it")
    recorded = (existing.schema.metadata or {}).get(SETTINGS_KEY.encode())
    check_resumable(root, recorded.decode() if recorded else None, clip_settings(cfg), force=force)
    have, want = [f.name for f in existing.schema], store.clip_schema.names
    if have != want:
        raise ResumeError(f"{root}: the clip table has columns {sorted(set(have) - set(want)) or 'none'} this run "
                          f"would not write and lacks {sorted(set(want) - set(have)) or 'none'}; a resumed run "
                          "must write the same columns. Pass overwrite=true to start over.")
    rolled = store.reopen(run_id=run_id)
    done = store.done_video_ids()
    log.info("resuming %s: %d videos already done", root, len(done))
    return done, {"resumed": True, "forced": force, "rolled_forward": rolled}


def feed_inputs(uris: Iterable[str], done: set[str], chunk: int) -> tuple[list[tuple[Any, int]], int, int]:
    """Put the URIs still to do into the object store in chunks, as the
    listing streams by. Returns the chunks (ref, rows), and how many inputs
    were listed and skipped."""
    counts = {"listed": 0, "skipped": 0}

    def todo() -> Iterator[str]:
        for uri in uris:
            counts["listed"] += 1
            if done and video_id_for(uri) in done:
                counts["skipped"] += 1
                continue
            yield uri

    chunks = [(ray.put(pa.table({"uri": part})), len(part)) for part in chunked(todo(), chunk)]
    return chunks, counts["listed"], counts["skipped"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Curate `cfg.input` into `cfg.output`; returns the summary written to disk."""
    started = time.perf_counter()
    output = str(cfg.output)
    layout = outputs.OutputLayout(output)
    storage_options = outputs.storage_options(cfg)
    lance_options = lance_storage_options(storage_options)

    uris = iter_inputs(
        OmegaConf.to_container(cfg.input, resolve=True) if OmegaConf.is_list(cfg.input) else str(cfg.input),
        root=cfg.input_root,
        extensions=list(cfg.input_extensions),
        storage_options=storage_options,
    )
    if cfg.limit:
        uris = itertools.islice(uris, int(cfg.limit))
    first = next(uris, None)
    if first is None:
        raise FileNotFoundError(f"no input videos found under {cfg.input}")
    uris = itertools.chain([first], uris)

    # Checked before any work, not after hours of transcoding.
    check_export_target(cfg.export, output)
    video_steps = plan_video_stages(cfg, None)
    clip_steps = plan_clip_stages(cfg, None)
    final_clip_schema = clip_schema([*(f for step in clip_steps for f in step.extra_fields), *CLIP_FILTER_FIELDS])
    final_clip_schema = final_clip_schema.with_metadata(table_metadata(cfg, final_clip_schema))

    run_id = uuid.uuid4().hex[:12]
    store = OutputStore(layout, final_clip_schema, lance_options)
    done, run_info = open_output(store, cfg, run_id)

    ensure_ray(cfg.ray)
    ray_start = time.perf_counter()
    cpus, gpus = cluster_resources()
    check_gpus([*video_steps, *clip_steps], gpus)
    limit, chunk = admission(cfg, cpus, gpus, video_steps, clip_steps)
    # The ledger is also the stages' clock (one bookkeeping actor per run).
    ledger_name = f"reelsift_ledger_{run_id}"
    ledger = start_ledger(ledger_name, limit)
    try:
        chunks, listed, skipped = feed_inputs(uris, done, chunk)
        done.clear()
        pending = sum(n for _, n in chunks)
        log.info("%d inputs, %d already done, %d to curate", listed, skipped, pending)
        stream = {"videos_committed": 0, "videos_incomplete": 0, "first_commit_s": None, "commits": 0, "commit_s": 0.0,
                  "max_videos_in_flight": limit, "most_videos_in_flight": 0}
        if pending:
            stream.update(curate_stream(cfg, store, chunks, video_steps, clip_steps, ledger, ledger_name, run_id,
                                        limit, cpus, gpus, started))
        pipeline_s = time.perf_counter() - ray_start
        stage_times = ray.get(ledger.snapshot.remote())
    finally:
        ray.kill(ledger)

    removed = store.remove_orphans()
    clips = store.clips()
    stats = outputs.clip_stats(clips)
    videos = outputs.video_stats(store.videos())
    exports = write_exports(cfg.export, clips, layout, storage_options)
    summary = outputs.summarise(
        videos=videos, stats=stats, stage_times=stage_times, pipeline_s=pipeline_s,
        total_s=time.perf_counter() - started, config=outputs.redacted_config(cfg), exports=exports,
        run={"id": run_id, **run_info, "videos_listed": listed, "videos_skipped": skipped,
             "orphan_bytes_removed": removed, **stream},
    )
    outputs.write_summary(summary, layout, storage_options)
    return summary


def curate_stream(cfg: DictConfig, store: OutputStore, chunks: list[tuple[Any, int]], video_steps: list[StageStep],
                  clip_steps: list[StageStep], ledger: Any, ledger_name: str, run_id: str, limit: int, cpus: float,
                  gpus: float, started: float) -> dict[str, Any]:
    """Run the stream over `chunks` and commit videos as they complete.
    `ledger` admits videos, collects transcode reports and stage times."""
    pending = sum(n for _, n in chunks)
    # No pool larger than the videos there are (or may be in flight).
    video_steps = [dataclasses.replace(s, max_parallel=min(pending, limit)) for s in video_steps]
    transcode, *later_steps = clip_steps
    # Transcode keeps its own batch of videos: never fused with the clip stage
    # after it (whose batch of clips would become a batch of videos).
    transcode = dataclasses.replace(encoder_threads(transcode, largest_node_cpus()),
                                    cls=reporting(transcode.cls, ledger_name), max_parallel=min(pending, limit),
                                    fuse=False, batch_size=transcode_batch(transcode, pending, cpus, gpus))
    write_node = node_dict(cfg, "write")
    writer = StageStep.from_node("write", FragmentWriter, {"resources": write_node.get("resources") or {}}, params={
        "uri": store.layout.clips, "schema": store.clip_schema, "storage_options": store.storage_options})
    if writer.concurrency is None and write_node.get("cpus_per_writer"):
        # Writers ask for no CPU, so nothing else bounds how many run at once;
        # a burst of blocks (the end of a long video) started one Ray worker
        # process per writer task, ~200 MB each, kept afterwards as idle
        # workers: peak memory grew with video length.
        writer = dataclasses.replace(writer, concurrency=max(2, int(cpus // float(write_node["cpus_per_writer"]))))
    steps = fit_to_cluster([*video_steps, transcode, *later_steps, writer], cpus, gpus)
    n_video = len(video_steps)
    video_steps, (transcode, *later_steps, writer) = steps[:n_video], steps[n_video:]

    # Ray Data's per-stage CPU reservations (each stage at least its task's
    # share, upstream first) do not fit a small cluster running every stage
    # at once: the last stages got none and the stream stalled or held every
    # clip until the end. The ledger bounds what is in flight instead, and
    # Ray's scheduler shares the CPUs. The dataset keeps its own copy.
    # Blocks of clip rows are cut at `write.max_block_mb`, not Ray Data's
    # 128 MB: a transcode task holds its clips until a block is full, and a
    # long video's full blocks sat in both the transcode and the writer
    # workers (peak memory grew with video length).
    context = ray.data.DataContext.get_current()
    saved = (context.op_resource_reservation_enabled, context.target_max_block_size)
    context.op_resource_reservation_enabled = False
    if write_node.get("max_block_mb"):
        context.target_max_block_size = int(float(write_node["max_block_mb"]) * 2**20)
    try:
        ds = build_stream(chunks, ledger_name, video_steps, transcode, later_steps, writer, ledger_name, cpus, gpus)
    finally:
        context.op_resource_reservation_enabled, context.target_max_block_size = saved

    policy = CommitPolicy(every_s=write_node.get("commit_every_s"), every_rows=write_node.get("commit_every_rows"))
    progress = Progress()
    first_commit_s = None
    committed = 0
    commit_s = 0.0  # the driver's time in commits (the stream runs on meanwhile)
    stream = _pump(ds)
    most_in_flight = 0
    try:
        for item in stream:
            if isinstance(item, pa.Table):
                progress.add_written(item)
            progress.add_reports(drain_reports(ledger))
            end = item is _END
            ready = progress.complete()
            if ready and (end or policy.due(len(ready), ready_rows(progress, ready))):
                rows, fragments, _ = progress.take(ready)
                commit_started = time.perf_counter()
                store.commit(rows, fragments, run_id)
                commit_s += time.perf_counter() - commit_started
                policy.committed()
                committed += len(ready)
                if first_commit_s is None:
                    first_commit_s = time.perf_counter() - started
                log.info("committed %d videos (%d this run, %d in flight)", len(ready), committed,
                         len(progress.videos))
        most_in_flight = ray.get(ledger.most_in_flight.remote())
    except BaseException:
        # The ledger first: the stream's reads and transcodes then fail fast
        # when this run is being abandoned.
        ray.kill(ledger)
        raise
    finally:
        stream.close()
    incomplete = progress.incomplete()
    if incomplete:
        log.error("%d videos did not complete (a stage dropped their blocks); a re-run redoes them", len(incomplete))
    if progress.late_fragments:
        log.info("%d fragments written twice by retried tasks were left out (and removed)", progress.late_fragments)
    return {"videos_committed": committed, "videos_incomplete": len(incomplete), "first_commit_s": first_commit_s,
            "commits": store.commits, "commit_s": round(commit_s, 3), "most_videos_in_flight": most_in_flight}



def build_stream(chunks: list[tuple[Any, int]], ledger_name: str, video_steps: list[StageStep], transcode: StageStep,
                 later_steps: list[StageStep], writer: StageStep, clock_name: str, cpus: float,
                 gpus: float) -> ray.data.Dataset:
    """The run's Ray Data job: input chunks -> video stages -> transcode ->
    clip stages -> writers."""
    # Reads wait on the ledger, so they take no CPU and run one at a time.
    ds = ray.data.read_datasource(InputChunks(chunks, ledger_name), override_num_blocks=len(chunks), concurrency=1,
                                  num_cpus=0)
    for step in video_steps:
        ds = apply_stage(ds, step, clock_name, cpus, gpus)
    # Same resources as the split step, so Ray Data fuses the two when it can.
    ds = ds.map_batches(report_uncut, fn_kwargs={"ledger_name": ledger_name}, batch_format="pyarrow",
                        batch_size=None, num_cpus=video_steps[-1].num_cpus)
    ds = one_video_per_block(ds, video_steps[-1].num_cpus)
    for step in [transcode, *later_steps]:
        ds = apply_stage(ds, step, clock_name, cpus, gpus)
    # Every good clip passes unless a filter said otherwise; error rows get passed=null.
    # The writer's share of a CPU (not Ray Data's default of a whole one, which
    # stage actors may never leave free), so the two fuse into the writers.
    ds = ds.map_batches(finalize_filter_columns, batch_format="pyarrow", batch_size=None, num_cpus=writer.num_cpus)
    ds = apply_stage(ds, writer, clock_name, cpus, gpus)
    return ds


def one_video_per_block(ds: ray.data.Dataset, num_cpus: float) -> ray.data.Dataset:
    """`ds` cut into one-row blocks, so transcode tasks take exactly their
    `batch_size` of videos as they come, and videos spread over the
    transcode workers rather than arriving in split's batches.

    Ray Data's streaming repartition asks for a whole CPU per task and offers
    no argument to change that; on a small machine whose CPUs the stage
    actors already hold in fractions (`fit_to_cluster`), that task would never
    be scheduled and the stream would stall. It gets the step before its
    share instead, which also lets Ray Data fuse the two."""
    ds = ds.repartition(target_num_rows_per_block=1)
    remote_args = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    remote_args = getattr(remote_args, "ray_remote_args", None)
    if isinstance(remote_args, dict):
        remote_args["num_cpus"] = num_cpus
    else:  # a Ray Data without the field: keep the default, and say why a small cluster may stall
        log.warning("cannot set the CPU share of Ray Data's repartition step; it asks for 1 CPU per task")
    return ds


_END = object()


def _pump(ds: ray.data.Dataset) -> Iterator[Any]:
    """The writers' output blocks as they arrive, `None` every `POLL_S` when
    none does, then `_END`. A thread pulls the stream, so the driver can
    commit on time while waiting; stopping the generator stops the stream."""
    items: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if not put(batch):
                    return
            put(_END)
        except BaseException as exc:  # surfaced in the driver's thread
            put(exc)

    thread = threading.Thread(target=pull, name="reelsift-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=POLL_S)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item is _END:
                return
    finally:
        stop.set()
        thread.join(timeout=5)
