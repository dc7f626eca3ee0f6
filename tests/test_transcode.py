"""The transcode stage on real media: exact frames, keyframes, audio, previews."""

from __future__ import annotations

import io

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from engine.sample import read_frame_index, write_video
from reelsift_conf import stage_args
from udfs.media.probe import ProbeVideos
from udfs.split.fixed_stride import FixedStrideSplit
from udfs.media.transcode import ClipTranscoder
from udfs.media.video import decode_rgb, decode_rgb_bytes


def transcoder(**overrides) -> ClipTranscoder:
    """conf's transcode settings; no previews or motion unless a test asks."""
    return ClipTranscoder(**stage_args("transcode", **{"preview": None, "motion": None, **overrides}))


def plan(uris: list[str], **split) -> pa.Table:
    spans = FixedStrideSplit(**stage_args("split", "fixed_stride", **{"clip_len_s": 10.0, "min_clip_s": 2.0, **split}))
    return spans(ProbeVideos(**stage_args("probe"))(pa.table({"uri": uris})))


def transcode(table: pa.Table, **kwargs) -> list[dict]:
    stage = transcoder(**{"preset": "ultrafast", "crf": 18, **kwargs})
    out = list(stage(table))
    return pa.concat_tables(out).to_pylist() if out else []


def assert_exact_clip(clip: dict) -> None:
    """The clip decodes to exactly its span's source frames, keyframe first."""
    frames = decode_rgb_bytes(clip["mp4"])
    assert [read_frame_index(f) for f in frames] == list(range(clip["start_frame"], clip["end_frame"]))
    assert clip["num_frames"] == len(frames) == clip["end_frame"] - clip["start_frame"]
    with av.open(io.BytesIO(clip["mp4"])) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.format.name == "yuv420p"
        first = next(p for p in c.demux(stream) if p.size)
        assert first.is_keyframe
        assert (stream.codec_context.width, stream.codec_context.height) == (clip["width"], clip["height"])


def test_clips_hold_exact_frames_with_audio_and_previews(good_videos):
    clips = transcode(plan([str(good_videos["hd_30fps_23s.mp4"])]))
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 300), (300, 600), (600, 690)]
    for clip in clips:
        assert clip["error"] is None
        assert_exact_clip(clip)
        assert clip["end_s"] - clip["start_s"] == pytest.approx(clip["num_frames"] / 30)
        with av.open(io.BytesIO(clip["mp4"])) as c:
            audio = c.streams.audio[0]
            samples = sum(f.samples for f in c.decode(audio))
        # AAC adds priming/padding in whole 1024-sample frames at most.
        expected = round((clip["end_s"] - clip["start_s"]) * 48000)
        assert expected <= samples <= expected + 2048 and clip["has_audio"]
        preview = Image.open(io.BytesIO(clip["preview_webp"]))
        assert preview.format == "WEBP" and preview.is_animated
        assert preview.n_frames == int(np.ceil(clip["num_frames"] / 30))  # 1 fps
        assert preview.size == (320, 180)  # 240 px high by default, but never upscaled


def test_odd_sized_444_source_is_cropped_to_even_420(good_videos):
    clips = transcode(plan([str(good_videos["odd_25fps_12s.mp4"])]), keep_audio=False)
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 250), (250, 300)]
    for clip in clips:
        assert (clip["width"], clip["height"]) == (252, 140)
        assert_exact_clip(clip)
        assert not clip["has_audio"]


def test_overlapping_spans_from_one_decode(good_videos):
    table = plan([str(good_videos["short_15fps_3s.mp4"])], clip_len_s=2.0, stride_s=0.5, min_clip_s=1.0)
    clips = transcode(table, preview={"enabled": False})
    # Starts at round(k * 7.5); the rule stops once a clip reaches the end.
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 30), (8, 38), (15, 45)]
    for clip in clips:
        assert_exact_clip(clip)
        assert clip["preview_webp"] is None


def test_clip_ids_are_deterministic(good_videos):
    table = plan([str(good_videos["tiny_24fps_1s.mp4"])], min_clip_s=0.5)
    first = [c["clip_id"] for c in transcode(table)]
    second = [c["clip_id"] for c in transcode(table)]
    assert first == second and len(first) == 1


def test_truncated_stream_keeps_the_good_clips(tmp_path):
    # MPEG-TS has no index at the end: a cut-off file still demuxes up to the cut.
    src = write_video(tmp_path / "full.ts", width=128, height=96, fps=25, seconds=30)
    data = src.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: int(len(data) * 0.55)])
    table = plan([str(cut)])
    frames = table.column("num_frames")[0].as_py()
    assert 300 < frames < 750
    clips = transcode(table)
    assert len(clips) == len(table.column("span_start_frames")[0].as_py()) >= 1
    # The decoder conceals the final, partial frame with earlier pixels, so the
    # reference is what a plain decode of the cut file shows, frame by frame.
    reference = [read_frame_index(f) for f in decode_rgb(str(cut), 128, 96)]
    assert len(reference) == frames
    for clip in clips:
        assert clip["error"] is None
        shown = [read_frame_index(f) for f in decode_rgb_bytes(clip["mp4"])]
        assert shown == reference[clip["start_frame"]:clip["end_frame"]]


def test_span_past_the_end_is_an_error_row_not_a_crash(good_videos):
    table = plan([str(good_videos["tiny_24fps_1s.mp4"])], min_clip_s=0.5)
    starts = pa.array([[0, 100]], pa.list_(pa.int64()))
    ends = pa.array([[24, 124]], pa.list_(pa.int64()))
    table = table.set_column(table.schema.get_field_index("span_start_frames"), "span_start_frames", starts)
    table = table.set_column(table.schema.get_field_index("span_end_frames"), "span_end_frames", ends)
    clips = transcode(table)
    assert clips[0]["error"] is None and clips[0]["num_frames"] == 24
    assert clips[1]["mp4"] is None and "before this span started" in clips[1]["error"]


def test_encoder_selection():
    assert transcoder(encoder="auto").encoder in ("libx264", "h264_nvenc")
    with pytest.raises(ValueError, match="unsupported encoder"):
        transcoder(encoder="vp9")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="NVENC needs a CUDA GPU")
def test_nvenc_clips_are_exact(good_videos):
    clips = transcode(plan([str(good_videos["hd_30fps_23s.mp4"])]), encoder="h264_nvenc", preset="medium")
    for clip in clips:
        assert_exact_clip(clip)


# ------------------------------------------------- one encoder per video, threads
def test_plan_chains_puts_only_overlapping_spans_on_another_encoder():
    from udfs.media.transcode import plan_chains

    assert plan_chains([(0, 300), (300, 600), (600, 690)]) == [[0, 1, 2]]
    assert plan_chains([(0, 100), (150, 250), (400, 500)]) == [[0, 1, 2]]  # gaps: still one encoder
    assert plan_chains([(0, 30), (8, 38), (15, 45), (30, 60)]) == [[0, 2], [1, 3]] or \
        plan_chains([(0, 30), (8, 38), (15, 45), (30, 60)]) == [[0, 3], [1], [2]]


def _x264_settings(mp4: bytes) -> str | None:
    """x264 writes its settings into an SEI of the first frame it encodes."""
    at = mp4.find(b"x264 - core")
    return None if at < 0 else mp4[at:at + 2000].split(b"\x00")[0].decode("latin-1")


def test_one_encoder_per_video_with_frame_threads(good_videos):
    clips = transcode(plan([str(good_videos["hd_30fps_23s.mp4"])]), preview={"enabled": False})
    settings = [_x264_settings(c["mp4"]) for c in clips]
    # Only the first clip carries the encoder's start-up SEI: the others came
    # from the same encoder, each from an IDR frame (assert_exact_clip).
    assert settings[0] is not None and settings[1:] == [None, None]
    assert "sliced_threads=0" in settings[0]
    for clip in clips:
        assert_exact_clip(clip)
    # PyAV's own default (slice) would switch x264 to sliced threads.
    sliced = transcode(plan([str(good_videos["hd_30fps_23s.mp4"])]), thread_type="slice", threads=2,
                       preview={"enabled": False}, keep_audio=False)
    assert "sliced_threads=1" in _x264_settings(sliced[0]["mp4"])
    with pytest.raises(ValueError, match="thread_type"):
        transcoder(thread_type="frames")


def test_gapped_spans_from_one_encoder_are_exact(good_videos):
    table = plan([str(good_videos["hd_30fps_23s.mp4"])])
    starts = pa.array([[0, 120, 400]], pa.list_(pa.int64()))
    ends = pa.array([[90, 300, 650]], pa.list_(pa.int64()))
    table = table.set_column(table.schema.get_field_index("span_start_frames"), "span_start_frames", starts)
    table = table.set_column(table.schema.get_field_index("span_end_frames"), "span_end_frames", ends)
    clips = transcode(table, preview={"enabled": False})
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 90), (120, 300), (400, 650)]
    for clip in clips:
        assert_exact_clip(clip)
        assert clip["has_audio"]


# ------------------------------------------------- motion from the clip's own packets
MOTION = {"mode": "enable", "global_mean_threshold": 0.00098, "per_patch_min_threshold": 1e-6, "fps": 2,
          "patch_size": 256}


@pytest.mark.parametrize("name,split", [
    ("hd_30fps_23s.mp4", {}),
    ("odd_25fps_12s.mp4", {}),
    ("ntsc_29.97fps_5s.mkv", {"clip_len_s": 2.0, "min_clip_s": 1.0}),
    ("short_15fps_3s.mp4", {"clip_len_s": 2.0, "stride_s": 0.5, "min_clip_s": 1.0}),
])
@pytest.mark.parametrize("preset", ["ultrafast", "medium"])
def test_motion_from_packets_equals_decoding_the_clip(good_videos, name, split, preset):
    """The transcode stage's vectors-only decode of each clip's packets gives
    exactly the scores ClipAnalysis gets by fully decoding the clip's mp4."""
    from udfs.analysis.clip_analysis import ClipAnalysis

    table = plan([str(good_videos[name])], **split)
    out = pa.concat_tables(list(transcoder(preset=preset, crf=23, motion=MOTION,
                                           preview={"enabled": False})(table)))
    scored = out.column("motion_global_mean").to_pylist()
    assert out.num_rows >= 1 and all(s is not None for s in scored)
    bare = out.drop_columns(["motion_global_mean", "motion_per_patch_min", "passed", "filter_reason"])
    reference = ClipAnalysis(consumers=None, motion=MOTION, decode_threads=1)(bare)
    for column in ("motion_global_mean", "motion_per_patch_min", "passed", "filter_reason"):
        assert out.column(column).to_pylist() == reference.column(column).to_pylist(), column


def test_still_video_is_low_motion_from_transcode(tmp_path):
    still = write_video(tmp_path / "still.mp4", width=160, height=96, fps=24, seconds=3, moving=False)
    clips = transcode(plan([str(still)], min_clip_s=1.0), motion=MOTION, preview={"enabled": False})
    assert clips[0]["passed"] is False and clips[0]["filter_reason"].startswith("low motion:")
    moving = transcode(plan([str(write_video(tmp_path / "moving.mp4", width=160, height=96, fps=24, seconds=3))],
                            min_clip_s=1.0), motion=MOTION, preview={"enabled": False})
    assert moving[0]["passed"] is True and moving[0]["motion_global_mean"] > 0.00098


def test_vectors_only_decode_exports_the_full_decodes_vectors(good_videos):
    """Skipping deblocking and unsampled non-reference frames changes no
    exported motion vector: array-equal to a plain full decode."""
    from fractions import Fraction

    from udfs.analysis.motion_decode import decode_motion_vectors

    clip = transcode(plan([str(good_videos["hd_30fps_23s.mp4"])]), preset="medium", preview={"enabled": False})[0]
    wanted = set(range(0, clip["num_frames"], 15))
    full: dict[int, np.ndarray] = {}
    packets = []
    with av.open(io.BytesIO(clip["mp4"])) as c:
        stream = c.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        stream.thread_type = "SLICE"
        to_index = stream.time_base * Fraction(30)
        extradata = stream.codec_context.extradata
        for packet in c.demux(stream):
            if packet.size:
                packets.append((bytes(packet), int(packet.pts * to_index), int(packet.dts * to_index)))
            for i, frame in enumerate(packet.decode()):
                index = round(frame.pts * to_index)
                side = frame.side_data.get("MOTION_VECTORS")
                if index in wanted and side is not None:
                    full[index] = side.to_ndarray().copy()
    # The mp4 holds length-prefixed NAL units; its avcC extradata says so.
    found = decode_motion_vectors(packets, codec="h264", extradata=extradata, wanted=wanted)
    cheap = {i: v for i, v in found.items() if v is not None}
    assert set(found) == wanted and len(cheap) == len(full) >= len(wanted) - 1  # frame 0 is an I-frame
    assert sorted(cheap) == sorted(full)
    for index, ref in full.items():
        assert np.array_equal(ref, cheap[index]), index


def test_videos_of_a_batch_transcoded_concurrently_give_the_same_clips(good_videos):
    table = plan([str(good_videos[n]) for n in ("hd_30fps_23s.mp4", "odd_25fps_12s.mp4", "short_15fps_3s.mp4")])
    one = transcode(table, video_workers=1, motion=MOTION)
    two = transcode(table, video_workers=2, motion=MOTION)
    key = lambda c: c["clip_id"]  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two)) and len(one) == 6
    for a, b in zip(sorted(one, key=key), sorted(two, key=key)):
        assert (a["start_frame"], a["end_frame"], a["num_frames"], a["motion_global_mean"]) == \
            (b["start_frame"], b["end_frame"], b["num_frames"], b["motion_global_mean"])
        assert_exact_clip(b)
