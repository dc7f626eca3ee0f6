"""Runs that survive: a crash at any point of a commit, a killed driver, a
changed config, an S3 output. After the same command again, the tables are
exactly those of a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lance
import pytest
from hydra import compose, initialize_config_dir

import engine.curate.commits
from engine.cli import CONFIG_DIR
from engine.curate.task import run
from engine.store.outputs import OutputLayout
from engine.curate.resume import ResumeError
from engine.sample import write_video
from udfs.uris import lance_storage_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small clips, two videos per transcode task and two rows per writer call, a
# commit as soon as a video is complete: many commits in a few seconds of video.
SETTINGS = ["transcode.preset=ultrafast", "preview.enabled=false", "split.clip_len_s=2", "split.min_clip_s=1",
            "transcode.resources.batch_size=2", "write.commit_every_rows=1", "write.resources.batch_size=2"]


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


class Crash(BaseException):
    """Stands in for the process dying: nothing in the engine catches it."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_inputs")
    for i in range(8):
        write_video(root / f"v{i}.mp4", width=96, height=64, fps=15, seconds=3 + i % 3)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 2048)
    return root


def tables(output: str, storage_options=None) -> dict:
    """The two tables as comparable, order-free values (no media bytes)."""
    clips = lance.dataset(f"{output}/clips.lance", storage_options=storage_options)
    videos = lance.dataset(f"{output}/videos.lance", storage_options=storage_options)
    clip_rows = sorted(
        (r["clip_id"], r["video_id"], r["start_frame"], r["end_frame"], r["num_frames"], r["error"], r["passed"])
        for r in clips.to_table(columns=["clip_id", "video_id", "start_frame", "end_frame", "num_frames", "error",
                                         "passed"]).to_pylist())
    video_rows = sorted(
        (r["video_id"], r["num_frames"], r["span_end_frames"] and tuple(r["span_end_frames"]), r["num_clips"],
         r["num_clip_errors"], (r["error"] or "")[:40])
        for r in videos.to_table(columns=["video_id", "num_frames", "span_end_frames", "num_clips",
                                          "num_clip_errors", "error"]).to_pylist())
    return {"clips": clip_rows, "videos": video_rows}


def assert_whole_videos(output: str, storage_options=None) -> int:
    """Every committed video has all of its clips, every clip its video, and
    nothing is there twice. Returns the number of videos committed."""
    got = tables(output, storage_options)
    ids = [c[0] for c in got["clips"]]
    assert len(ids) == len(set(ids)), "duplicate clip rows"
    per_video: dict[str, int] = {}
    for clip in got["clips"]:
        per_video[clip[1]] = per_video.get(clip[1], 0) + 1
    expected = {v[0]: v[3] + v[4] for v in got["videos"] if v[3] + v[4]}
    assert per_video == expected, "a video is half there"
    return len(got["videos"])


def unreferenced_files(output: str) -> set[str]:
    """Data files no kept version references (a compaction's old versions
    keep theirs until retired)."""
    found = set()
    for name in ("clips.lance", "videos.lance"):
        uri = os.path.join(output, name)
        referenced = {f.path for v in lance.dataset(uri).versions()
                      for frag in lance.dataset(uri, version=v["version"]).get_fragments() for f in frag.data_files()}
        on_disk = set(os.listdir(os.path.join(output, name, "data")))
        found |= {f"{name}/{p}" for p in on_disk - {os.path.basename(r) for r in referenced}}
    return found


@pytest.fixture(scope="module")
def clean(ray_session, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    summary = run(config(f"input={inputs}", f"output={out}", *SETTINGS))
    assert summary["videos"] == 9 and summary["videos_failed"] == 1 and summary["run"]["commits"] >= 3
    return str(out), tables(str(out)), summary


def crashed_run(cfg, monkeypatch, table: str, call: int) -> None:
    """Run `cfg` and let it die at the `call`-th commit to `table`
    (clips.lance | videos.lance), after everything before that commit."""
    real = engine.curate.commits.commit_append
    seen = {"n": 0}

    def commit_append(uri, *args, **kwargs):
        if uri.rstrip("/").endswith(table):
            seen["n"] += 1
            if seen["n"] == call:
                raise Crash(f"killed before commit {call} of {table}")
        return real(uri, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine.curate.commits, "commit_append", commit_append)
        with pytest.raises(Crash):
            run(cfg)


def test_streaming_commits_and_bounded_admission(clean, ray_session, inputs, tmp_path):
    """Videos are committed as they finish, while later ones are still being
    admitted, and never more than the limit are in flight."""
    _, expected, summary = clean
    clips = lance.dataset(f"{clean[0]}/clips.lance")
    # The first commit held some videos, not all: commits follow the stream.
    first = next(v["version"] for v in clips.versions() if v["version"] > 1)
    assert 0 < clips.checkout_version(first).count_rows() < len(expected["clips"])
    assert summary["run"]["first_commit_s"] < summary["wall_s"]["total"]
    out = tmp_path / "bounded"
    bounded = run(config(f"input={inputs}", f"output={out}", *SETTINGS, "write.max_videos_in_flight=4",
                         "probe.resources.batch_size=1", "split.resources.batch_size=1",
                         "transcode.resources.batch_size=1"))
    assert bounded["run"]["max_videos_in_flight"] == 4
    assert 0 < bounded["run"]["most_videos_in_flight"] <= 4
    assert tables(str(out)) == expected


def test_crash_after_fragments_before_commit(clean, ray_session, inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    cfg = config(f"input={inputs}", f"output={out}", *SETTINGS)
    crashed_run(cfg, monkeypatch, "clips.lance", 2)
    committed = assert_whole_videos(out)
    assert 1 <= committed < 9
    assert unreferenced_files(out), "the interrupted commit's fragments are on disk, unreferenced"
    summary = run(cfg)
    assert summary["run"]["resumed"] and summary["run"]["videos_skipped"] == committed
    assert summary["run"]["videos_committed"] == 9 - committed
    assert tables(out) == clean[1]
    assert not unreferenced_files(out)
    assert summary["clips"] == clean[2]["clips"] and summary["videos"] == 9


def test_crash_between_clip_and_video_commit(clean, ray_session, inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    cfg = config(f"input={inputs}", f"output={out}", *SETTINGS)
    crashed_run(cfg, monkeypatch, "videos.lance", 2)
    # clips.lance holds a commit whose video rows did not land; a reader
    # taking a snapshot still sees whole videos only.
    clips_now = lance.dataset(f"{out}/clips.lance")
    clips, videos = OutputLayout(out).snapshot()
    assert clips.version < clips_now.version
    snap_videos = set(videos.to_table(columns=["video_id"])["video_id"].to_pylist())
    assert set(clips.to_table(columns=["video_id"])["video_id"].to_pylist()) <= snap_videos
    summary = run(cfg)
    assert summary["run"]["rolled_forward"] == 1
    assert tables(out) == clean[1]


def test_resume_refuses_changed_clip_settings(clean, ray_session, inputs):
    out = clean[0]
    with pytest.raises(ResumeError, match=r"split\.clip_len_s \(2 -> 3\)") as err:
        run(config(f"input={inputs}", f"output={out}", *SETTINGS, "split.clip_len_s=3"))
    assert "overwrite=true" in str(err.value) and "resume=force" in str(err.value)
    with pytest.raises(ResumeError, match=r"transcode\.crf"):
        run(config(f"input={inputs}", f"output={out}", *SETTINGS, "transcode.crf=30"))
    # Speed settings are not clip settings; force continues anyway.
    assert run(config(f"input={inputs}", f"output={out}", *SETTINGS, "transcode.threads=1",
                      "transcode.video_workers=1", "write.resources.batch_size=4"))["run"]["videos_skipped"] == 9
    forced = run(config(f"input={inputs}", f"output={out}", *SETTINGS, "split.clip_len_s=3", "resume=force"))
    assert forced["run"]["forced"] and forced["clips"] == clean[2]["clips"]
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(config(f"input={inputs}", f"output={out}", *SETTINGS, "resume=false"))
    assert tables(out) == clean[1]


def cli(inputs, out, *extra) -> list[str]:
    return [sys.executable, "-m", "engine", f"input={inputs}", f"output={out}", *SETTINGS, "ray.num_cpus=2", *extra]


def committed_videos(out) -> int:
    try:
        return lance.dataset(os.path.join(out, "videos.lance")).count_rows()
    except (ValueError, OSError):
        return 0


@pytest.mark.slow
def test_kill_9_of_the_driver_then_the_same_command(clean, inputs, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cli(inputs, out), cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while committed_videos(out) < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no commit within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        # The driver's own Ray processes (started in its session) go too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = assert_whole_videos(out)
    assert before < 9, "the run finished before it was killed"
    again = subprocess.run(cli(inputs, out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["resumed"] and summary["run"]["videos_skipped"] >= before
    assert tables(out) == clean[1]
    assert not unreferenced_files(out)


# ------------------------------------------------------------------ S3

@pytest.fixture(scope="module")
def s3(local_s3, inputs):
    client, opts = local_s3
    # Bucket names of our own: moto keeps one store per process, shared with test_s3.
    client.create_bucket(Bucket="resume-raw")
    client.create_bucket(Bucket="resume-out")
    for path in sorted(inputs.iterdir()):
        client.upload_file(str(path), "resume-raw", f"in/{path.name}")
    return client, opts


def s3_keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="resume-out", Prefix=prefix)
    return {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_resume_after_a_crash_on_s3(ray_session, s3, monkeypatch):
    client, opts = s3
    lance_opts = lance_storage_options(opts)

    def s3_config(output: str):
        cfg = config("input=s3://resume-raw/in/", f"output={output}", *SETTINGS)
        cfg.storage_options = opts
        return cfg

    run(s3_config("s3://resume-out/clean"))
    expected = tables("s3://resume-out/clean", lance_opts)
    crashed_run(s3_config("s3://resume-out/run"), monkeypatch, "clips.lance", 2)
    committed = assert_whole_videos("s3://resume-out/run", lance_opts)
    assert 1 <= committed < 9
    summary = run(s3_config("s3://resume-out/run"))
    assert summary["run"]["videos_skipped"] == committed
    assert tables("s3://resume-out/run", lance_opts) == expected
    uri = "s3://resume-out/run/clips.lance"
    referenced = {f.path for v in lance.dataset(uri, storage_options=lance_opts).versions()
                  for frag in lance.dataset(uri, version=v["version"], storage_options=lance_opts).get_fragments()
                  for f in frag.data_files()}  # every kept version's: compaction keeps the old ones for a while
    assert s3_keys(client, "run/clips.lance/data/") == referenced  # the crash's fragments were removed
    stored = json.loads(client.get_object(Bucket="resume-out", Key="run/summary.json")["Body"].read())
    assert stored["clips"] == summary["clips"] > 0 and stored["videos"] == 9
