"""End to end through Ray Data: inputs in, Lance tables and summary out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.store.lance_io import read_blob_bytes
from engine.curate.task import run
from engine.sample import read_frame_index
from udfs.split.fixed_stride import fixed_stride_spans
from udfs.media.video import decode_rgb_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = {"hd_30fps_23s.mp4": 30, "odd_25fps_12s.mp4": 25, "ntsc_29.97fps_5s.mkv": 30000 / 1001,
       "tiny_24fps_1s.mp4": 24, "short_15fps_3s.mp4": 15}


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def first_run(ray_session, video_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    cfg = config(f"input={video_dir}", f"output={out}", "transcode.preset=ultrafast",
                 "export.nemo_layout=true", "export.parquet=true")
    return out, run(cfg)


def test_every_span_becomes_an_exact_clip(first_run, video_frames):
    out, summary = first_run
    clips = lance.dataset(str(out / "clips.lance"))
    table = clips.to_table(columns=["clip_id", "source_uri", "start_frame", "end_frame", "start_s", "end_s",
                                    "num_frames", "fps", "error"], with_row_id=True)
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows)
    by_video: dict[str, list] = {}
    for r in rows:
        by_video.setdefault(os.path.basename(r["source_uri"]), []).append(r)
    expected = {name: fixed_stride_spans(n, FPS[name], clip_len_s=10, min_clip_s=2)
                for name, n in video_frames.items()}
    assert {n: sorted((r["start_frame"], r["end_frame"]) for r in rs) for n, rs in by_video.items()} == {
        n: spans for n, spans in expected.items() if spans}
    assert "tiny_24fps_1s.mp4" not in by_video  # 1 s < min_clip_s: no clip
    # Every clip decodes to exactly its span's frames, with the right duration.
    blobs = read_blob_bytes(clips, "mp4", table.column("_rowid").to_pylist())
    for r, mp4 in zip(rows, blobs):
        frames = decode_rgb_bytes(mp4)
        assert [read_frame_index(f) for f in frames] == list(range(r["start_frame"], r["end_frame"]))
        assert r["num_frames"] == len(frames)
        assert r["end_s"] - r["start_s"] == pytest.approx(len(frames) / r["fps"])
    assert summary["clips"] == len(rows) == 3 + 2 + 1 + 1


def test_bad_inputs_are_recorded_and_counted(first_run):
    out, summary = first_run
    videos = {os.path.basename(r["uri"]): r for r in lance.dataset(str(out / "videos.lance")).to_table().to_pylist()}
    assert videos["empty.mp4"]["error"] == "probe failed: ValueError: file is empty"
    assert videos["corrupt.mp4"]["error"].startswith("probe failed:")
    assert videos["empty.mp4"]["num_clips"] == 0
    assert videos["hd_30fps_23s.mp4"]["num_clips"] == 3 and videos["hd_30fps_23s.mp4"]["error"] is None
    assert videos["hd_30fps_23s.mp4"]["span_end_frames"] == [300, 600, 690]
    assert summary["videos"] == 7 and summary["videos_failed"] == 2
    assert {os.path.basename(e["uri"]) for e in summary["errors"]} == {"empty.mp4", "corrupt.mp4"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["clips"] == summary["clips"]
    assert on_disk["hours_out"] == pytest.approx((20 + 3 + 10 + 2 + 150 / (30000 / 1001) + 3) / 3600)
    # motion.mode defaults to score-only: the transcode stage scores every clip
    # from its own packets (no clip_analysis decode), nothing filtered.
    assert set(on_disk["stages"]) == {"probe", "split_fixed_stride", "transcode", "write"}
    assert on_disk["clips_passed"] == summary["clips"]
    assert on_disk["stages"]["transcode"]["rows_out"] == summary["clips"]


def test_exports_match_the_table(first_run):
    out, summary = first_run
    clip_ids = set(lance.dataset(str(out / "clips.lance")).to_table(columns=["clip_id"]).column("clip_id").to_pylist())
    assert {p[:-4] for p in os.listdir(out / "clips")} == clip_ids
    assert {p[:-5] for p in os.listdir(out / "previews")} == clip_ids
    meta = json.loads((out / "metas" / "v0" / f"{sorted(clip_ids)[0]}.json").read_text())
    assert meta["span_uuid"] == sorted(clip_ids)[0] and len(meta["duration_span"]) == 2
    import pyarrow.parquet as pq

    assert pq.read_table(out / "clips.parquet").num_rows == len(clip_ids)


def test_clip_ids_identical_across_runs(first_run, ray_session, good_videos, tmp_path):
    out, _ = first_run
    subset = [str(good_videos[n]) for n in ("odd_25fps_12s.mp4", "short_15fps_3s.mp4")]
    cfg = config(f"input=[{','.join(subset)}]", f"output={tmp_path}", "transcode.preset=ultrafast",
                 "preview.enabled=false")
    run(cfg)
    again = lance.dataset(str(tmp_path / "clips.lance")).to_table(columns=["clip_id", "source_uri"]).to_pylist()
    before = lance.dataset(str(out / "clips.lance")).to_table(columns=["clip_id", "source_uri"]).to_pylist()
    assert sorted(r["clip_id"] for r in again) == sorted(r["clip_id"] for r in before if r["source_uri"] in subset)
    # The same command again resumes: every video is done, nothing is redone.
    summary = run(cfg)
    assert summary["run"]["videos_skipped"] == 2 and summary["run"]["videos_committed"] == 0
    assert summary["clips"] == len(again)
    assert lance.dataset(str(tmp_path / "clips.lance")).count_rows() == len(again)
    cfg.resume = False
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(cfg)
    # overwrite=true starts over: nothing skipped, every video redone, no row twice.
    cfg.overwrite = True
    redone = run(cfg)
    assert not redone["run"]["resumed"] and redone["run"]["videos_skipped"] == 0
    assert redone["run"]["videos_committed"] == 2 and redone["clips"] == len(again)
    assert lance.dataset(str(tmp_path / "clips.lance")).count_rows() == len(again)


@pytest.mark.slow
def test_cli_prints_config_and_runs_a_sweep(tmp_path, good_videos):
    env = {**os.environ, "PYTHONPATH": REPO}
    shown = subprocess.run([sys.executable, "-m", "engine", "input=x", "output=y", "split.clip_len_s=4",
                            "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    assert "clip_len_s: 4" in shown.stdout and "encoder: libx264" in shown.stdout
    video = good_videos["short_15fps_3s.mp4"]
    swept = subprocess.run([sys.executable, "-m", "engine", "-m", f"input={video}", f"output={tmp_path / 'sweep'}",
                            "transcode.preset=ultrafast", "transcode.crf=20,40", "ray.num_cpus=2"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert swept.returncode == 0, swept.stderr[-3000:]
    sizes = [json.loads((tmp_path / "sweep" / f"job{i}" / "summary.json").read_text())["clip_bytes"] for i in (0, 1)]
    assert sizes[0] > sizes[1] > 0  # crf 20 keeps more than crf 40


def test_chained_tasks_share_one_output(ray_session, good_videos, tmp_path):
    from engine.tasks import run_tasks

    cfg = config(f"input={good_videos['short_15fps_3s.mp4']}", f"output={tmp_path}", "transcode.preset=ultrafast",
                 "preview.enabled=false", "task.steps=[curate,export]", "export.parquet=true")
    seen = []
    summaries = run_tasks(cfg, after=lambda name, _: seen.append(name))
    assert seen == ["curate", "export"] == list(summaries)
    assert summaries["curate"]["clips"] == 1
    assert summaries["export"]["exports"]["parquet"] == str(tmp_path / "clips.parquet")


def test_transcode_batch_spreads_few_videos_over_the_cluster():
    """A transcode task takes its configured batch of videos, unless the run
    has too few videos to give every transcode slot one batch."""
    from engine.curate.plan import transcode_batch
    from engine.runtime.stages import StageStep
    from udfs.media.transcode import ClipTranscoder

    step = StageStep("transcode", ClipTranscoder, {}, num_cpus=1, batch_size=8)
    assert transcode_batch(step, videos=60, cpus=2, gpus=0) == 8  # two slots: full batches
    assert transcode_batch(step, videos=10, cpus=2, gpus=0) == 5  # both slots busy
    assert transcode_batch(step, videos=8, cpus=16, gpus=0) == 1  # sixteen slots, eight videos
    assert transcode_batch(step, videos=40, cpus=16, gpus=0) == 3  # ceil(40 / 16)
    gpu_step = StageStep("transcode", ClipTranscoder, {}, num_cpus=2, num_gpus=1, batch_size=4)
    assert transcode_batch(gpu_step, videos=3, cpus=64, gpus=2) == 2


def test_admission_fills_every_transcode_slot():
    """Unset, the in-flight limit lets every transcode slot hold a full batch
    (a 64-CPU node must not run half its encoders); set, it is honoured down
    to one batch of each stage plus a chunk."""
    from engine.curate.plan import StagePlan, admission
    from engine.runtime.stages import StageStep
    from udfs.media.transcode import ClipTranscoder

    video_steps = [StageStep("probe", object, {}, num_cpus=1, batch_size=8),
                   StageStep("split", object, {}, num_cpus=0.25, batch_size=16)]
    transcode = StageStep("transcode", ClipTranscoder, {}, num_cpus=1, batch_size=8)
    plan = StagePlan(video=video_steps, transcode=transcode)
    cfg = config("input=x", "output=y")
    limit, chunk = admission(cfg, 2, 0, plan)
    assert limit >= 8 + 16 + 2 * 8 and chunk >= 1
    limit, _ = admission(cfg, 64, 0, plan)
    assert limit >= 64 * 8
    capped = config("input=x", "output=y", "write.max_videos_in_flight=4")
    limit, chunk = admission(capped, 64, 0, plan)
    assert limit == 8 + 16 + 8 + chunk


def test_encoder_threads_bounded_on_a_big_node():
    """x264 picks its threads on a small node; on a big one an encoder gets
    at most 4 per CPU its task holds; a set value is kept."""
    from engine.curate.plan import encoder_threads
    from engine.runtime.stages import StageStep
    from udfs.media.transcode import ClipTranscoder

    step = StageStep("transcode", ClipTranscoder, {"threads": 0}, num_cpus=1, batch_size=8)
    assert encoder_threads(step, 2).params["threads"] == 0
    assert encoder_threads(step, 64).params["threads"] == 4
    two = StageStep("transcode", ClipTranscoder, {"threads": 0}, num_cpus=2, batch_size=8)
    assert encoder_threads(two, 64).params["threads"] == 8
    fixed = StageStep("transcode", ClipTranscoder, {"threads": 6}, num_cpus=1, batch_size=8)
    assert encoder_threads(fixed, 64).params["threads"] == 6


def test_missing_bytecode_is_noticed(tmp_path, monkeypatch):
    """Without compiled bytecode and with PYTHONDONTWRITEBYTECODE, every Ray
    worker compiles its imports: the engine says so before starting Ray."""
    import importlib.util

    import ray

    from engine.runtime import ray_session

    module = tmp_path / "fake_ray.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(ray, "__file__", str(module))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert not ray_session.missing_bytecode()  # Python writes its own cache
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert ray_session.missing_bytecode()
    cached = Path(importlib.util.cache_from_source(str(module)))
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert not ray_session.missing_bytecode()


STOP_SCRIPT = """
import json
from omegaconf import OmegaConf
import ray
from engine.runtime.ray_session import ensure_ray, stop_local_ray
ensure_ray(OmegaConf.create({"num_cpus": 1}))
assert ray.get(ray.remote(lambda: 7).remote()) == 7
started = {kind: [info.process for info in infos]
           for kind, infos in ray._private.worker._global_node.all_processes.items()}
stop_local_ray()
print(json.dumps({"initialized": ray.is_initialized(),
                  "monitor_returncode": started["monitor"][0].returncode,
                  "pids": [p.pid for procs in started.values() for p in procs]}))
"""


def test_a_local_ray_is_stopped_whole_without_the_monitors_wait():
    """The Ray a command starts goes with it: every process it started is
    gone, and the autoscaler monitor is killed first rather than terminated
    after the GCS (where it waited out Ray's one-second grace period on every
    command's exit)."""
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", STOP_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["initialized"] is False
    assert report["monitor_returncode"] == -9  # ours; Ray's own shutdown sends SIGTERM
    still = []
    for pid in report["pids"]:
        try:
            os.kill(pid, 0)
            # A zombie of a process Ray started is gone in all but name.
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] != "Z":
                    still.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    assert not still, f"Ray processes outlived the command: {still}"


class _AddOne:
    def __init__(self, *, by: int) -> None:
        self.by = by

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.set_column(0, "x", pa.array([v + self.by for v in batch.column("x").to_pylist()]))


def test_ray_data_operators_carry_the_stage_names(ray_session):
    """Logs, progress and the dashboard show `probe` or `transcode`, not the
    helper that calls a stage or the class that implements it."""
    import ray

    from engine.curate.ledger import start_ledger
    from engine.runtime.stages import StageStep, apply_stage

    clock = start_ledger("reelsift_ledger_names_test", 4)
    try:
        ds = ray.data.from_arrow(pa.table({"x": [1, 2, 3]}))
        tasks = StageStep("stateless_stage", _AddOne, {"by": 1}, num_cpus=0.25, batch_size=2, actors=False, fuse=False)
        actors = StageStep("pooled_stage", _AddOne, {"by": 10}, num_cpus=0.25, batch_size=2)
        ds = apply_stage(apply_stage(ds, tasks, "reelsift_ledger_names_test", 2, 0), actors,
                         "reelsift_ledger_names_test", 2, 0)
        assert sorted(r["x"] for r in ds.take_all()) == [12, 13, 14]
        stats = ds.stats()
    finally:
        ray.kill(clock)
    assert "MapBatches(stateless_stage)" in stats and "MapBatches(pooled_stage)" in stats, stats
    assert "_call_stage" not in stats and "_AddOne" not in stats
