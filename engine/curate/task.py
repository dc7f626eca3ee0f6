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
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf

from engine.curate import report
from engine.curate.commits import CommitPolicy, OutputStore, Progress, ready_rows
from engine.curate.input_chunks import InputChunks
from engine.curate.ledger import drain_reports, report_uncut, reporting, start_ledger
from engine.curate.plan import (StagePlan, admission, check_decoder, check_encoder, encoder_threads, plan_stages,
                                table_metadata, transcode_batch)
from engine.curate.progress import RunProgress
from engine.curate.resume import SETTINGS_KEY, ResumeError, check_resumable, clip_settings, encode, resume_mode
from engine.export import check_export_target, write_exports
from engine.runtime.ray_session import cluster_resources, ensure_ray, largest_node_cpus
from engine.runtime.stages import StageStep, apply_stage, check_gpus, node_dict
from engine.runtime.private_apis import PrivateApiChanged, set_last_step_num_cpus
from engine.store import outputs
from engine.store.lance_io import FragmentWriter
from udfs.analysis.filtering import finalize_filter_columns
from udfs.schema import video_id_for
from udfs.uris import chunked, iter_inputs, lance_storage_options

log = logging.getLogger(__name__)

# How often the driver looks for finished videos when no output arrives.
POLL_S = 0.5


def applied_filters(recorded: str | None, root: str, storage_options: dict[str, Any] | None) -> str | None:
    """The recorded clip settings with the thresholds a later task=filter
    applied in place of the curate run's: the clips' verdicts follow those."""
    from engine.filter import read_applied

    applied = read_applied(root, storage_options)
    if recorded is None or not applied:
        return recorded
    settings = json.loads(recorded)
    settings.update({k: v for k, v in applied.items() if k in settings})
    return encode(settings)


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
    recorded = applied_filters(recorded.decode() if recorded else None, root, outputs.storage_options(cfg))
    check_resumable(root, recorded, clip_settings(cfg), force=force)
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
    plan = plan_stages(cfg)
    final_clip_schema = plan.clip_schema()
    final_clip_schema = final_clip_schema.with_metadata(table_metadata(cfg, final_clip_schema))

    run_id = uuid.uuid4().hex[:12]
    store = OutputStore(layout, final_clip_schema, lance_options)
    done, run_info = open_output(store, cfg, run_id)

    ensure_ray(cfg.ray, progress_bars=bool(cfg.log.ray_progress))
    ray_start = time.perf_counter()
    cpus, gpus = cluster_resources()
    check_gpus(plan.steps, gpus)
    encoder = check_encoder(plan.transcode)
    log.info("transcode encoder: %s (%s)", encoder.encoder, encoder.why)
    decoder = check_decoder(plan.transcode)
    log.info("transcode decode: %s (%s)", decoder.decoder, decoder.why)
    limit, chunk = admission(cfg, cpus, gpus, plan)
    state = CurateRun(cfg=cfg, store=store, run_id=run_id, started=started, cpus=cpus, gpus=gpus, limit=limit)
    state.ledger = start_ledger(state.ledger_name, limit)
    try:
        chunks, listed, skipped = feed_inputs(uris, done, chunk)
        done.clear()
        pending = sum(n for _, n in chunks)
        log.info("%d inputs, %d already done, %d to curate", listed, skipped, pending)
        stream = {"videos_committed": 0, "videos_incomplete": 0, "first_commit_s": None, "commits": 0, "commit_s": 0.0,
                  "compactions_while_running": 0,
                  "max_videos_in_flight": limit, "most_videos_in_flight": 0}
        if pending:
            stream.update(curate_stream(state, chunks, plan))
        pipeline_s = time.perf_counter() - ray_start
        stage_times = ray.get(state.ledger.snapshot.remote())
    finally:
        ray.kill(state.ledger)

    removed = store.remove_orphans()
    write_node = node_dict(cfg, "write")
    compacted = store.compact(target_rows=int(write_node["target_rows_per_fragment"]),
                              keep_s=write_node.get("keep_versions_s"))
    clips = store.clips()
    stats = outputs.clip_stats(clips)
    videos = outputs.video_stats(store.videos())
    exports = write_exports(cfg.export, clips, layout, storage_options)
    summary = outputs.summarise(
        videos=videos, stats=stats, stage_times=stage_times, pipeline_s=pipeline_s,
        total_s=time.perf_counter() - started, config=outputs.redacted_config(cfg), exports=exports,
        run={"id": run_id, **run_info, "videos_listed": listed, "videos_skipped": skipped,
             "orphan_bytes_removed": removed, "compaction": compacted, **stream},
    )
    summary["encoder"] = encoder.as_dict()
    summary["decode"] = decoder.as_dict()
    summary["error_groups"] = report.group_errors(summary["errors"])
    summary["filter_reasons"] = report.filter_reasons(stats["filter_reason"]) if stats.height else {}
    outputs.write_summary(summary, layout, storage_options)
    return summary


@dataclass
class CurateRun:
    """One curate run, as its stream and commits see it."""

    cfg: DictConfig
    store: OutputStore
    run_id: str
    started: float  # perf_counter() when the run began
    cpus: float
    gpus: float
    limit: int  # videos admitted at once
    # The ledger admits videos, collects transcode reports and is the stages'
    # clock (one bookkeeping actor per run).
    ledger: Any = None

    @property
    def ledger_name(self) -> str:
        return f"reelsift_ledger_{self.run_id}"


def stream_plan(run: CurateRun, plan: StagePlan, pending: int) -> StagePlan:
    """`plan` as the stream runs `pending` videos: no pool larger than the
    videos there are (or may be in flight), transcode reporting to the
    ledger, a writer added, every pool fitted to the cluster."""
    most = min(pending, run.limit)
    transcode = plan.transcode
    # Transcode keeps its own batch of videos: never fused with the clip stage
    # after it (whose batch of clips would become a batch of videos).
    transcode = dataclasses.replace(encoder_threads(transcode, largest_node_cpus()),
                                    cls=reporting(transcode.cls, run.ledger_name), max_parallel=most, fuse=False,
                                    batch_size=transcode_batch(transcode, pending, run.cpus, run.gpus))
    write_node = node_dict(run.cfg, "write")
    store = run.store
    writer = StageStep.from_node("write", FragmentWriter, {"resources": write_node.get("resources") or {}}, params={
        "uri": store.layout.clips, "schema": store.clip_schema, "storage_options": store.storage_options})
    if writer.concurrency is None and write_node.get("cpus_per_writer"):
        # Writers ask for no CPU, so nothing else bounds how many run at once;
        # a burst of blocks (the end of a long video) started one Ray worker
        # process per writer task, ~200 MB each, kept afterwards as idle
        # workers: peak memory grew with video length.
        writer = dataclasses.replace(writer,
                                     concurrency=max(2, int(run.cpus // float(write_node["cpus_per_writer"]))))
    video = [dataclasses.replace(s, max_parallel=most) for s in plan.video]
    return StagePlan(video=video, transcode=transcode, clip=plan.clip, writer=writer).fitted(run.cpus, run.gpus)


def curate_stream(run: CurateRun, chunks: list[tuple[Any, int]], plan: StagePlan) -> dict[str, Any]:
    """Run the stream over `chunks` and commit videos as they complete."""
    cfg, store, ledger = run.cfg, run.store, run.ledger
    pending = sum(n for _, n in chunks)
    plan = stream_plan(run, plan, pending=pending)
    write_node = node_dict(cfg, "write")

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
        ds = build_stream(run, chunks, plan)
    finally:
        context.op_resource_reservation_enabled, context.target_max_block_size = saved

    policy = CommitPolicy(every_s=write_node.get("commit_every_s"), every_rows=write_node.get("commit_every_rows"))
    progress = Progress()
    first_commit_s = None
    committed = 0
    commit_s = 0.0  # the driver's time in commits (the stream runs on meanwhile)
    stream = _pump(ds)
    most_in_flight = 0
    compactions: list[list[dict[str, Any]]] = []
    display = RunProgress(todo=pending, mode=str(cfg.log.progress), every_s=float(cfg.log.progress_every_s),
                          stage_times=lambda: ray.get(ledger.snapshot.remote()))
    try:
        with display.shown():
            for item in stream:
                if isinstance(item, pa.Table):
                    progress.add_written(item)
                progress.add_reports(drain_reports(ledger))
                end = item is _END
                ready = progress.complete()
                if ready and (end or policy.due(len(ready), ready_rows(progress, ready))):
                    rows, fragments, _ = progress.take(ready)
                    commit_started = time.perf_counter()
                    store.commit(rows, fragments, run.run_id)
                    commit_s += time.perf_counter() - commit_started
                    policy.committed()
                    committed += len(ready)
                    if first_commit_s is None:
                        first_commit_s = time.perf_counter() - run.started
                    log.info("committed %d videos (%d this run, %d in flight)", len(ready), committed,
                             len(progress.videos))
                    every = write_node.get("compact_every_fragments")
                    if every and store.fragments_since_compaction >= int(every) and not end:
                        compactions.append(store.compact(target_rows=int(write_node["target_rows_per_fragment"]),
                                                         keep_s=write_node.get("keep_versions_s")))
                display.update(progress.totals, len(progress.videos))
            display.finish(progress.totals)
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
            "commits": store.commits, "commit_s": round(commit_s, 3), "most_videos_in_flight": most_in_flight,
            "compactions_while_running": len(compactions)}



def build_stream(run: CurateRun, chunks: list[tuple[Any, int]], plan: StagePlan) -> ray.data.Dataset:
    """The run's Ray Data job: input chunks -> video stages -> transcode ->
    clip stages -> writers (`plan`, as `stream_plan` made it)."""
    name, cpus, gpus = run.ledger_name, run.cpus, run.gpus
    # Reads wait on the ledger, so they take no CPU and run one at a time.
    ds = ray.data.read_datasource(InputChunks(chunks, name), override_num_blocks=len(chunks), concurrency=1,
                                  num_cpus=0)
    for step in plan.video:
        ds = apply_stage(ds, step, name, cpus, gpus)
    # Same resources as the split step, so Ray Data fuses the two when it can.
    ds = ds.map_batches(report_uncut, fn_kwargs={"ledger_name": name}, batch_format="pyarrow",
                        batch_size=None, num_cpus=plan.video[-1].num_cpus)
    ds = one_video_per_block(ds, plan.video[-1].num_cpus)
    for step in [plan.transcode, *plan.clip]:
        ds = apply_stage(ds, step, name, cpus, gpus)
    # Every good clip passes unless a filter said otherwise; error rows get passed=null.
    # The writer's share of a CPU (not Ray Data's default of a whole one, which
    # stage actors may never leave free), so the two fuse into the writers.
    ds = ds.map_batches(finalize_filter_columns, batch_format="pyarrow", batch_size=None,
                        num_cpus=plan.writer.num_cpus)
    ds = apply_stage(ds, plan.writer, name, cpus, gpus)
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
    try:
        set_last_step_num_cpus(ds, num_cpus)
    except PrivateApiChanged as exc:  # keep the default, and say why a small cluster may stall
        log.warning("cannot set the CPU share of Ray Data's repartition step (%s); it asks for 1 CPU per task", exc)
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
