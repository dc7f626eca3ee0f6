"""Clip analysis: frame extraction policies, motion filter, aesthetic filter,
the keep/drop decision, and the one-decode-per-clip guarantee."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from reelsift_conf import stage_args
from udfs.schema import CLIP_FILTER_FIELDS, frame_columns
from engine.sample import read_frame_index, write_video
from udfs.analysis.clip_analysis import ClipAnalysis
from udfs.media.frames import drop_frame_columns, parse_consumers, plan_decode
from udfs.media.video import unpack_frames

torch.set_num_threads(1)

CONSUMERS = {
    "aesthetic": {"policy": "sequence", "fps": 1, "size": 224, "crop": True},
    "embed": {"policy": "uniform", "count": 8, "size": 224, "crop": True},
    "caption": {"policy": "sequence", "fps": 2},
    "thumb": {"policy": "middle", "size": [60, 80]},
}
MOTION = {"mode": "enable", "global_mean_threshold": 0.00098, "per_patch_min_threshold": 1e-6, "fps": 2}


def analysis(*, consumers: dict | None = None, motion: dict | None = None, **overrides) -> ClipAnalysis:
    """ClipAnalysis as conf/ builds it, with only `consumers` (none when not given) and `motion`."""
    return ClipAnalysis(**stage_args("frames", consumers=consumers or {}, motion=motion, **overrides))


def _clip_bytes(tmp: Path, name: str, **kwargs) -> bytes:
    return write_video(tmp / f"{name}.mp4", **kwargs).read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("clips")
    return {
        "moving": _clip_bytes(tmp, "moving", width=320, height=240, fps=24, num_frames=72, moving=True),
        "static": _clip_bytes(tmp, "static", width=320, height=240, fps=24, num_frames=72, moving=False),
        # Not a multiple of 16 and over 256 px: partial macroblocks and partial patches.
        "odd": _clip_bytes(tmp, "odd", width=328, height=264, fps=25, num_frames=60, moving=True),
        "single": _clip_bytes(tmp, "single", width=160, height=120, fps=24, num_frames=1),
    }


def _table(rows: list[tuple[str, bytes | None, str | None]]) -> pa.Table:
    return pa.table(
        {
            "clip_id": [r[0] for r in rows],
            "mp4": pa.array([r[1] for r in rows], pa.large_binary()),
            "error": pa.array([r[2] for r in rows], pa.string()),
        }
    )


# ------------------------------------------------------------ frame policies
def test_plan_indices_per_policy():
    specs = parse_consumers(CONSUMERS)
    plan = plan_decode(specs, 72, Fraction(24), motion_rate=Fraction(2))
    assert plan.grid_rate == 2
    assert plan.consumer_indices["aesthetic"] == [0, 24, 48]
    assert plan.consumer_indices["caption"] == [0, 12, 24, 36, 48, 60]
    assert plan.consumer_indices["embed"] == [math.floor((i + 0.5) * 72 / 8) for i in range(8)]
    assert plan.consumer_indices["thumb"] == [36]
    assert plan.motion_indices == [0, 12, 24, 36, 48, 60]

    # 25 fps: 1 fps frames are a subset of the 2 fps (LCM grid) frames.
    plan = plan_decode(parse_consumers({"a": {"policy": "sequence", "fps": 1}, "b": {"policy": "sequence", "fps": 2}}),
                       60, Fraction(25))
    assert plan.consumer_indices["a"] == [0, 25, 50]
    assert plan.consumer_indices["b"] == [0, 12, 25, 37, 50]
    assert set(plan.consumer_indices["a"]) <= set(plan.consumer_indices["b"])
    # LCM of 2 and 3 fps is a 6 fps grid.
    plan = plan_decode(parse_consumers({"a": {"policy": "sequence", "fps": 3}}), 60, Fraction(30), Fraction(2))
    assert plan.grid_rate == 6
    # max_frames caps a sequence; uniform repeats frames of a short clip.
    plan = plan_decode(parse_consumers({"a": {"policy": "sequence", "fps": 2, "max_frames": 2},
                                        "u": {"policy": "uniform", "count": 8}}), 4, Fraction(24))
    assert plan.consumer_indices["a"] == [0]  # 4 frames at 24 fps hold one 2 fps sample
    assert plan.consumer_indices["u"] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="needs fps"):
        parse_consumers({"x": {"policy": "sequence"}})


def test_training_samples_and_clip_stages_take_the_same_frames(clips):
    # One frame vocabulary: a training window and a clip-stage consumer asking for the
    # same frames at the same geometry get identical pixels from udfs.media.frames.
    import io

    from udfs.media.frames import FrameSpec, decode_frames

    window = FrameSpec.window(3, fps=1, size=(112, 112))
    consumer = {"policy": "sequence", "fps": 1, "size": 112, "crop": True, "interpolation": window.interpolation}
    out = analysis(consumers={"aesthetic": consumer})(_table([("m", clips["moving"], None)]))
    staged = unpack_frames(out.column("aesthetic_frames")[0].as_py(), out.column("aesthetic_frame_hw")[0].as_py())
    sampled = decode_frames(io.BytesIO(clips["moving"]), window, np.array([0, 24, 48]))
    assert sampled.shape == (3, 3, 112, 112)
    np.testing.assert_array_equal(sampled.transpose(0, 2, 3, 1), staged)
    with pytest.raises(ValueError, match="policy must be one of"):
        parse_consumers({"x": {"policy": "window", "count": 4}})  # a clip stage draws no random windows


def test_extracted_frames_are_the_planned_frames(clips):
    out = analysis(consumers=CONSUMERS, motion=None)(_table([("m", clips["moving"], None)]))
    assert "motion_global_mean" not in out.column_names and "passed" not in out.column_names
    row = out.to_pylist()[0]
    expect = {"aesthetic": [0, 24, 48], "caption": [0, 12, 24, 36, 48, 60], "thumb": [36],
              "embed": [4, 13, 22, 31, 40, 49, 58, 67]}
    shapes = {"aesthetic": (224, 224), "embed": (224, 224), "caption": (240, 320), "thumb": (60, 80)}
    for name, indices in expect.items():
        assert row[f"{name}_frame_indices"] == indices
        assert tuple(row[f"{name}_frame_hw"]) == shapes[name]
        frames = unpack_frames(row[f"{name}_frames"], row[f"{name}_frame_hw"])
        assert frames.shape == (len(indices), *shapes[name], 3)
    # Native-size frames carry their source index in the barcode: they are
    # the frames named, not just the right count.
    caption = unpack_frames(row["caption_frames"], row["caption_frame_hw"])
    assert [read_frame_index(f) for f in caption] == expect["caption"]
    # A resized/cropped frame is the same picture: compare with the native one.
    native = caption[2].astype(np.float32)  # frame 24
    small = unpack_frames(row["aesthetic_frames"], row["aesthetic_frame_hw"])[1].astype(np.float32)
    ref = av.VideoFrame.from_ndarray(caption[2], format="rgb24").to_ndarray(
        format="rgb24", width=299, height=224, interpolation="BICUBIC")[:, 37:261].astype(np.float32)
    assert np.abs(small - ref).mean() < 6.0
    assert np.abs(small - native[8:232, 48:272]).mean() > 1.0  # really rescaled, not a plain crop


def test_drop_frame_columns_helper(clips):
    out = analysis(consumers=CONSUMERS)(_table([("m", clips["moving"], None)]))
    dropped = drop_frame_columns(out, "embed")
    assert not set(frame_columns("embed")) & set(dropped.column_names)
    assert set(frame_columns("aesthetic")) <= set(dropped.column_names)
    assert drop_frame_columns(dropped, "embed").column_names == dropped.column_names


def test_each_clip_decoded_once(clips, monkeypatch):
    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    table = _table([("m", clips["moving"], None), ("s", clips["static"], None), ("o", clips["odd"], None)])
    out = analysis(consumers=CONSUMERS, motion=MOTION)(table)
    assert len(opened) == 3  # motion + four consumers from one decode per clip
    assert out.column("motion_global_mean").null_count == 0
    assert all(out.column("embed_frames").to_pylist())


# -------------------------------------------------------------------- motion
def _reference_flow(frame_mvs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Per-block loop, NeMo's block-size order, later vectors overwrite,
    blocks clipped to the frame."""
    flow = np.zeros((h, w, 2), np.float64)
    for bw, bh in ((8, 8), (16, 16), (16, 8), (8, 16)):
        for mv in frame_mvs:
            if (mv["w"], mv["h"]) != (bw, bh):
                continue
            x0, y0 = int(mv["dst_x"]) - bw // 2, int(mv["dst_y"]) - bh // 2
            ys = slice(max(0, y0), min(h, y0 + bh))
            xs = slice(max(0, x0), min(w, x0 + bw))
            flow[ys, xs] = (-mv["motion_x"] / mv["motion_scale"], -mv["motion_y"] / mv["motion_scale"])
    return flow


def _reference_motion(mp4: bytes, fps: float = 2.0, patch: int = 256) -> tuple[float, float]:
    """Independent implementation: per-block loops over the decoder's vectors."""
    import io

    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.codec_context.flags2 |= av.codec.context.Flags2.export_mvs
        rate = Fraction(stream.average_rate)
        n = stream.frames
        wanted = sorted({math.floor(k * rate / Fraction(fps)) for k in range(n * 10) if k * rate / Fraction(fps) < n})
        mvs = []
        for i, frame in enumerate(container.decode(stream)):
            h, w = frame.height, frame.width
            if i in wanted:
                sd = frame.side_data.get("MOTION_VECTORS")
                if sd is not None:
                    mvs.append(sd.to_ndarray().copy())
    mags = []
    for frame_mvs in mvs:
        flow = _reference_flow(frame_mvs, h, w)
        mags.append(np.hypot(flow[..., 0], flow[..., 1]) / (h + w))
    mags = np.stack(mags)
    per_pixel = mags.mean(axis=0)
    patches = [per_pixel[y:y + patch, x:x + patch].mean() for y in range(0, h, patch) for x in range(0, w, patch)]
    return float(mags.mean()), float(min(patches))


MV_DTYPE = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"),
                     ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"),
                     ("motion_y", "<i4"), ("motion_scale", "<u2")], align=True)


def _mvs(blocks: list[tuple[int, int, int, int, int, int, int]]) -> np.ndarray:
    """(source, w, h, x0, y0, motion_x, motion_y) -> PyAV's structured array."""
    out = np.zeros(len(blocks), MV_DTYPE)
    for i, (src, bw, bh, x0, y0, mx, my) in enumerate(blocks):
        out[i] = (src, bw, bh, x0, y0, x0 + bw // 2, y0 + bh // 2, 0, mx, my, 4)
    return out


def test_flow_field_edge_cases_match_reference():
    from udfs.analysis.motion import cell_flow, flow_field, motion_scores

    h, w = 36, 40  # W = 8 mod 16 and H not a multiple of 8: partial blocks and cells
    mvs = _mvs([
        (-1, 16, 16, 0, 0, 8, -4), (1, 16, 16, 0, 0, -20, 12),  # bi-predicted: the later one wins
        (-1, 8, 8, 16, 0, 3, 5), (-1, 8, 16, 24, 0, -7, 0),
        (-1, 16, 16, 32, 16, 40, 40),  # half outside on the right
        (-1, 8, 8, 40, 16, 99, 99),  # wholly outside: must not touch the frame
        (-1, 16, 8, 0, 32, 1, 1),  # crosses the bottom edge
        (-1, 4, 4, 16, 16, 50, 50),  # a block size NeMo ignores
    ])
    ref = _reference_flow(mvs, h, w)
    np.testing.assert_allclose(flow_field(mvs, h, w), ref, rtol=1e-6)
    cells = cell_flow(mvs, h, w)
    np.testing.assert_allclose(np.repeat(np.repeat(cells, 8, 0), 8, 1)[:h, :w], ref, rtol=1e-6)
    assert ref[0, 0].tolist() == [5.0, -3.0] and ref[20, 39].tolist() == [-10.0, -10.0]
    # Off the 8-px grid: the per-cell shortcut refuses, the pixel path still matches.
    odd = _mvs([(-1, 8, 8, 4, 4, 8, 8), (-1, 16, 16, 16, 8, -4, 4)])
    assert cell_flow(odd, h, w) is None
    np.testing.assert_allclose(flow_field(odd, h, w), _reference_flow(odd, h, w), rtol=1e-6)
    # Scores with 16-px patches (a partial patch is its own patch), through the
    # per-cell path (aligned frames, partial cells at the bottom) and the
    # per-pixel path (an unaligned frame among them).
    for frames in ([mvs, _mvs([(-1, 16, 16, 16, 16, 0, 2)])], [mvs, odd]):
        scores = motion_scores(frames, h, w, patch=16)
        mags = np.stack([np.hypot(*np.moveaxis(_reference_flow(m, h, w), -1, 0)) / (h + w) for m in frames])
        per_pixel = mags.mean(0)
        patches = [per_pixel[y:y + 16, x:x + 16].mean() for y in range(0, h, 16) for x in range(0, w, 16)]
        assert scores.global_mean == pytest.approx(mags.mean(), rel=1e-6)
        assert scores.per_patch_min == pytest.approx(min(patches), rel=1e-6)
        assert scores.num_frames == 2
    assert motion_scores([], h, w) is None


@pytest.mark.parametrize("name", ["moving", "static", "odd"])
def test_motion_scores_match_reference(clips, name):
    stage = analysis(motion=MOTION, decode_threads=0)  # threaded decode must not change scores
    runs = [stage(_table([(name, clips[name], None)])).to_pylist()[0] for _ in range(4)]
    assert len({(r["motion_global_mean"], r["motion_per_patch_min"]) for r in runs}) == 1
    out = runs[0]
    gm, ppm = _reference_motion(clips[name])
    assert out["motion_global_mean"] == pytest.approx(gm, rel=1e-5, abs=1e-9)
    assert out["motion_per_patch_min"] == pytest.approx(ppm, rel=1e-5, abs=1e-9)


def test_static_clip_is_low_motion_moving_passes(clips):
    table = _table([("m", clips["moving"], None), ("s", clips["static"], None)])
    out = analysis(motion=MOTION)(table).to_pylist()
    moving, static = out
    assert moving["passed"] is True and moving["filter_reason"] is None
    assert moving["motion_global_mean"] > 0.00098
    assert static["passed"] is False
    assert static["filter_reason"].startswith("low motion:")
    assert static["motion_per_patch_min"] < 1e-6
    # score-only: same scores, nobody filtered.
    scored = analysis(motion={**MOTION, "mode": "score-only"})(table).to_pylist()
    assert [r["passed"] for r in scored] == [True, True]
    assert scored[1]["motion_global_mean"] == static["motion_global_mean"]


def test_clip_without_motion_data_gets_reason(clips):
    out = analysis(motion=MOTION)(_table([("one", clips["single"], None)])).to_pylist()[0]
    assert out["passed"] is False
    assert out["motion_global_mean"] is None
    assert "no motion data" in out["filter_reason"] and "intra-only or single-frame" in out["filter_reason"]


# ----------------------------------------------------------------- aesthetic
@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from udfs.analysis.aesthetic import AestheticHead

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("aesthetic")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=24)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(root / "clip")
    CLIPImageProcessor().save_pretrained(root / "clip")
    head = AestheticHead(24)
    for p in head.parameters():  # spread outputs so min/mean/threshold differ
        torch.nn.init.normal_(p, std=0.5)
    torch.save(head.state_dict(), root / "head.pth")
    return root / "clip", root / "head.pth", model, head


def _direct_scores(model, head, frames: np.ndarray) -> np.ndarray:
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor()(images=list(frames), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model(pixel_values=pixels).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return head.eval()(emb).numpy()


@pytest.mark.parametrize("reduction", ["min", "mean"])
def test_aesthetic_scores_equal_direct_model_call(clips, tiny_aesthetic, reduction):
    from udfs.analysis.aesthetic import AestheticScorer

    clip_dir, head_path, model, head = tiny_aesthetic
    analysed = analysis(consumers={"aesthetic": CONSUMERS["aesthetic"]})(
        _table([("m", clips["moving"], None), ("o", clips["odd"], None)]))
    scorer = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), reduction=reduction,
                                          model_batch_size=4))
    out = scorer(analysed)
    assert not set(frame_columns("aesthetic")) & set(out.column_names)
    assert out.column("passed").to_pylist() == [True, True]  # threshold off by default
    for i, row in enumerate(analysed.to_pylist()):
        frames = unpack_frames(row["aesthetic_frames"], row["aesthetic_frame_hw"])
        per_frame = _direct_scores(model, head, frames)
        assert len(per_frame) == len(row["aesthetic_frame_indices"]) > 1
        expected = per_frame.min() if reduction == "min" else per_frame.mean()
        assert out.column("aesthetic_score")[i].as_py() == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_aesthetic_uncropped_frames_go_through_processor(clips, tiny_aesthetic):
    from udfs.analysis.aesthetic import AestheticScorer

    clip_dir, head_path, model, head = tiny_aesthetic
    analysed = analysis(consumers={"aesthetic": {"policy": "middle"}})(_table([("m", clips["moving"], None)]))
    out = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path)))(analysed)
    row = analysed.to_pylist()[0]
    frames = unpack_frames(row["aesthetic_frames"], row["aesthetic_frame_hw"])
    assert frames.shape[1:3] == (240, 320)
    assert out.column("aesthetic_score")[0].as_py() == pytest.approx(float(_direct_scores(model, head, frames)[0]),
                                                                     rel=1e-4, abs=1e-5)


def test_missing_model_paths_fail_in_init(tiny_aesthetic, tmp_path):
    from udfs.analysis.aesthetic import AestheticScorer

    clip_dir, head_path, _, _ = tiny_aesthetic
    missing = tmp_path / "no-such-clip"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        AestheticScorer(**stage_args("aesthetic", model=str(missing), head=str(head_path)))
    with pytest.raises(FileNotFoundError, match="nohead.pth"):
        AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(tmp_path / "nohead.pth")))


# ---------------------------------------------------------- filter decision
def test_filtered_clips_keep_rows_with_combined_reasons(clips, tiny_aesthetic):
    from udfs.analysis.aesthetic import AestheticScorer

    clip_dir, head_path, _, _ = tiny_aesthetic
    table = _table([("m", clips["moving"], None), ("s", clips["static"], None), ("bad", None, "encode failed")])
    analysed = analysis(consumers={"aesthetic": CONSUMERS["aesthetic"]}, motion=MOTION)(table)
    scorer = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), reduction="mean"))
    scores = scorer(analysed).column("aesthetic_score").to_pylist()
    # A threshold above both scores: every good clip fails the aesthetic filter.
    out = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), reduction="mean",
                          threshold=max(scores[:2]) + 1.0))(analysed)
    rows = out.to_pylist()
    assert [r["clip_id"] for r in rows] == ["m", "s", "bad"]  # nothing deleted
    assert out.schema.field("passed").type == CLIP_FILTER_FIELDS[0].type
    moving, static, bad = rows
    assert bad["passed"] is None and bad["error"] == "encode failed" and bad["aesthetic_score"] is None
    assert bad["filter_reason"] is None
    assert moving["passed"] is False and moving["filter_reason"].startswith("aesthetic: mean=")
    # Both filters' reasons are kept, in stage order.
    assert static["passed"] is False
    motion_reason, aesthetic_reason = static["filter_reason"].split("; ")
    assert motion_reason.startswith("low motion:") and aesthetic_reason.startswith("aesthetic: mean=")
    assert [r["clip_id"] for r in rows if r["passed"] and r["error"] is None] == []

    # A threshold between the two scores: only the lower-scoring clip fails it.
    lo, hi = sorted(scores[:2])
    rows = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), reduction="mean",
                           threshold=(lo + hi) / 2))(analysed).to_pylist()
    moving = rows[0]
    assert moving["passed"] is (moving["aesthetic_score"] == hi)
    curated = [r["clip_id"] for r in rows if r["passed"] and r["error"] is None]
    assert curated == (["m"] if moving["passed"] else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_aesthetic_on_gpu_close_to_cpu(clips, tiny_aesthetic):
    from udfs.analysis.aesthetic import AestheticScorer

    clip_dir, head_path, _, _ = tiny_aesthetic
    analysed = analysis(consumers={"aesthetic": CONSUMERS["aesthetic"]})(_table([("m", clips["moving"], None)]))
    cpu = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), device="cpu"))(analysed)
    gpu = AestheticScorer(**stage_args("aesthetic", model=str(clip_dir), head=str(head_path), device="cuda"))(analysed)
    assert gpu.column("aesthetic_score")[0].as_py() == pytest.approx(cpu.column("aesthetic_score")[0].as_py(),
                                                                     abs=0.05)


def test_yaml_configs_build_the_stages(clips, tiny_aesthetic):
    """Config keys == constructor kwargs (besides name/resources)."""
    from omegaconf import OmegaConf

    from engine.runtime.stages import ENGINE_KEYS
    from udfs.analysis.aesthetic import AestheticScorer

    conf = Path(__file__).resolve().parents[1] / "conf"

    def kwargs(group: str, own_pool: bool = True) -> dict:
        cfg = OmegaConf.to_container(OmegaConf.load(conf / group / "default.yaml"), resolve=True)
        # Motion runs inside ClipAnalysis's pool, so only stages with a pool say how big it is.
        assert ("resources" in cfg) == own_pool
        if own_pool:
            assert set(cfg["resources"]) == {"num_cpus", "num_gpus", "batch_size", "concurrency"}
        return {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}

    motion = kwargs("motion", own_pool=False)
    assert motion["mode"] in ("disable", "score-only", "enable")
    stage = ClipAnalysis(**kwargs("frames"), motion=motion)
    out = stage(_table([("m", clips["moving"], None)]))
    assert out.schema.names[3:] == [f.name for f in stage.output_fields()]
    clip_dir, head_path, _, _ = tiny_aesthetic
    aesthetic = {**kwargs("aesthetic"), "model": str(clip_dir), "head": str(head_path)}
    assert aesthetic["threshold"] is None and aesthetic["reduction"] in ("min", "mean")
    scored = AestheticScorer(**aesthetic)(out)
    assert scored.column("aesthetic_score").null_count == 0


def test_clip_loads_from_a_full_clipmodel_folder(tmp_path):
    """Published CLIP checkpoints (e.g. openai/clip-vit-large-patch14) are
    full CLIPModels; the scorer takes their vision tower + projection."""
    from transformers import CLIPConfig, CLIPModel

    from udfs.analysis.aesthetic import load_clip

    torch.manual_seed(1)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(text_config={**small, "vocab_size": 99}, vision_config={**small, "patch_size": 32},
                        projection_dim=16)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "full")
    vision, processor = load_clip(str(tmp_path / "full"), torch.device("cpu"), torch.float32)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = full.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)
        got = vision(pixel_values=pixels).image_embeds
    torch.testing.assert_close(got, expected)
    assert processor.crop_size["height"] == 224


def test_errors_recorded_after_filtering_clear_passed():
    """A clip that a later stage failed is neither kept nor filtered: passed is null."""
    import pyarrow as pa

    from udfs.analysis.filtering import finalize_filter_columns, set_errors

    table = pa.table({"clip_id": ["a", "b", "c"], "error": [None, None, "decode failed"],
                      "passed": [True, False, None], "filter_reason": [None, "low motion", None]})
    table = set_errors(table, ["embed failed: OOM", None, "ignored: first error wins"])
    out = finalize_filter_columns(table)
    assert out.column("error").to_pylist() == ["embed failed: OOM", None, "decode failed"]
    assert out.column("passed").to_pylist() == [None, False, None]
    assert out.column("filter_reason").to_pylist() == [None, "low motion", None]
