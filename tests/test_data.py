"""ClipDataset and the Ray Data path over a real clip table (`training_output`:
one small curate run of barcode videos plus the columns later stages add)."""

from __future__ import annotations

import collections

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from udfs.media.frames import FrameSpec, ShortClip, window_indices
from engine.training.dataset import ClipDataset, epoch_order, share_of
from udfs.schema import blob_field
from engine.sample import read_frame_index
from engine.store.views import curated_filter


def hwc(frames: torch.Tensor) -> np.ndarray:
    return frames.permute(0, 2, 3, 1).numpy()


def clip_rows(out) -> dict[str, dict]:
    table = lance.dataset(str(out / "clips.lance")).to_table(
        columns=["clip_id", "start_frame", "num_frames", "fps", "passed", "error", "duplicate", "caption",
                 "caption_windows"])
    return {r["clip_id"]: r for r in table.to_pylist()}


def curated_ids(out) -> set[str]:
    return {c for c, r in clip_rows(out).items() if r["passed"] and r["error"] is None and not r["duplicate"]}


# ------------------------------------------------------------------ planning
def test_curated_filter_follows_the_schema():
    base = pa.schema([pa.field("passed", pa.bool_()), pa.field("error", pa.string())])
    assert curated_filter(base) == "passed AND error IS NULL"
    assert curated_filter(base.append(pa.field("duplicate", pa.bool_()))) == \
        "passed AND error IS NULL AND duplicate IS NOT TRUE"


def test_window_indices_stride_fps_and_short_policies():
    rng = np.random.default_rng(0)
    idx, short = window_indices(FrameSpec.window(4, frame_stride=3), lo=0, hi=48, clip_fps=24, rng=rng)
    assert not short and list(np.diff(idx)) == [3, 3, 3] and 0 <= idx[0] <= 48 - 10
    idx, _ = window_indices(FrameSpec.window(5, fps=12), lo=10, hi=20, clip_fps=24, rng=None)
    assert list(idx) == [10, 12, 14, 16, 18]  # 24 fps clip sampled at 12 fps: every 2nd frame
    with pytest.raises(ShortClip):
        window_indices(FrameSpec.window(6, frame_stride=2), lo=0, hi=10, clip_fps=24, rng=None)
    idx, short = window_indices(FrameSpec.window(6, frame_stride=2, short_clips="pad"), lo=0, hi=10, clip_fps=24,
                                rng=None)
    assert short and list(idx) == [0, 2, 4, 6, 8, 9]
    idx, _ = window_indices(FrameSpec.window(6, frame_stride=2, short_clips="loop"), lo=0, hi=10, clip_fps=24,
                            rng=None)
    assert list(idx) == [0, 2, 4, 6, 8, 0]
    with pytest.raises(ValueError, match="not both"):
        FrameSpec.window(4, fps=8, frame_stride=2)


def test_window_geometry_covers_then_centre_crops():
    square = FrameSpec.window(4, size=64)
    assert square.output_size == (64, 64) and square.scaled_hw(108, 192) == (64, 114)  # 16:9: sides cropped
    # Portrait into landscape: scaled to cover the width, top and bottom cropped.
    assert FrameSpec.window(4, size=(60, 80)).scaled_hw(160, 120) == (107, 80)
    assert FrameSpec.window(4).output_size is None and FrameSpec.window(4).scaled_hw(120, 160) == (120, 160)


def test_shares_partition_every_epoch():
    for n in (0, 1, 7, 10):
        order = epoch_order(n, seed=5, epoch=2, shuffle=True)
        shares = [share_of(order, rank=r, world_size=2, worker=w, num_workers=3) for r in range(2) for w in range(3)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(n))


# ------------------------------------------------------------------ samples
def test_frames_are_the_clips_frames_at_the_planned_indices(training_output):
    rows = clip_rows(training_output)
    ds = ClipDataset(training_output, num_frames=6, frame_stride=3, caption="clip", columns=("embedding",),
                     shuffle=False, seed=1)
    samples = list(ds)
    assert sorted(s["clip_id"] for s in samples) == sorted(curated_ids(training_output))
    assert ds.counts["samples"] == len(samples) == 7 and ds.counts["decode_errors"] == 0
    offsets = set()
    for s in samples:
        row = rows[s["clip_id"]]
        idx = s["frame_indices"].tolist()
        assert np.diff(idx).tolist() == [3] * 5 and 0 <= idx[0] and idx[-1] < row["num_frames"]
        assert s["frames"].dtype == torch.uint8 and s["frames"].shape[:2] == (6, 3)
        # The barcode in each decoded frame is its source frame number.
        assert [read_frame_index(f) for f in hwc(s["frames"])] == [row["start_frame"] + i for i in idx]
        assert s["caption"] == row["caption"] and s["caption_frames"].tolist() == [0, row["num_frames"]]
        assert s["embedding"].shape == (8,) and s["embedding"].dtype == torch.float32
        offsets.add(idx[0])
    assert len(offsets) > 1  # each clip draws its own start
    # The same seed and epoch draw the same frames; another epoch draws others.
    again = {s["clip_id"]: s["frame_indices"].tolist() for s in ds}
    assert again == {s["clip_id"]: s["frame_indices"].tolist() for s in samples}
    ds.set_epoch(1)
    assert {s["clip_id"]: s["frame_indices"].tolist() for s in ds} != again


def test_fps_resampling_and_resize(training_output):
    rows = clip_rows(training_output)
    ds = ClipDataset(training_output, num_frames=4, fps=6, size=(60, 80), caption=None, shuffle=False)
    for s in ds:
        row = rows[s["clip_id"]]
        step = row["fps"] / 6
        idx = s["frame_indices"].tolist()
        assert np.diff(idx).tolist() == [round(step * (i + 1)) - round(step * i) for i in range(3)]
        assert s["frames"].shape == (4, 3, 60, 80) and "caption" not in s
        if row["fps"] == 24:  # 160x120 -> 80x60 keeps the aspect: no crop, barcode readable at half size
            assert [read_frame_index(f) for f in hwc(s["frames"])] == [row["start_frame"] + i for i in idx]


def test_window_captions_come_with_their_frames(training_output):
    rows = clip_rows(training_output)
    ds = ClipDataset(training_output, num_frames=4, frame_stride=2, caption="window_enhanced", shuffle=False, seed=3)
    seen_windows = collections.Counter()
    # Windows are drawn per (seed, epoch, row id): over a few epochs both get drawn, whatever the row ids.
    samples = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        samples += list(ds)
    for s in samples:
        row = rows[s["clip_id"]]
        start, end = s["caption_frames"].tolist()
        window = next(w for w in row["caption_windows"] if (w["start_frame"], w["end_frame"]) == (start, end))
        # Enhanced caption where there is one, else the window's own.
        assert s["caption"] == (window["caption_enhanced"] or window["caption"])
        assert all(start <= i < end for i in s["frame_indices"].tolist())
        seen_windows[start == 0] += 1
    assert set(seen_windows) == {True, False}  # both windows get drawn


def test_short_clips_skip_pad_loop_are_counted(training_output):
    rows = clip_rows(training_output)
    # 30 frames every 2nd need 59 clip frames: the 48- and 50-frame clips are short, the 60-frame ones are not.
    short = {c for c in curated_ids(training_output) if rows[c]["num_frames"] < 59}
    assert 0 < len(short) < 7
    skip = ClipDataset(training_output, num_frames=30, frame_stride=2, size=32, caption=None, short_clips="skip")
    assert {s["clip_id"] for s in skip} == curated_ids(training_output) - short
    assert skip.counts["short_skipped"] == len(short)
    for policy in ("pad", "loop"):
        ds = ClipDataset(training_output, num_frames=30, frame_stride=2, caption=None, short_clips=policy,
                         shuffle=False)
        for s in ds:
            row = rows[s["clip_id"]]
            idx = s["frame_indices"].tolist()
            assert len(idx) == 30 and max(idx) < row["num_frames"]
            assert [read_frame_index(f) for f in hwc(s["frames"])] == [row["start_frame"] + i for i in idx]
            if s["clip_id"] in short:
                expect = [min(2 * i, row["num_frames"] - 1) if policy == "pad" else (2 * i) % row["num_frames"]
                          for i in range(30)]
                assert idx == expect
        assert ds.counts[f"short_{'padded' if policy == 'pad' else 'looped'}"] == len(short)
        assert ds.counts["samples"] == 7


def test_missing_columns_fail_when_the_dataset_is_made(tmp_path, training_output):
    with pytest.raises(ValueError, match="no column"):
        ClipDataset(training_output, columns=("nope",))
    with pytest.raises(FileNotFoundError):
        ClipDataset(tmp_path / "none")


# ------------------------------------------------------------- sharding, state
def collect(loader) -> list[str]:
    return [c for batch in loader for c in batch["clip_id"]]


def test_two_ranks_two_workers_see_every_clip_once_per_epoch(training_output):
    """2 simulated ranks x 2 spawned DataLoader workers (persistent), two
    epochs: each epoch covers the curated view exactly once, in a new order."""
    curated = curated_ids(training_output)
    ranks = [ClipDataset(training_output, num_frames=2, size=16, caption=None, seed=7, rank=r, world_size=2)
             for r in range(2)]
    loaders = [ds.loader(batch_size=1, num_workers=2, persistent_workers=True) for ds in ranks]
    epochs = []
    for epoch in range(2):
        for ds in ranks:
            ds.set_epoch(epoch)
        per_rank = [collect(loader) for loader in loaders]
        seen = per_rank[0] + per_rank[1]
        assert sorted(seen) == sorted(curated), f"epoch {epoch}: {collections.Counter(seen)}"
        assert not set(per_rank[0]) & set(per_rank[1])
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # the order changes with the epoch
    assert sorted(epochs[0][0] + epochs[0][1]) == sorted(epochs[1][0] + epochs[1][1])


def test_fork_after_lance_fails_fast_instead_of_hanging(training_output):
    ds = ClipDataset(training_output, num_frames=2, size=16, caption=None)
    loader = DataLoader(ds, batch_size=1, num_workers=1, multiprocessing_context="fork", timeout=120)
    with pytest.raises(RuntimeError, match="not fork-safe"):
        next(iter(loader))


def test_resume_in_process_yields_exactly_the_rest(training_output):
    def make():
        return ClipDataset(training_output, num_frames=3, frame_stride=2, size=24, caption="window", seed=11)

    ds = make()
    ds.set_epoch(4)
    full = [(s["clip_id"], s["frame_indices"].tolist(), s["caption"]) for s in ds]
    ds.set_epoch(4)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = ds.state_dict()
    assert state["cursor"] == 3 and state["epoch"] == 4 and state["counts"]["samples"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a training loop sets the epoch again: the loaded state stays
    tail = [(s["clip_id"], s["frame_indices"].tolist(), s["caption"]) for s in resumed]
    assert [(s["clip_id"], s["frame_indices"].tolist(), s["caption"]) for s in head] + tail == full
    assert resumed.counts["samples"] == len(full)
    # A state from another sharding is refused, not silently misapplied.
    other = ClipDataset(training_output, num_frames=3, frame_stride=2, size=24, caption="window", seed=11,
                        rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


def test_resume_with_workers_yields_exactly_the_rest(training_output):
    def make():
        ds = ClipDataset(training_output, num_frames=2, size=16, caption=None, seed=2)
        ds.set_epoch(3)
        return ds

    loader = make().loader(batch_size=1, num_workers=2)
    it = iter(loader)
    head = [next(it)["clip_id"][0] for _ in range(3)]
    state = loader.state_dict()
    rest = [b["clip_id"][0] for b in it]
    assert sorted(head + rest) == sorted(curated_ids(training_output))
    resumed = make().loader(batch_size=1, num_workers=2)
    resumed.load_state_dict(state)
    assert [b["clip_id"][0] for b in resumed] == rest


# ------------------------------------------------------------- broken media
def test_a_broken_blob_is_a_counted_skip(training_output, tmp_path):
    """A copy of the table with one clip's mp4 replaced by garbage: the epoch
    completes with every other clip, and the bad one is counted."""
    clips = lance.dataset(str(training_output / "clips.lance"))
    table = clips.to_table(columns=[n for n in clips.schema.names if n not in ("mp4", "preview_webp")],
                           filter="passed AND error IS NULL AND duplicate IS NOT TRUE", with_row_id=True)
    ids = table.column("_rowid").to_pylist()
    mp4 = dict(clips.read_blobs("mp4", ids=ids))
    blobs = [mp4[i] for i in ids]
    broken_id = table.column("clip_id")[0].as_py()
    blobs[0] = b"\x00\x00\x00\x18ftypmp42" + bytes(2000)
    table = table.drop_columns(["_rowid"]).append_column(blob_field("mp4"), pa.array(blobs, pa.large_binary()))
    lance.write_dataset(table, str(tmp_path / "clips.lance"))
    ds = ClipDataset(tmp_path, num_frames=2, size=16, caption=None)
    got = {s["clip_id"] for s in ds}
    assert got == curated_ids(training_output) - {broken_id}
    assert ds.counts["decode_errors"] == 1 and ds.counts["samples"] == len(got)


# ------------------------------------------------------------------ Ray Data
def test_ray_data_path_yields_the_same_samples(ray_session, training_output):
    from engine.training.ray_data import SampleCollate, ray_dataset

    kwargs = dict(num_frames=3, frame_stride=2, size=(60, 80), caption="window", columns=("embedding",), seed=9)
    expected = {s["clip_id"]: s for s in ClipDataset(training_output, shuffle=False, **kwargs)}
    got = {}
    for batch in ray_dataset(training_output, batch_size=4, **kwargs).iter_torch_batches(
            batch_size=3, collate_fn=SampleCollate()):
        assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape[1:] == (3, 3, 60, 80)
        for i, clip_id in enumerate(batch["clip_id"]):
            got[clip_id] = {k: v[i] for k, v in batch.items()}
    assert set(got) == set(expected) == curated_ids(training_output)
    for clip_id, s in expected.items():
        assert got[clip_id]["caption"] == s["caption"]
        assert torch.equal(got[clip_id]["frame_indices"], s["frame_indices"])
        assert torch.equal(got[clip_id]["frames"], s["frames"])
        assert torch.equal(got[clip_id]["embedding"], s["embedding"])


def test_batches_made_by_the_dataset(training_output):
    """ClipDataset(batch_size=3) with 2 workers: batches of decoded frames
    (from shared memory), every curated clip once, and resumable."""
    rows = clip_rows(training_output)

    def make():
        ds = ClipDataset(training_output, num_frames=4, frame_stride=2, size=(60, 80), caption="clip",
                         columns=("start_frame",), seed=4, batch_size=3)
        ds.set_epoch(2)
        return ds

    loader = make().loader(num_workers=2)
    batches = list(loader)
    seen = [c for b in batches for c in b["clip_id"]]
    assert sorted(seen) == sorted(curated_ids(training_output))
    for b in batches:
        n = len(b["clip_id"])
        assert 1 <= n <= 3 and b["frames"].shape == (n, 4, 3, 60, 80) and b["frame_indices"].shape == (n, 4)
        assert b["caption"] == [rows[c]["caption"] for c in b["clip_id"]]
        for i, clip_id in enumerate(b["clip_id"]):
            row = rows[clip_id]
            assert int(b["start_frame"][i]) == row["start_frame"]
            if row["fps"] == 24:  # 160x120 -> 80x60: the barcode stays readable
                assert [read_frame_index(f) for f in hwc(b["frames"][i])] == [
                    row["start_frame"] + j for j in b["frame_indices"][i].tolist()]
    loader = make().loader(num_workers=2)
    it = iter(loader)
    first = next(it)
    state = loader.state_dict()
    rest = [c for b in it for c in b["clip_id"]]
    resumed = make().loader(num_workers=2)
    resumed.load_state_dict(state)
    assert [c for b in resumed for c in b["clip_id"]] == rest
    assert sorted(list(first["clip_id"]) + rest) == sorted(seen)
    with pytest.raises(TypeError, match="no fixed length"):
        len(make())
