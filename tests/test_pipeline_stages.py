"""Every stage wired through the engine: scene split, motion, aesthetic,
embeddings and captions, on tiny random models saved to disk."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.curate.task import run
from udfs.schema import frame_columns
from engine.sample import write_video
from udfs.models.tiny import build_clip, build_qwen2_5_vl
from udfs.models.caption import window_spans
from udfs.models.embed import embedding_dim


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from udfs.analysis.aesthetic import AestheticHead

    root = tmp_path_factory.mktemp("models")
    clip = build_clip(root / "clip")
    qwen = build_qwen2_5_vl(root / "qwen_vl")
    dim = embedding_dim("clip", clip)
    torch.manual_seed(0)
    head = AestheticHead(dim)
    torch.save(head.state_dict(), root / "head.pth")
    return {"clip": clip, "qwen": qwen, "head": str(root / "head.pth"), "dim": dim}


@pytest.fixture(scope="module")
def scene_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene_videos")
    write_video(root / "cuts.mp4", width=96, height=64, fps=30, scenes=[120, 150])
    write_video(root / "still.mp4", width=96, height=64, fps=30, seconds=4, moving=False)
    return root


@pytest.mark.slow
def test_all_stages_through_the_engine(ray_session, tiny_models, scene_videos, tmp_path):
    cfg = config(
        f"input={scene_videos}", f"output={tmp_path}", "transcode.preset=ultrafast",
        "split=content", "motion.mode=enable",
        "aesthetic.enabled=true", f"aesthetic.model={tiny_models['clip']}", f"aesthetic.head={tiny_models['head']}",
        "embed=clip", f"embed.model={tiny_models['clip']}",
        "caption=qwen_vl", f"caption.model={tiny_models['qwen']}", "caption.max_new_tokens=4",
        # A random model sampled near-greedily may end at once; sample freely.
        "caption.temperature=1.0", "caption.top_p=1.0",
        "caption.skip_filtered=false", "caption.frames.size=null",
    )
    summary = run(cfg)
    clips = lance.dataset(str(tmp_path / "clips.lance"))
    rows = {(r["source_uri"].rsplit("/", 1)[1], r["start_frame"], r["end_frame"]): r
            for r in clips.to_table(columns=[c for c in clips.schema.names if c not in ("mp4", "preview_webp")])
            .to_pylist()}
    # Content split: the cut at frame 120 becomes two scenes, 0.5 s (15 frames) cropped from each end.
    assert set(rows) == {("cuts.mp4", 15, 105), ("cuts.mp4", 135, 255), ("still.mp4", 15, 105)}
    still = rows[("still.mp4", 15, 105)]
    assert still["passed"] is False and "low motion" in still["filter_reason"]
    for key in [("cuts.mp4", 15, 105), ("cuts.mp4", 135, 255)]:
        assert rows[key]["passed"] is True, rows[key]["filter_reason"]
    for r in rows.values():
        assert r["error"] is None
        assert r["aesthetic_score"] is not None and np.isfinite(r["aesthetic_score"])
        vec = np.asarray(r["embedding"], dtype=np.float64)
        assert vec.shape == (tiny_models["dim"],) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
        n = r["end_frame"] - r["start_frame"]
        assert [(w["start_frame"], w["end_frame"]) for w in r["caption_windows"]] == window_spans(n)
        assert all(w["caption"] for w in r["caption_windows"]) and r["caption"]
    transient = {c for consumer in ("aesthetic", "embed", "caption") for c in frame_columns(consumer)}
    assert not transient & set(clips.schema.names)  # frames never land in the table
    assert clips.schema.metadata[b"embedding_dim"] == str(tiny_models["dim"]).encode()
    assert summary["clips_passed"] == 2
    curated = clips.to_table(filter="passed AND error IS NULL", columns=["clip_id"])
    assert curated.num_rows == 2
    videos = lance.dataset(str(tmp_path / "videos.lance")).to_table().to_pylist()
    cuts = next(v for v in videos if v["uri"].endswith("cuts.mp4"))
    assert cuts["scene_detector"] == "content" and len(cuts["transition_probs"]) == 270
    assert int(np.argmax(cuts["transition_probs"])) in (119, 120)
    assert set(summary["stages"]) >= {"split_content", "clip_analysis", "aesthetic", "embed", "caption"}
    assert pc.sum(clips.to_table(columns=["num_frames"]).column("num_frames")).as_py() == 90 + 120 + 90


def test_missing_model_fails_before_any_decode(tmp_path, scene_videos):
    cfg = config(f"input={scene_videos}", f"output={tmp_path}", "embed=clip",
                 f"embed.model={tmp_path / 'no_such_model'}")
    with pytest.raises(Exception, match="no_such_model"):
        run(cfg)
    assert not (tmp_path / "clips.lance").exists()
