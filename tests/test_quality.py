"""Quality signals (udfs/quality) on videos with known defects, made by
FFmpeg filters (scripts/quality_videos.py), and `task=filter`."""

from __future__ import annotations

from pathlib import Path

import lance
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from reelsift_conf import node, stage_args
from scripts import quality_videos as qv
from udfs.analysis.rules import reason_names
from udfs.media.probe import ProbeVideos
from udfs.media.transcode import ClipTranscoder
from udfs.quality.settings import prepare
from udfs.split.fixed_stride import FixedStrideSplit


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def clips_of(paths: list[Path], *, clip_len_s: float = 10.0, **transcode) -> list[dict]:
    """The transcode stage's clip rows (conf's defaults: quality and motion on), one clip per video
    unless `clip_len_s` cuts more."""
    table = ProbeVideos(**stage_args("probe"))(pa.table({"uri": [str(p) for p in paths]}))
    table = FixedStrideSplit(**stage_args("split", "fixed_stride", clip_len_s=clip_len_s, min_clip_s=0.5))(table)
    stage = ClipTranscoder(**stage_args("transcode", **transcode))
    rows = pa.concat_tables(list(stage(table))).drop_columns(["mp4", "preview_webp"]).to_pylist()
    return sorted(rows, key=lambda r: (r["source_uri"], r["start_frame"]))


@pytest.fixture(scope="module")
def defects(tmp_path_factory) -> dict[str, dict]:
    """name -> the one clip of each video of the defect set."""
    videos = qv.make_set(tmp_path_factory.mktemp("defects"))
    rows = clips_of(list(videos.values()))
    by_uri = {r["source_uri"]: r for r in rows}
    return {name: by_uri[str(path)] for name, path in videos.items()}


def test_burned_in_subtitles_are_detected_and_clean_content_is_not(defects):
    assert defects["subtitle"]["text_area_ratio"] > 0.01
    for name in ("clean", "letterbox", "blurred", "dark"):
        assert defects[name]["text_area_ratio"] < 0.002, name


def test_bars_are_found_within_two_pixels(defects):
    def bars(name):
        r = defects[name]
        return r["border_top"], r["border_bottom"], r["border_left"], r["border_right"]

    for got, want in ((bars("letterbox"), (44, 44, 0, 0)), (bars("pillarbox"), (0, 0, 80, 80)),
                      (bars("clean"), (0, 0, 0, 0))):
        assert all(abs(g - w) <= 2 for g, w in zip(got, want)), (got, want)


def test_the_blurred_copy_is_less_sharp_than_its_source(defects):
    assert defects["blurred"]["sharpness"] < 0.5 * defects["clean"]["sharpness"]
    # The bars are left out: a letterboxed copy is as sharp as its source.
    assert defects["letterbox"]["sharpness"] > 0.5 * defects["clean"]["sharpness"]


def test_exposure_black_and_frozen_frames(defects):
    clean, dark, fade = defects["clean"], defects["dark"], defects["fade"]
    assert dark["brightness"] < clean["brightness"] - 0.2 and dark["contrast"] < clean["contrast"]
    assert clean["black_frame_ratio"] == 0.0 and 0.3 <= fade["black_frame_ratio"] <= 0.5
    # A moving shot never freezes; the black tail of the fade repeats itself.
    assert clean["frozen_frame_ratio"] == 0.0 and fade["frozen_frame_ratio"] > 0.2


@pytest.fixture(scope="module")
def camera_clips(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("camera")
    paths = {m: qv.render_motion(folder / f"{m}.mp4", m, seed=5) for m in qv.MOTIONS}
    by_uri = {r["source_uri"]: r for r in clips_of(list(paths.values()))}
    return {m: by_uri[str(p)] for m, p in paths.items()}


@pytest.mark.parametrize("motion", qv.MOTIONS)
def test_each_camera_motion_is_classified(camera_clips, motion):
    clip = camera_clips[motion]
    assert clip["camera_motion"] == motion, clip
    assert clip["camera_motion_score"] > 0.5


def test_a_clip_across_a_cut_is_flagged_and_continuous_ones_are_not(tmp_path):
    # 4 s, the cut at 2.0 s; 1.5 s clips: [0, 1.5) and [3, 4) are one shot, [1.5, 3) holds the cut.
    path = qv.render_cut(tmp_path / "cut.mp4", seconds=4.0, cut_at_s=2.0)
    rows = clips_of([path], clip_len_s=1.5)
    assert [r["cut_inside"] for r in rows] == [False, True, False]
    assert rows[1]["max_scene_change"] > 2 * max(rows[0]["max_scene_change"], rows[2]["max_scene_change"])


def test_odd_sources_and_a_one_frame_clip_never_crash(tmp_path):
    videos = qv.odd_videos(tmp_path)
    rows = clips_of(list(videos.values()))
    assert len(rows) == 4 and all(r["error"] is None for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert 0.0 <= r["brightness"] <= 1.0
        # A 2x2 picture is smaller than one macroblock: no motion vectors, so no camera verdict.
        assert (r["camera_motion"] is None) == (r["width"] == 2), r
    # A clip of one frame: nothing to compare it with, and no crash.
    table = ProbeVideos(**stage_args("probe"))(pa.table({"uri": [str(videos["tenbit"])]}))
    table = table.append_column("span_start_frames", pa.array([[0]], pa.list_(pa.int64())))
    table = table.append_column("span_end_frames", pa.array([[1]], pa.list_(pa.int64())))
    (one,) = pa.concat_tables(list(ClipTranscoder(**stage_args("transcode"))(table))).to_pylist()
    assert one["error"] is None and one["num_frames"] == 1
    assert one["frozen_frame_ratio"] is None and one["max_scene_change"] is None and one["cut_inside"] is None


def test_a_missing_text_model_fails_before_any_video_is_decoded(tmp_path):
    quality = node("quality")
    quality["text"]["model"] = str(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        prepare(quality)
    # Through the engine: the plan is made, and fails, before the first video is read.
    from engine.curate.plan import plan_stages

    cfg = config(f"input={tmp_path}", f"output={tmp_path / 'out'}", f"quality.text.model={tmp_path / 'nope.onnx'}")
    with pytest.raises(FileNotFoundError, match="quality.text.model not found"):
        plan_stages(cfg)
    # Off, the model is never looked for.
    quality["text"]["enabled"] = False
    assert prepare(quality)["text"]["model"].endswith("nope.onnx")


# The motion threshold sits between the still-ish clips (blurred ~0.0002, pillarbox ~0.00036) and the
# moving ones (>= 0.00055): multi-threaded x264 output varies run to run, and so, by a few per cent, do the
# scores read from a clip's own motion vectors.
THRESHOLDS = ("quality.text.max_area=0.01", "quality.borders.max_fraction=0.1", "motion.mode=enable",
              "motion.global_mean_threshold=0.00045", "quality.camera.reject=[zoom_in]")


@pytest.mark.slow
def test_task_filter_rewrites_only_the_verdicts_as_a_fresh_run_would(ray_session, tmp_path):
    from engine.curate.task import run as curate
    from engine.filter import run as refilter

    videos = qv.make_set(tmp_path / "in", width=320, height=180, seconds=2.0)
    qv.render_motion(tmp_path / "in" / "zoom.mp4", "zoom_in", seconds=2.0)
    common = (f"input={tmp_path / 'in'}", "transcode.preset=veryfast")
    curate(config(*common, f"output={tmp_path / 'a'}"))
    before = lance.dataset(str(tmp_path / "a" / "clips.lance"))
    assert before.count_rows(filter="passed = false") == 0
    summary = refilter(config("task=filter", f"output={tmp_path / 'a'}", *THRESHOLDS))
    after = lance.dataset(str(tmp_path / "a" / "clips.lance"))
    assert after.version == before.version + 1 and summary["clips_changed"] > 0
    # Nothing but the verdicts changed.
    others = [c for c in before.schema.names if c not in ("passed", "filter_reason", "mp4", "preview_webp")]
    assert after.to_table(columns=others).sort_by("clip_id") == before.to_table(columns=others).sort_by("clip_id")
    # The same verdicts as a fresh run at those thresholds.
    curate(config(*common, f"output={tmp_path / 'b'}", *THRESHOLDS))
    fresh = lance.dataset(str(tmp_path / "b" / "clips.lance"))
    cols = ["clip_id", "passed", "filter_reason"]
    got, want = after.to_table(columns=cols).sort_by("clip_id"), fresh.to_table(columns=cols).sort_by("clip_id")

    def verdicts(table):  # the scores quoted in a reason may differ in the last digits (see THRESHOLDS)
        return [(r["clip_id"], r["passed"], reason_names(r["filter_reason"])) for r in table.to_pylist()]

    assert verdicts(got) == verdicts(want)
    reasons = dict(zip(got.column("clip_id").to_pylist(), got.column("filter_reason").to_pylist()))
    named = {name for why in reasons.values() for name in reason_names(why)}
    assert {"text", "borders", "camera", "low motion"} <= named, reasons
    assert summary["filter_reasons"]["borders"] == 2  # letterbox and pillarbox
    # A resumed curate with the new thresholds accepts the table; run again, filter changes nothing.
    assert curate(config(*common, f"output={tmp_path / 'a'}", *THRESHOLDS))["run"]["resumed"]
    settled = lance.dataset(str(tmp_path / "a" / "clips.lance")).version
    again = refilter(config("task=filter", f"output={tmp_path / 'a'}", *THRESHOLDS))
    assert again["clips_changed"] == 0 and lance.dataset(str(tmp_path / "a" / "clips.lance")).version == settled


def test_task_filter_refuses_a_threshold_on_a_signal_the_table_lacks():
    from engine.filter.task import check_columns, filter_settings

    names = ["clip_id", "error", "passed", "filter_reason", "motion_global_mean", "motion_per_patch_min"]
    # Nothing set beyond the defaults: the motion filter is gated off, nothing else has a threshold.
    check_columns(names, filter_settings(config()), "out")
    with pytest.raises(ValueError, match="quality.text.max_area is set.*no text_area_ratio column"):
        check_columns(names, filter_settings(config("quality.text.max_area=0.01")), "out")
    with pytest.raises(ValueError, match="quality.camera.reject"):
        check_columns(names, filter_settings(config("quality.camera.reject=[complex]")), "out")
    # A gated filter whose gate is shut needs no columns.
    check_columns(["clip_id"], filter_settings(config("motion.mode=score-only")), "out")
