"""Scene-aware splitting: span rules, cut metrics, TransNetV2 and content detectors."""

from __future__ import annotations

import os
import random

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.sample import read_frame_index, write_transition_video, write_video
from reelsift_conf import stage_args
from udfs.split.content_detector import content_scores
from udfs.split.scene_decode import decode_small_cpu
from udfs.split.scene_metrics import match_cuts
from udfs.split.scene_rules import cut_frames, plan_spans, scenes_from_probs, spans_from_scenes, transition_runs
from udfs.media.video import decode_rgb

torch.set_num_threads(1)

# (file name, width, height, fps, scene lengths in frames): hard cuts at the scene boundaries.
CUT_VIDEOS = [
    ("cuts_a.mp4", 320, 240, 24, [72, 108, 60, 96]),
    ("cuts_b.mp4", 318, 180, 25, [62, 75, 70]),
]


def _cuts(scenes: list[int]) -> list[int]:
    return [int(c) for c in np.cumsum(scenes)[:-1]]


def _probe(path: str) -> tuple[float, int]:
    with av.open(path) as c:
        stream = c.streams.video[0]
        return float(stream.average_rate), sum(1 for _ in c.decode(stream))


@pytest.fixture(scope="module")
def cut_videos(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("cut_videos")
    out = []
    for name, w, h, fps, scenes in CUT_VIDEOS:
        path = str(write_video(root / name, width=w, height=h, fps=fps, scenes=scenes))
        probed_fps, n = _probe(path)
        out.append({"uri": path, "fps": probed_fps, "num_frames": n, "cuts": _cuts(scenes)})
    return out


def _video_table(videos: list[dict]) -> pa.Table:
    return pa.table({
        "uri": [v["uri"] for v in videos],
        "fps": [v["fps"] for v in videos],
        "num_frames": [v["num_frames"] for v in videos],
        "error": [v.get("error") for v in videos],
    })


@pytest.fixture(scope="module")
def transnet_split():
    from udfs.split.scenes import TransNetV2Split

    return TransNetV2Split(**stage_args("split", "transnetv2", device="cpu", batch_size=8))


@pytest.fixture(scope="module")
def transnet_out(transnet_split, cut_videos) -> pa.Table:
    return transnet_split(_video_table(cut_videos))


# ------------------------------------------------------------ pure span rules
def test_transition_runs_and_cut_frames() -> None:
    probs = np.zeros(20, dtype=np.float32)
    probs[4] = 0.9  # hard cut: new shot starts at 5
    probs[10:14] = 0.6  # gradual transition over frames 10..13
    assert transition_runs(probs, 0.4) == [(4, 5), (10, 14)]
    assert cut_frames(probs, 0.4) == [5, 12]
    assert cut_frames(probs, 0.7) == [5]
    # Scenes: old shot keeps the marked frame; the new starts after the run.
    assert scenes_from_probs(probs, 0.4) == [(0, 5), (5, 11), (14, 20)]


def test_no_transition_is_one_scene() -> None:
    assert scenes_from_probs(np.full(50, 0.1), 0.4) == [(0, 50)]
    assert plan_spans(np.full(100, 0.1), 10.0, threshold=0.4, crop_s=0.5, min_scene_s=2, max_scene_s=20) == [(5, 95)]
    assert scenes_from_probs([], 0.4) == []


def test_crop_and_min_rule_exact() -> None:
    # fps 10: crop 0.5 s = 5 frames each end; min 2 s = 20 frames after cropping.
    scenes = [(0, 30), (30, 59), (59, 60 + 30)]
    spans = spans_from_scenes(scenes, 10.0, min_scene_s=2.0, max_scene_s=10.0, crop_s=0.5)
    # (0,30) -> (5,25): 20 frames, kept; (30,59) -> (35,54): 19 < 20, dropped; (59,90) -> (64,85): 21 kept.
    assert spans == [(5, 25), (64, 85)]
    assert spans_from_scenes(scenes, 10.0, min_scene_s=2.0, max_scene_s=10.0, crop_s=0.0) == [(0, 30), (30, 59), (59, 90)]


def test_long_scene_stride_exact() -> None:
    # fps 10, crop 0.5 s -> (5, 255): 250 frames; max 10 s = 100 frames; remainder 50 >= min 20.
    spans = spans_from_scenes([(0, 260)], 10.0, min_scene_s=2.0, max_scene_s=10.0, long_scene_mode="stride", crop_s=0.5)
    assert spans == [(5, 105), (105, 205), (205, 255)]
    # A remainder shorter than the minimum is dropped: (5, 220) -> 100, 100, 15.
    spans = spans_from_scenes([(0, 225)], 10.0, min_scene_s=2.0, max_scene_s=10.0, long_scene_mode="stride", crop_s=0.5)
    assert spans == [(5, 105), (105, 205)]


def test_long_scene_truncate_exact() -> None:
    spans = spans_from_scenes([(0, 260), (260, 300)], 10.0, min_scene_s=2.0, max_scene_s=10.0,
                              long_scene_mode="truncate", crop_s=0.5)
    assert spans == [(5, 105), (265, 295)]


def test_rules_in_seconds_respect_bounds_at_fractional_fps() -> None:
    fps = 30000 / 1001
    spans = spans_from_scenes([(0, 1000)], fps, min_scene_s=2.0, max_scene_s=10.0, crop_s=0.5)
    for s, e in spans:
        assert 2.0 <= (e - s) / fps <= 10.0
    assert spans[0][0] == round(0.5 * fps)


def test_rule_validation() -> None:
    with pytest.raises(ValueError):
        spans_from_scenes([(0, 10)], 10.0, long_scene_mode="bogus")
    with pytest.raises(ValueError):
        spans_from_scenes([(0, 10)], 10.0, min_scene_s=5, max_scene_s=2)


def test_match_cuts_is_one_to_one() -> None:
    s = match_cuts([10, 20], [9, 10, 11, 30], tolerance=1)
    assert (s.tp, s.fp, s.fn) == (1, 3, 1)
    s = match_cuts([10, 20], [12, 19], tolerance=2)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0) and s.f1 == 1.0
    assert match_cuts([10], [12], tolerance=1).f1 == 0.0
    assert match_cuts([], [], tolerance=0).f1 == 1.0


# ---------------------------------------------------------------- TransNetV2
def test_transnetv2_finds_hard_cuts(transnet_out, cut_videos) -> None:
    rows = transnet_out.to_pylist()
    for row, video in zip(rows, cut_videos):
        assert row["error"] is None
        assert row["scene_detector"] == "transnetv2"
        detected = cut_frames(row["transition_probs"], 0.4)
        assert match_cuts(video["cuts"], detected, tolerance=2).f1 == 1.0, (video["cuts"], detected)


def test_transnetv2_probs_cover_every_frame(transnet_out, cut_videos) -> None:
    for row, video in zip(transnet_out.to_pylist(), cut_videos):
        assert len(row["transition_probs"]) == video["num_frames"]
        assert all(0.0 <= p <= 1.0 for p in row["transition_probs"])
    assert transnet_out.schema.field("transition_probs").type == pa.list_(pa.float32())
    assert transnet_out.schema.field("span_start_frames").type == pa.list_(pa.int64())


def test_clips_never_straddle_a_cut(transnet_out, cut_videos) -> None:
    for row, video in zip(transnet_out.to_pylist(), cut_videos):
        spans = list(zip(row["span_start_frames"], row["span_end_frames"]))
        assert spans, "expected clips"
        fps = video["fps"]
        for s, e in spans:
            assert not any(s < c < e for c in video["cuts"]), (s, e, video["cuts"])
            # Crop keeps 0.5 s away from every cut; duration within [2, 10] s.
            assert all(c <= s - round(0.5 * fps) or c >= e + round(0.5 * fps) for c in video["cuts"])
            assert 2.0 <= (e - s) / fps <= 10.0
        # Spans name source frames: the barcodes at the span ends say so.
        s, e = spans[0]
        frames = decode_rgb(video["uri"], 320, 240, start_frame=s, end_frame=e)
        assert read_frame_index(frames[0]) == s and read_frame_index(frames[-1]) == e - 1


@pytest.mark.slow
def test_transnetv2_matches_reference_implementation(cut_videos) -> None:
    """Our windowing/batching vs the wheel's own predict_frames (fp32)."""
    from udfs.split.transnetv2 import TransNetV2Predictor, preserved_global_state

    frames = decode_small_cpu(cut_videos[1]["uri"])[:130]
    predictor = TransNetV2Predictor(device="cpu", batch_size=2, precision="fp32")
    with preserved_global_state():
        with torch.inference_mode():
            reference, _ = predictor.model.predict_frames(torch.from_numpy(frames), quiet=True)
    ours = dict(predictor.predict_many([("a", frames[:57]), ("b", frames), ("c", frames[:0])]))
    np.testing.assert_allclose(ours["b"], reference.numpy(), atol=1e-5)
    assert len(ours["a"]) == 57 and len(ours["c"]) == 0


def test_model_load_leaves_global_state_alone() -> None:
    from udfs.split.transnetv2 import load_transnetv2

    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(99)
    before = (torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = dict(os.environ)
    model = load_transnetv2(device="cpu")
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == flags
    assert dict(os.environ) == env
    # The next draw is the one the seed we set dictates.
    expected = torch.Generator().manual_seed(123)
    torch.manual_seed(123)
    load_transnetv2(device="cpu")
    assert torch.equal(torch.rand(3), torch.rand(3, generator=expected))


def test_weights_from_file_and_folder(tmp_path) -> None:
    from safetensors.torch import save_file

    from udfs.split.transnetv2 import load_transnetv2, resolve_weights, wheel_weights_path

    assert resolve_weights(None) == wheel_weights_path()
    state = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    state = {k: v.clone() for k, v in state.items()}
    state["cls_layer1.bias"] += 3.0  # a visibly different checkpoint
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    for ref in (tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt"):
        model = load_transnetv2(str(ref), device="cpu")
        assert torch.equal(model.state_dict()["cls_layer1.bias"], state["cls_layer1.bias"])
    with pytest.raises(FileNotFoundError):
        resolve_weights(str(tmp_path / "missing.pth"))


def test_errors_are_per_row(transnet_split, cut_videos, tmp_path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    videos = [
        {"uri": str(broken), "fps": 24.0, "num_frames": 10},
        {**cut_videos[1]},
        {"uri": "/nowhere.mp4", "fps": 24.0, "num_frames": 10, "error": "probe failed: gone"},
    ]
    rows = transnet_split(_video_table(videos)).to_pylist()
    assert rows[0]["error"].startswith("scene detection failed: ")
    assert rows[0]["span_start_frames"] == [] and rows[0]["transition_probs"] is None
    assert rows[1]["error"] is None and len(rows[1]["span_start_frames"]) > 0
    assert rows[2]["error"] == "probe failed: gone"
    assert rows[2]["span_start_frames"] == [] and rows[2]["span_end_frames"] == []
    assert rows[2]["scene_detector"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_and_inference(cut_videos) -> None:
    from udfs.split.scene_decode import decode_small_gpu
    from udfs.split.scenes import TransNetV2Split

    video = cut_videos[0]
    gpu = decode_small_gpu(video["uri"]).cpu().numpy()
    cpu = decode_small_cpu(video["uri"])
    assert gpu.shape == cpu.shape
    assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 8
    row = TransNetV2Split(**stage_args("split", "transnetv2", device="cuda"))(_video_table([video])).to_pylist()[0]
    assert match_cuts(video["cuts"], cut_frames(row["transition_probs"], 0.4), tolerance=2).f1 == 1.0


# ------------------------------------------------------------ content detector
def test_content_split_finds_hard_cuts(cut_videos) -> None:
    from udfs.split.scenes import ContentSplit

    out = ContentSplit(**stage_args("split", "content"))(_video_table(cut_videos))
    for row, video in zip(out.to_pylist(), cut_videos):
        assert row["scene_detector"] == "content"
        assert len(row["transition_probs"]) == video["num_frames"]
        detected = cut_frames(row["transition_probs"], 0.2)
        assert match_cuts(video["cuts"], detected, tolerance=0).f1 == 1.0, (video["cuts"], detected)
        for s, e in zip(row["span_start_frames"], row["span_end_frames"]):
            assert not any(s < c < e for c in video["cuts"])


def test_content_scores_ignore_motion_and_flag_dissolves(tmp_path) -> None:
    # One continuous moving shot: nothing crosses the threshold.
    path = write_video(tmp_path / "one_shot.mp4", width=160, height=90, fps=24, num_frames=96)
    scores = content_scores(decode_small_cpu(str(path), 64, 36), 24.0, gradual_s=1.0)
    assert scores.max() < 0.2
    # A 12-frame dissolve and a 24-frame fade through black are found near their centres.
    path, cuts = write_transition_video(tmp_path / "gradual.mp4", scenes=[72, 72, 72],
                                        transitions=[("dissolve", 12), ("fade", 24)], width=160, height=90, fps=24)
    detected = cut_frames(content_scores(decode_small_cpu(str(path), 64, 36), 24.0, gradual_s=2.0), 0.2)
    assert match_cuts(cuts, detected, tolerance=2).f1 == 1.0, (cuts, detected)
    # Hard cuts only: the gradual transitions are not reported.
    assert cut_frames(content_scores(decode_small_cpu(str(path), 64, 36), 24.0, gradual_s=None), 0.2) == []


def test_hub_id_weights_resolve_through_snapshot_download(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from udfs.split.transnetv2 import resolve_weights

    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "transnetv2.pth").write_bytes(b"x")
    calls = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_weights("someorg/transnetv2") == tmp_path / "snap" / "transnetv2.pth"
    assert calls[0][0] == "someorg/transnetv2" and "*.pth" in calls[0][1]


@pytest.mark.slow
def test_runs_as_ray_actor_pool_udf(ray_session, cut_videos) -> None:
    """The stage as the pipeline uses it: map_batches on an actor pool, on the
    tests' Ray session. Two videos: the detector's accuracy on all of them is
    the other tests' job; this one checks the plumbing."""
    import ray

    from udfs.split.scenes import TransNetV2Split

    videos = cut_videos[:2]
    ds = ray.data.from_arrow(_video_table(videos))
    out = ds.map_batches(TransNetV2Split, fn_constructor_kwargs=stage_args("split", "transnetv2", device="cpu", torch_threads=1),
                         batch_size=2, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                         num_cpus=1)
    rows = {r["uri"]: r for r in out.take_all()}
    for video in videos:
        row = rows[video["uri"]]
        assert row["error"] is None and len(row["transition_probs"]) == video["num_frames"]
        assert match_cuts(video["cuts"], cut_frames(row["transition_probs"], 0.4), tolerance=2).f1 == 1.0


# ------------------------------------------------- chunked decode and scoring
@pytest.fixture(scope="module")
def long_cut_video(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """~45 s at 24 fps, longer than many chunks of 100 frames: hard cuts right
    at chunk edges (pairs 99|100 and 299|300), a dissolve and a fade through
    black across edges, and scenes long enough for the gradual window."""
    scenes = [100, 200, 150, 250, 200, 180]
    transitions = [("cut", 0), ("cut", 0), ("dissolve", 24), ("fade", 24), ("cut", 0)]
    path, cuts = write_transition_video(tmp_path_factory.mktemp("long_cuts") / "long.mp4", scenes=scenes,
                                        transitions=transitions, width=160, height=90, fps=24)
    fps, n = _probe(str(path))
    return {"uri": str(path), "fps": fps, "num_frames": n, "cuts": cuts}


@pytest.mark.parametrize("gradual_s", [2.0, 1.0, None])
def test_content_scores_from_chunks_equal_the_whole_video(long_cut_video, gradual_s) -> None:
    from udfs.split.content_detector import ContentScorer
    from udfs.split.scene_decode import iter_small_cpu

    whole = content_scores(decode_small_cpu(long_cut_video["uri"], 64, 36), 24.0, gradual_s=gradual_s)
    assert len(whole) == long_cut_video["num_frames"]
    # Chunks smaller than the gradual window (k = 24), equal to it, and larger; a ragged last chunk.
    for chunk_frames in (1, 7, 24, 100, 333):
        scorer = ContentScorer(24.0, gradual_s=gradual_s)
        for chunk in iter_small_cpu(long_cut_video["uri"], 64, 36, chunk_frames=chunk_frames):
            assert len(chunk) <= chunk_frames
            scorer.feed(chunk)
        assert np.array_equal(scorer.finish(), whole), chunk_frames
    if gradual_s == 2.0:  # every transition found, the ones across chunk edges too
        assert match_cuts(long_cut_video["cuts"], cut_frames(whole, 0.2), tolerance=2).f1 == 1.0


def test_content_split_same_spans_whatever_the_chunk(long_cut_video) -> None:
    from udfs.split.scenes import ContentSplit

    rows = [ContentSplit(**stage_args("split", "content", chunk_frames=c))(_video_table([long_cut_video])).to_pylist()[0]
            for c in (100, 10_000)]
    assert rows[0]["transition_probs"] == rows[1]["transition_probs"]
    assert rows[0]["span_start_frames"] == rows[1]["span_start_frames"] and rows[0]["span_start_frames"]
    assert rows[0]["span_end_frames"] == rows[1]["span_end_frames"]


def test_content_scorer_memory_is_flat_in_length() -> None:
    """Peak allocations while scoring 10x more frames stay within the chunk's
    working set: only per-frame floats grow with length."""
    import tracemalloc

    from udfs.split.content_detector import ContentScorer

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(40, 1, 1, 3), dtype=np.uint8)

    def peak(chunks: int) -> int:
        scorer = ContentScorer(24.0, gradual_s=2.0)
        tracemalloc.start()
        for c in range(chunks):
            frames = np.broadcast_to(palette[c % len(palette)], (256, 36, 64, 3)).copy()
            scorer.feed(frames)
        scorer.finish()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(4), peak(40)
    assert long < 1.3 * short, (short, long)


def test_transnetv2_windows_from_chunks_equal_whole_frames(long_cut_video) -> None:
    """The model's windows cut from a stream of chunks are exactly the ones
    `window_frame_indices` cuts from the whole video (padding included)."""
    from udfs.split.scene_decode import iter_small_cpu
    from udfs.split.transnetv2 import _Windows, window_frame_indices

    frames = torch.from_numpy(decode_small_cpu(long_cut_video["uri"])[:437])
    expected = [frames[torch.from_numpy(idx)] for idx in window_frame_indices(len(frames))]
    for chunk_frames in (1, 49, 50, 75, 100, 437, 1000):
        windows, got = _Windows(), []
        for start in range(0, len(frames), chunk_frames):
            got += list(windows.feed(frames[start:start + chunk_frames]))
            # Only what the next window needs is held: at most one window plus a chunk.
            assert windows.buffer is None or len(windows.buffer) <= 100 + chunk_frames
        got += list(windows.finish())
        assert [w for w, _ in got] == list(range(len(expected)))
        assert all(torch.equal(a, b) for (_, a), b in zip(got, expected)), chunk_frames
    assert sum(len(c) for c in iter_small_cpu(long_cut_video["uri"], chunk_frames=64)) == long_cut_video["num_frames"]


@pytest.mark.slow
def test_transnetv2_streamed_videos_equal_whole_arrays(transnet_split, transnet_out, long_cut_video,
                                                       cut_videos) -> None:
    """predict_many over chunk streams (three videos in a row, chunks not
    aligned with windows, one a decode error part-way) gives the whole
    arrays' probabilities, and the stage's spans do not depend on chunk_frames."""
    predictor = transnet_split.predictor
    frames = decode_small_cpu(long_cut_video["uri"])[:160]
    other = decode_small_cpu(cut_videos[1]["uri"])
    whole = dict(predictor.predict_many([("a", frames), ("b", other)]))

    def chunks(x: np.ndarray, size: int, fail: bool = False):
        for start in range(0, len(x), size):
            yield x[start:start + size]
            if fail:
                yield OSError("decode broke")

    streamed = dict(predictor.predict_many([("a", chunks(frames, 37)), ("bad", chunks(other, 60, fail=True)),
                                            ("b", chunks(other, 1000))]))
    assert isinstance(streamed["bad"], OSError)
    for key in ("a", "b"):
        assert len(streamed[key]) == len(whole[key])
        np.testing.assert_allclose(streamed[key], whole[key], atol=1e-5)
        assert cut_frames(streamed[key], 0.4) == cut_frames(whole[key], 0.4)
    from udfs.split.scenes import TransNetV2Split

    small = TransNetV2Split(**stage_args("split", "transnetv2", device="cpu", batch_size=8, chunk_frames=64))
    small.predictor = predictor  # same model, no second load
    a, b = small(_video_table(cut_videos[1:])).to_pylist(), transnet_out.to_pylist()[1:]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["transition_probs"], y["transition_probs"], atol=1e-5)
        assert (x["span_start_frames"], x["span_end_frames"]) == (y["span_start_frames"], y["span_end_frames"])
