"""Model stages (embeddings, captions) on tiny random checkpoints built here,
saved to disk and loaded through the same code path users run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from reelsift_conf import stage_args
from udfs.schema import CLIP_CAPTION_FIELDS, clip_embedding_fields, frame_columns
from engine.sample import write_video
from udfs.models.tiny import build_clip, build_qwen2_5_vl, build_qwen2_lm, build_siglip
from udfs.models.caption import CaptionStage, QwenVLTransformersCaptioner, Window, sample_positions, window_spans
from udfs.models.embed import ClipFamilyEmbedder, EmbedStage, embedding_dim
from udfs.models.loading import ModelNotFoundError, pick_dtype, resolve_model, resolve_stage_models
from udfs.models.qwen_vision import QwenVideoPatcher
from udfs.media.video import decode_rgb, pack_frames

# conf/embed/clip.yaml's settings (the stage constructors take no defaults of their own).
EMBED_CONF = {"device": "auto", "dtype": "auto", "frames": None, "frame_batch_size": 64, "skip_filtered": False,
              "revision": None}


torch.set_num_threads(1)

FPS = 30
W, H = 84, 56


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": build_clip(root / "clip"),
        "siglip": build_siglip(root / "siglip"),
        "qwen_vl": build_qwen2_5_vl(root / "qwen_vl"),
        "qwen_lm": build_qwen2_lm(root / "qwen_lm"),
    }


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "long": str(write_video(root / "long.mp4", width=W, height=H, fps=FPS, scenes=[300, 300])),
        "short": str(write_video(root / "short.mp4", width=W, height=H, fps=FPS, num_frames=90, moving=False)),
    }


def frame_row(consumer: str, frames: np.ndarray, indices: list[int]) -> dict:
    packed, idx, hw = pack_frames(frames, indices)
    cols = frame_columns(consumer)
    return {cols[0]: packed, cols[1]: idx, cols[2]: hw}


def clip_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [pa.field("clip_id", pa.string()), pa.field("num_frames", pa.int64()), pa.field("fps", pa.float64()),
             pa.field("error", pa.string())]
            + [f for f in _frame_fields(rows)]
        ),
    )


def _frame_fields(rows: list[dict]) -> list[pa.Field]:
    from udfs.schema import frame_fields

    consumer = next(k for k in rows[0] if k.endswith("_frame_hw"))[: -len("_frame_hw")]
    return frame_fields(consumer)


def embed_rows(videos: dict[str, str], count: int = 8) -> list[dict]:
    """Rows: long clip, short clip, long clip again, and a row that already failed."""
    rows = []
    for clip_id, key, n in (("a", "long", 600), ("b", "short", 90), ("a2", "long", 600)):
        indices = np.linspace(0, n - 1, count).round().astype(int).tolist()
        frames = decode_rgb(videos[key], 32, 32)[indices]
        rows.append({"clip_id": clip_id, "num_frames": n, "fps": FPS, "error": None, **frame_row("embed", frames, indices)})
    rows.append({"clip_id": "bad", "num_frames": 0, "fps": FPS, "error": "encode failed",
                 **frame_row("embed", np.zeros((0, 32, 32, 3), np.uint8), [])})
    return rows


# ------------------------------------------------------------ model setup
def test_missing_model_fails_fast_with_path(tmp_path, models) -> None:
    """The driver's resolve step and the stage constructors (built before any
    batch, so before any decode) fail with the path in the message."""
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_stage_models({"model": str(missing)})
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        EmbedStage(**EMBED_CONF, name="clip", model=str(missing))
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        CaptionStage(**stage_args("caption", "qwen_vl", model=str(missing)))
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_stage_models({"model": models["qwen_vl"], "enhance": {"model": str(missing)}})


def test_folder_without_weights_is_rejected(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_not_cached_names_the_id(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="nobody/not-a-model"):
        resolve_model("nobody/not-a-model", cache_dir=str(tmp_path))


def test_local_folder_resolves_offline(models, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = resolve_stage_models({"model": models["qwen_vl"], "enhance": {"model": models["qwen_lm"]}, "top_p": 0.5})
    assert params == {"model": models["qwen_vl"], "enhance": {"model": models["qwen_lm"]}, "top_p": 0.5}


def test_cpu_dtype_is_fp32() -> None:
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16


# --------------------------------------------------------------- embeddings
@pytest.mark.parametrize("kind, dim", [("clip", 24), ("siglip", 32)])
def test_embed_stage_vectors(models, videos, kind, dim) -> None:
    assert embedding_dim("clip", models[kind]) == dim
    stage = EmbedStage(**{**EMBED_CONF, "frames": {"policy": "uniform", "count": 8, "size": 32}}, name="clip", model=models[kind])
    batch = clip_table(embed_rows(videos))
    out = stage(batch)

    assert out.schema.field("embedding").type == clip_embedding_fields(dim)[0].type
    assert not set(frame_columns("embed")) & set(out.column_names)
    assert out.column("clip_id").to_pylist() == ["a", "b", "a2", "bad"]
    assert out.column("error").to_pylist() == [None, None, None, "encode failed"]
    vectors = out.column("embedding").to_pylist()
    assert vectors[3] is None
    emb = np.asarray(vectors[:3], dtype=np.float32)
    assert emb.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])  # identical clips
    assert not np.allclose(emb[0], emb[1])
    assert stage.metadata() == {"embedding_model": models[kind], "embedding_name": "clip", "embedding_dim": str(dim)}


def test_clip_embedding_matches_direct_model_call(models, videos) -> None:
    """Reference computed with transformers directly: mean of normalised frame features."""
    from transformers import AutoModel, AutoProcessor

    frames = decode_rgb(videos["long"], 32, 32, step=75)
    ours = ClipFamilyEmbedder(models["clip"], frame_batch_size=3).embed_clips([frames])[0]
    processor = AutoProcessor.from_pretrained(models["clip"])
    model = AutoModel.from_pretrained(models["clip"]).eval()
    with torch.no_grad():
        feats = model.get_image_features(**processor(images=list(frames), return_tensors="pt")).pooler_output
    feats = feats / feats.norm(dim=-1, keepdim=True)
    ref = feats.mean(0)
    ref = (ref / ref.norm()).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_query_embeds_into_clip_space(models, kind) -> None:
    stage = EmbedStage(**EMBED_CONF, name="clip", model=models[kind])
    q = stage.embed_text(["a cat on a red mat", "a car at sunset"])
    assert q.shape == (2, stage.dim) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(q[0], q[1])


def test_unknown_embedder_name(models) -> None:
    with pytest.raises(ValueError, match="unknown embedder"):
        EmbedStage(**EMBED_CONF, name="nope", model=models["clip"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_embedder_on_gpu_matches_cpu(models, videos) -> None:
    frames = decode_rgb(videos["long"], 32, 32, step=75)
    cpu = ClipFamilyEmbedder(models["clip"], device="cpu").embed_clips([frames])
    gpu = ClipFamilyEmbedder(models["clip"], device="cuda").embed_clips([frames])
    assert float(cpu[0] @ gpu[0]) > 0.99


# ------------------------------------------------------------------ windows
@pytest.mark.parametrize(
    "n, spans",
    [
        (0, []),
        (100, [(0, 100)]),
        (256, [(0, 256)]),
        (383, [(0, 383)]),  # remainder 127 merges into the last window
        (384, [(0, 256), (256, 384)]),  # remainder 128 is its own window
        (600, [(0, 256), (256, 600)]),
        (1000, [(0, 256), (256, 512), (512, 768), (768, 1000)]),
    ],
)
def test_window_spans(n, spans) -> None:
    assert window_spans(n) == spans


def test_sample_positions_at_2fps() -> None:
    dense = np.arange(300)
    picked = dense[sample_positions(dense, 0, 256, 30.0, 2.0)]
    assert picked.tolist() == list(range(0, 256, 15))
    sparse = np.arange(0, 300, 15)  # extraction already at 2 fps: keep all in the window
    assert sparse[sample_positions(sparse, 256, 300, 30.0, 2.0)].tolist() == [270, 285]


def test_patcher_tokens_match_grid() -> None:
    patcher = QwenVideoPatcher.from_pretrained("/nonexistent-uses-defaults", max_pixels=16 * 28 * 28)
    frames = np.random.default_rng(0).integers(0, 255, (5, 56, 84, 3), dtype=np.uint8)
    patches, grid = patcher(frames)
    assert grid == (3, 4, 6)  # 5 frames padded to 6 -> 3 temporal patches; 56x84 -> 4x6 patches
    assert patches.shape == (3 * 4 * 6, 3 * 2 * 14 * 14)
    assert patcher.num_tokens(grid) == 18
    # The first patch's first channel block holds frame 0's top-left 14x14 pixels, normalised.
    expected = (frames[0, :14, :14, 0] / 255.0 - patcher.image_mean[0]) / patcher.image_std[0]
    np.testing.assert_allclose(patches[0, : 14 * 14].reshape(14, 14), expected, atol=1e-5)


def test_patcher_matches_transformers_video_processor() -> None:
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.random.default_rng(1).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    ref = Qwen2VLVideoProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)(
        videos=[frames], do_sample_frames=False, return_tensors="pt"
    )
    ours, grid = QwenVideoPatcher.from_pretrained("/nonexistent", max_pixels=16 * 28 * 28)(frames)
    assert list(ref["video_grid_thw"][0]) == list(grid)
    np.testing.assert_allclose(ours, ref["pixel_values_videos"].numpy(), atol=1e-4)


# ----------------------------------------------------------------- captions
def caption_rows(videos: dict[str, str]) -> list[dict]:
    """Caption frames as extraction delivers them: every 15th frame (2 fps at 30 fps)."""
    rows = []
    for clip_id, key, n in (("long", "long", 600), ("short", "short", 90)):
        frames = decode_rgb(videos[key], W, H, step=15)
        indices = list(range(0, n, 15))
        rows.append({"clip_id": clip_id, "num_frames": n, "fps": FPS, "error": None,
                     **frame_row("caption", frames, indices)})
    rows.append({"clip_id": "bad", "num_frames": 0, "fps": FPS, "error": "encode failed",
                 **frame_row("caption", np.zeros((0, H, W, 3), np.uint8), [])})
    return rows


@pytest.fixture(scope="session")
def captioned(models, videos) -> pa.Table:
    stage = CaptionStage(**stage_args(
        "caption", "qwen_vl",
        model=models["qwen_vl"], prompt="default", temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=2,
        enhance={"model": models["qwen_lm"], "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0},
        frames={"policy": "sequence", "fps": 2},
    ))
    return stage(clip_table(caption_rows(videos)))


def test_captions_per_window_and_clip(captioned) -> None:
    assert not set(frame_columns("caption")) & set(captioned.column_names)
    for field in CLIP_CAPTION_FIELDS:
        assert captioned.schema.field(field.name).type == field.type
    rows = captioned.to_pylist()
    long, short, bad = rows
    assert [(w["start_frame"], w["end_frame"]) for w in long["caption_windows"]] == [(0, 256), (256, 600)]
    assert [(w["start_frame"], w["end_frame"]) for w in short["caption_windows"]] == [(0, 90)]
    for row in (long, short):
        assert row["error"] is None
        for w in row["caption_windows"]:
            assert isinstance(w["caption"], str) and w["caption"]
            assert isinstance(w["caption_enhanced"], str) and w["caption_enhanced"]
        assert row["caption"] == " ".join(w["caption"] for w in row["caption_windows"])
        assert row["caption_enhanced"] == " ".join(w["caption_enhanced"] for w in row["caption_windows"])
    assert bad["error"] == "encode failed"
    assert bad["caption"] is None and bad["caption_windows"] is None


def test_identical_windows_get_identical_greedy_captions(models, videos) -> None:
    captioner = QwenVLTransformersCaptioner(models["qwen_vl"])
    frames = decode_rgb(videos["long"], W, H, step=15, end_frame=256)
    other = decode_rgb(videos["long"], W, H, step=15, start_frame=300, end_frame=556)
    windows = [Window(0, 0, 256, frames, 2.0), Window(1, 0, 256, other, 2.0), Window(2, 0, 256, frames, 2.0)]
    texts = captioner.generate("describe", windows, max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0)
    assert len(texts) == 3 and texts[0] == texts[2]
    assert captioner.last_generated_tokens > 0


def test_custom_prompt_and_no_enhancer(models, videos) -> None:
    stage = CaptionStage(**stage_args("caption", "qwen_vl", model=models["qwen_vl"], prompt="What moves in this clip?",
                                      max_new_tokens=3, temperature=1.0, top_p=1.0))
    assert stage.prompt == "What moves in this clip?" and stage.enhancer is None
    out = stage(clip_table(caption_rows(videos)[1:2])).to_pylist()[0]
    assert out["caption_enhanced"] is None
    assert [w["caption_enhanced"] for w in out["caption_windows"]] == [None]


def test_vllm_backend_needs_gpu(models) -> None:
    if torch.cuda.is_available():
        pytest.skip("GPU present: vLLM availability decides")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        CaptionStage(**stage_args("caption", "qwen_vl", model=models["qwen_vl"], backend="vllm"))


# ------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "path, cls_name",
    [("conf/embed/clip.yaml", "clip"), ("conf/embed/cosmos_embed1.yaml", "cosmos_embed1"),
     ("conf/caption/qwen_vl.yaml", "qwen_vl")],
)
def test_yaml_keys_are_constructor_kwargs(path, cls_name) -> None:
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    from udfs.models.caption import CAPTION_STAGES
    from udfs.models.embed import EMBED_STAGES

    root = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.to_container(OmegaConf.load(root / path))
    assert cfg["name"] == cls_name and set(cfg["resources"]) == {"num_cpus", "num_gpus", "batch_size", "concurrency"}
    cls = {**EMBED_STAGES, **CAPTION_STAGES}[cls_name]
    base = cls.__mro__[1] if cls_name in EMBED_STAGES else cls
    params = set(inspect.signature(base.__init__).parameters) - {"self", "name"}
    assert set(cfg) - {"name", "resources"} <= params
    assert cfg["frames"]["policy"] in ("uniform", "sequence")


def test_stage_built_from_yaml_with_local_model(models, videos) -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    from udfs.models.embed import EMBED_STAGES

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/embed/clip.yaml"))
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "resources")} | {"model": models["clip"]}
    stage = EMBED_STAGES[cfg["name"]](**resolve_stage_models(kwargs))
    out = stage(clip_table(embed_rows(videos)[:1]))
    assert len(out.column("embedding")[0].as_py()) == 24


# ------------------------------------------------- Cosmos-Embed1 calling surface
@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> str:
    from udfs.models.tiny import build_video_text_standin

    return build_video_text_standin(tmp_path_factory.mktemp("models") / "video_text_standin", embed_dim=16)


def test_cosmos_embed1_stage_on_remote_code_checkpoint(standin, videos) -> None:
    """The Cosmos-Embed1 path (trust_remote_code AutoModel/AutoProcessor, 8-frame
    video batches, text tower) on a tiny checkpoint with the same API."""
    from udfs.models.embed import EMBED_STAGES

    stage = EMBED_STAGES["cosmos_embed1"](**{**EMBED_CONF, "frames": {"policy": "uniform", "count": 8, "size": 32}},
                                           model=standin)
    assert stage.embedder.num_frames == 8 and stage.dim == 16
    rows = embed_rows(videos, count=12)  # more frames than the model takes: resampled to 8
    out = stage(clip_table(rows))
    vectors = out.column("embedding").to_pylist()
    emb = np.asarray(vectors[:3], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])
    assert not np.allclose(emb[0], emb[1]) and vectors[3] is None
    q = stage.embed_text(["a cat on a red mat"])
    assert q.shape == (1, 16)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


def test_hub_id_resolves_offline_from_cache(models, tmp_path, monkeypatch) -> None:
    """A hub id that was downloaded once resolves offline, at the pinned revision."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-clip"
    shutil.copytree(models["clip"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = str(repo / "snapshots" / sha)
    assert resolve_model("acme/tiny-clip", cache_dir=str(tmp_path)) == expected
    assert resolve_model("acme/tiny-clip", revision=sha, cache_dir=str(tmp_path)) == expected
    with pytest.raises(ModelNotFoundError, match="acme/tiny-clip"):
        resolve_model("acme/tiny-clip", revision="f" * 40, cache_dir=str(tmp_path))


def test_windows_are_bucketed_by_size(models, videos) -> None:
    """Windows of all clips in a batch are generated smallest-first in groups of
    batch_size, so a long clip's big windows do not pad the short ones."""
    stage = CaptionStage(**stage_args("caption", "qwen_vl", model=models["qwen_vl"], max_new_tokens=1, batch_size=2,
                                      temperature=0.0))
    seen: list[list[int]] = []
    generate = stage.captioner.generate

    def spy(prompt, windows, **kwargs):
        seen.append([len(w.frames) for w in windows])
        return generate(prompt, windows, **kwargs)

    stage.captioner.generate = spy
    out = stage(clip_table(caption_rows(videos)))
    sizes = [n for call in seen for n in call]
    assert all(len(call) <= 2 for call in seen)
    assert sizes == sorted(sizes) and len(sizes) == 3  # long: 2 windows, short: 1
    # Results still land on their own rows and windows.
    assert [len(w) for w in out.column("caption_windows").to_pylist()[:2]] == [2, 1]


def test_failed_generate_marks_only_its_rows(models, videos) -> None:
    stage = CaptionStage(**stage_args("caption", "qwen_vl", model=models["qwen_vl"], max_new_tokens=1, batch_size=1,
                                      temperature=0.0))
    generate = stage.captioner.generate

    def flaky(prompt, windows, **kwargs):
        if len(windows[0].frames) == 6:  # the short clip's only window (90 frames at 2 fps)
            raise RuntimeError("out of memory")
        return generate(prompt, windows, **kwargs)

    stage.captioner.generate = flaky
    rows = stage(clip_table(caption_rows(videos))).to_pylist()
    assert rows[0]["error"] is None and len(rows[0]["caption_windows"]) == 2
    assert rows[1]["error"] == "caption: RuntimeError: out of memory"
    assert rows[1]["caption"] is None and rows[1]["caption_windows"] is None
    assert rows[2]["error"] == "encode failed"


def test_filtered_clips_are_skipped(models, videos) -> None:
    table = clip_table(caption_rows(videos)[:2])
    table = table.append_column("passed", pa.array([False, True]))
    rows = CaptionStage(**stage_args("caption", "qwen_vl", model=models["qwen_vl"], max_new_tokens=1,
                                             temperature=0.0))(table).to_pylist()
    assert rows[0]["caption_windows"] is None and rows[0]["error"] is None
    assert [(w["start_frame"], w["end_frame"]) for w in rows[1]["caption_windows"]] == [(0, 90)]
    emb = EmbedStage(**{**EMBED_CONF, "skip_filtered": True}, name="clip", model=models["clip"])
    out = emb(clip_table(embed_rows(videos)[:2]).append_column("passed", pa.array([True, False])))
    assert out.column("embedding").to_pylist()[1] is None and out.column("embedding")[0].as_py() is not None
