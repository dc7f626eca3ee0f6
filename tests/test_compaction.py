"""Compaction: curate merges its fragments while it runs and at its end, the
rows stay exactly the same (for readers of old and new versions), resume and
roll-forward keep working, indexes survive, a crash mid-compaction loses
nothing, old versions go after the retention window, and task=compact does
the same to an existing output."""

from __future__ import annotations

import time

import lance
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.compact import run as run_compact
from engine.curate.task import run as run_curate
from engine.store.compaction import compact_and_retire, retire_versions
from engine.store.outputs import OutputLayout

FAST = ["transcode.preset=ultrafast", "preview.enabled=false", "motion.mode=disable", "split.clip_len_s=1",
        "split.min_clip_s=0.5", "write.commit_every_rows=1", "write.resources.batch_size=1"]


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def rows(uri) -> list[tuple]:
    table = lance.dataset(str(uri)).to_table(columns=["clip_id", "start_frame", "end_frame", "num_bytes", "passed"])
    return sorted(tuple(r.values()) for r in table.to_pylist())


@pytest.fixture(scope="module")
def inputs(good_videos):
    return [str(good_videos[n]) for n in ("short_15fps_3s.mp4", "odd_25fps_12s.mp4", "tiny_24fps_1s.mp4")]


def curate(inputs, out, *extra: str) -> dict:
    cfg = config(f"output={out}", *FAST, *extra)
    cfg.input = inputs
    return run_curate(cfg)


@pytest.fixture(scope="module")
def uncompacted(ray_session, inputs, tmp_path_factory):
    """An output curated with compaction off: one fragment (at least) per commit."""
    out = tmp_path_factory.mktemp("uncompacted") / "out"
    curate(inputs, out, "write.compact_every_fragments=null", "write.target_rows_per_fragment=1")
    return out


def test_curate_compacts_while_running_and_at_the_end(ray_session, inputs, uncompacted, tmp_path):
    before = lance.dataset(uncompacted / "clips.lance")
    assert len(before.get_fragments()) >= 10  # target 1 row per fragment: nothing merged
    out = tmp_path / "out"
    summary = curate(inputs, out, "write.compact_every_fragments=4")
    clips = lance.dataset(out / "clips.lance")
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")
    assert summary["run"]["compactions_while_running"] >= 1
    assert len(clips.get_fragments()) == 1 and len(lance.dataset(out / "videos.lance").get_fragments()) == 1
    assert [r["fragments_after"] for r in summary["run"]["compaction"]] == [1, 1]
    # The two tables still match, and the same command resumes: every video done, nothing written twice.
    snap_clips, snap_videos = OutputLayout(str(out)).snapshot()
    assert snap_clips.version == clips.version and snap_videos.count_rows() == len(inputs)
    again = curate(inputs, out, "write.compact_every_fragments=4")
    assert again["run"]["resumed"] and again["run"]["videos_skipped"] == len(inputs)
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")


def test_task_compact_merges_an_old_output_and_keeps_its_index(uncompacted, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(uncompacted, out)
    clips_uri = str(out / "clips.lance")
    lance.dataset(clips_uri).create_scalar_index("clip_id", "BTREE")
    old = lance.dataset(clips_uri)
    old_version, some = old.version, rows(clips_uri)[3][0]
    summary = run_compact(config("task=compact", f"output={out}"))
    assert [t["fragments_after"] for t in summary["tables"]] == [1, 1]
    clips = lance.dataset(clips_uri)
    assert rows(clips_uri) == rows(uncompacted / "clips.lance")
    assert [i["fields"] for i in clips.list_indices()] == [["clip_id"]]
    hit = clips.to_table(filter=f"clip_id = '{some}'", columns=["clip_id"])
    assert hit.column("clip_id").to_pylist() == [some]
    # A reader of the version before the compaction (within the retention window) still reads it whole.
    assert sorted(lance.dataset(clips_uri, version=old_version).to_table(columns=["clip_id"])
                  .column("clip_id").to_pylist()) == sorted(r[0] for r in rows(clips_uri))
    with pytest.raises(FileNotFoundError, match="run task=curate on this output first"):
        run_compact(config("task=compact", f"output={tmp_path / 'none'}"))


def test_a_crash_during_compaction_loses_nothing(ray_session, inputs, uncompacted, tmp_path):
    import shutil

    from lance.optimize import Compaction, CompactionOptions

    out = tmp_path / "crashed"
    shutil.copytree(uncompacted, out)
    ds = lance.dataset(out / "clips.lance")
    files_before = set((out / "clips.lance" / "data").iterdir())
    plan = Compaction.plan(ds, CompactionOptions(target_rows_per_fragment=4096))
    for task in plan.tasks:
        task.execute(ds)  # the rewritten files exist; the crash comes before Compaction.commit
    half_done = set((out / "clips.lance" / "data").iterdir()) - files_before
    assert half_done and lance.dataset(out / "clips.lance").version == ds.version
    again = curate(inputs, out, "write.compact_every_fragments=4")  # the same command after the crash
    assert again["run"]["resumed"] and again["run"]["videos_skipped"] == len(inputs)
    assert not any(f.exists() for f in half_done)  # removed as orphans when the run reopened the output
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")
    assert len(lance.dataset(out / "clips.lance").get_fragments()) == 1


def test_versions_go_only_once_superseded_longer_than_the_window(tmp_path):
    uri = str(tmp_path / "t.lance")
    for i in range(4):
        lance.write_dataset(pa.table({"x": [i]}), uri, mode="append")
    compact_and_retire(uri, target_rows=100, keep_s=None)
    versions = [v["version"] for v in lance.dataset(uri).versions()]
    assert len(versions) >= 5
    assert retire_versions(lance.dataset(uri), keep_s=3600) == (0, 0)  # all superseded just now
    time.sleep(1.2)
    removed, _ = retire_versions(lance.dataset(uri), keep_s=1.0)
    left = [v["version"] for v in lance.dataset(uri).versions()]
    assert removed == len(versions) - 1 and left == versions[-1:]
    assert sorted(lance.dataset(uri).to_table().column("x").to_pylist()) == [0, 1, 2, 3]


def clips_by_video(uri) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(lance.dataset(str(uri)).to_table(columns=["video_id"]).column("video_id").to_pylist()))


def test_compaction_during_a_running_curate_with_readers_open(ray_session, inputs, uncompacted, tmp_path):
    """Readers poll the output while curate commits and compacts (every 2
    fragments, and at the end): each read sees whole videos, no clip twice;
    a reader that opened a version early and a ClipDataset opened mid-run
    read their version whole after the compactions; the end has the clean
    run's rows."""
    import threading

    from engine.training import ClipDataset

    out = tmp_path / "live"
    clips_uri = out / "clips.lance"
    per_video = clips_by_video(uncompacted / "clips.lance")
    stop, problems, seen = threading.Event(), [], []
    held: dict = {}

    def read() -> None:
        while not stop.is_set():
            try:
                ds = lance.dataset(str(clips_uri))
                table = ds.to_table(columns=["clip_id", "video_id"])
            except (ValueError, OSError):  # not created yet
                time.sleep(0.02)
                continue
            ids = table.column("clip_id").to_pylist()
            if len(ids) != len(set(ids)):
                problems.append(("clip twice", ds.version))
            videos = table.column("video_id").to_pylist()
            for video in set(videos):
                if videos.count(video) != per_video[video]:
                    problems.append(("part of a video", ds.version, video))
            seen.append((ds.version, len(ids)))
            if ids and "pinned" not in held:
                held["pinned"], held["pinned_ids"] = ds, sorted(ids)
                loader = ClipDataset(str(out), num_frames=4, shuffle=False, caption=None, version=ds.version)
                held["iterator"] = iter(loader)
                held["first"] = next(held["iterator"])["clip_id"]
            time.sleep(0.02)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        summary = curate(inputs, out, "write.compact_every_fragments=2")
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not problems, problems[:5]
    assert seen and summary["run"]["compactions_while_running"] >= 1
    final = lance.dataset(str(clips_uri))
    assert len(final.get_fragments()) == 1
    assert rows(clips_uri) == rows(uncompacted / "clips.lance")
    # The early readers' version was compacted over (at least by the end-of-run
    # compaction) and still reads whole, media included.
    pinned = held["pinned"]
    assert pinned.version < final.version
    assert sorted(pinned.to_table(columns=["clip_id"]).column("clip_id").to_pylist()) == held["pinned_ids"]
    rest = [sample["clip_id"] for sample in held["iterator"]]
    pinned_curated = sorted(pinned.to_table(columns=["clip_id"], filter="passed AND error IS NULL")
                            .column("clip_id").to_pylist())
    assert sorted([held["first"], *rest]) == pinned_curated


def test_resume_after_compaction_adds_only_the_new_videos(ray_session, inputs, uncompacted, tmp_path):
    out = tmp_path / "grown"
    first = curate(inputs[:2], out, "write.compact_every_fragments=2")
    assert [r["fragments_after"] for r in first["run"]["compaction"]] == [1, 1]
    again = curate(inputs, out, "write.compact_every_fragments=2")
    assert again["run"]["resumed"] and again["run"]["videos_skipped"] == 2
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")
    snap_clips, snap_videos = OutputLayout(str(out)).snapshot()
    assert snap_clips.version == lance.dataset(out / "clips.lance").version
    assert snap_videos.count_rows() == len(inputs)
    assert clips_by_video(out / "clips.lance") == clips_by_video(uncompacted / "clips.lance")


def test_a_crash_during_task_compact_then_the_same_command(uncompacted, tmp_path):
    import shutil

    from lance.optimize import Compaction, CompactionOptions

    out = tmp_path / "crashed_compact"
    shutil.copytree(uncompacted, out)
    ds = lance.dataset(out / "clips.lance")
    version = ds.version
    plan = Compaction.plan(ds, CompactionOptions(target_rows_per_fragment=4096))
    for task in plan.tasks:
        task.execute(ds)  # killed before Compaction.commit: rewritten files, no new version
    assert lance.dataset(out / "clips.lance").version == version
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")
    summary = run_compact(config("task=compact", f"output={out}"))
    assert [t["fragments_after"] for t in summary["tables"]] == [1, 1]
    assert rows(out / "clips.lance") == rows(uncompacted / "clips.lance")
    assert clips_by_video(out / "clips.lance") == clips_by_video(uncompacted / "clips.lance")
    # The next curate on it resumes with every video done (the bookkeeping survived).
    snap_clips, snap_videos = OutputLayout(str(out)).snapshot()
    assert snap_clips.version == lance.dataset(out / "clips.lance").version and snap_videos.count_rows() == 3


def test_version_cleanup_never_breaks_an_open_reader(uncompacted, tmp_path):
    """Readers in the middle of reading the latest version (a scan part-way,
    a ClipDataset mid-epoch) when task=compact rewrites the table and retires
    versions: their version was superseded just now, inside the window, so it
    stays and they finish with every row. Past the window it goes, and the
    latest version reads whole."""
    import shutil

    from engine.training import ClipDataset

    out = tmp_path / "readers"
    shutil.copytree(uncompacted, out)
    clips_uri = str(out / "clips.lance")
    time.sleep(1.1)  # the copied run's own versions are now superseded longer than the window
    ds = lance.dataset(clips_uri)
    scan = ds.to_batches(columns=["clip_id"], batch_size=2)
    scanned = next(scan).column("clip_id").to_pylist()
    loader = iter(ClipDataset(str(out), num_frames=4, shuffle=False, caption=None))
    taken = [next(loader)["clip_id"]]
    summary = run_compact(config("task=compact", f"output={out}", "write.keep_versions_s=1"))
    assert summary["versions_removed"] >= 1  # older versions went ...
    assert ds.version in [v["version"] for v in lance.dataset(clips_uri).versions()]  # ... the readers' did not
    scanned += [i for b in scan for i in b.column("clip_id").to_pylist()]
    taken += [sample["clip_id"] for sample in loader]
    assert sorted(scanned) == sorted(r[0] for r in rows(uncompacted / "clips.lance"))
    curated = lance.dataset(uncompacted / "clips.lance").to_table(columns=["clip_id"], filter="passed AND error IS NULL")
    assert sorted(taken) == sorted(curated.column("clip_id").to_pylist())
    time.sleep(1.2)
    again = run_compact(config("task=compact", f"output={out}", "write.keep_versions_s=1"))
    assert again["versions_removed"] >= 1
    assert ds.version not in [v["version"] for v in lance.dataset(clips_uri).versions()]
    assert rows(clips_uri) == rows(uncompacted / "clips.lance")
