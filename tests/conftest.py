"""Shared fixtures: one Ray session and one set of generated videos per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch/BLAS from oversubscribing the CI machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from engine.runtime.ray_session import DEPENDENCY_NOISE  # noqa: E402
from engine.sample import write_video  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # The dependencies' own noise, as a run ignores it (pytest's per-test
    # warning capture would otherwise show it again).
    for category, message in DEPENDENCY_NOISE:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")

# name -> write_video arguments. Odd sizes, several rates, one shorter than a
# clip, one with audio: the shapes the split rule and encoder must handle.
VIDEO_SPECS = {
    "hd_30fps_23s.mp4": dict(width=320, height=180, fps=30, seconds=23, audio=True),
    "odd_25fps_12s.mp4": dict(width=253, height=141, fps=25, seconds=12),
    "ntsc_29.97fps_5s.mkv": dict(width=176, height=144, fps=30000 / 1001, num_frames=150),
    "tiny_24fps_1s.mp4": dict(width=96, height=64, fps=24, seconds=1),
    "short_15fps_3s.mp4": dict(width=160, height=120, fps=15, seconds=3),
}


# Frames each spec yields: round(seconds * fps), or num_frames.
VIDEO_FRAMES = {
    "hd_30fps_23s.mp4": 690,
    "odd_25fps_12s.mp4": 300,
    "ntsc_29.97fps_5s.mkv": 150,
    "tiny_24fps_1s.mp4": 24,
    "short_15fps_3s.mp4": 45,
}


@pytest.fixture(scope="session")
def video_frames() -> dict[str, int]:
    return dict(VIDEO_FRAMES)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from omegaconf import OmegaConf

        from engine.cli import CONFIG_DIR

        # Idle workers kept as a run's own local Ray keeps them (ray.spare_workers).
        spare = OmegaConf.load(os.path.join(CONFIG_DIR, "config.yaml")).ray.spare_workers
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"num_workers_soft_limit": 2 + int(spare)})
    yield ray


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, spec in VIDEO_SPECS.items():
        write_video(root / name, **spec)
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4096))
    return root


@pytest.fixture(scope="session")
def good_videos(video_dir) -> dict[str, Path]:
    return {name: video_dir / name for name in VIDEO_SPECS}


@pytest.fixture(scope="module")
def local_s3():
    """A local S3 server (moto) for one test module: (boto3 client, the
    `storage_options` that reach it). Create the buckets you need."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    yield client, {"endpoint_override": f"{host}:{port}", "scheme": "http", "access_key": "testing",
                   "secret_key": "testing", "region": "us-east-1"}
    server.stop()


# Barcode videos of a small curate run for the loader and export tests:
# 2 s clips (48, 50 and 60 frames) of three shapes.
TRAINING_SPECS = {
    "wide_24fps_8s.mp4": dict(width=160, height=120, fps=24, seconds=8),
    "hd_25fps_6s.mp4": dict(width=192, height=108, fps=25, seconds=6),
    "tall_30fps_4s.mp4": dict(width=120, height=160, fps=30, seconds=4),
}
TRAINING_EMBED_DIM = 8


@pytest.fixture(scope="session")
def training_output(ray_session, tmp_path_factory) -> Path:
    """An output folder as a full curate run leaves it, for training-data
    tests: 9 clips from one real curate run (fixed stride, 2 s), then the
    columns later stages add, written into the table the way they write
    them: captions with two caption windows per clip, an 8-d embedding, the
    dedup task's `duplicate` flag (one clip), and one clip filtered out
    (passed=false). 7 clips are in the curated view."""
    import json

    import lance
    import numpy as np
    import pyarrow as pa
    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR
    from engine.curate.task import run
    from udfs.schema import CLIP_CAPTION_FIELDS, clip_embedding_fields

    root = tmp_path_factory.mktemp("training")
    videos = [write_video(root / "in" / name, **spec) for name, spec in TRAINING_SPECS.items()]
    out = root / "out"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"input=[{','.join(str(v) for v in videos)}]", f"output={out}", "transcode.preset=ultrafast",
            "motion.mode=disable", "split.clip_len_s=2", "split.min_clip_s=1",
            "export.format=parquet"])
    summary = run(cfg)
    (root / "curate_summary.json").write_text(json.dumps(summary, default=str))
    clips = lance.dataset(str(out / "clips.lance"))
    # In video then time order, not clip id order: ids hash the input path,
    # which holds pytest's numbered tmp folder, so rows[1] and rows[2] (the
    # duplicate and the filtered clip) were different clips from one run to
    # the next, and sometimes both 60-frame clips, leaving no long clip and
    # one resolution bin fewer in the curated view. Now both are clips of
    # the 25 fps video (the first path), which keeps one of its three.
    rows = clips.to_table(columns=["clip_id", "num_frames", "source_uri", "start_frame"]).sort_by(
        [("source_uri", "ascending"), ("start_frame", "ascending")]).to_pylist()
    rng = np.random.default_rng(0)
    windows = [[{"start_frame": 0, "end_frame": r["num_frames"] // 2, "caption": f"first half of {r['clip_id']}",
                 "caption_enhanced": f"the rich first half of {r['clip_id']}"},
                {"start_frame": r["num_frames"] // 2, "end_frame": r["num_frames"],
                 "caption": f"second half of {r['clip_id']}", "caption_enhanced": None}] for r in rows]
    added = pa.table({
        "clip_id": [r["clip_id"] for r in rows],
        "caption": [f"caption of {r['clip_id']}" for r in rows],
        "caption_enhanced": [f"enhanced caption of {r['clip_id']}" for r in rows],
        "caption_windows": windows,
        "embedding": list(rng.standard_normal((len(rows), TRAINING_EMBED_DIM)).astype(np.float32)),
        "duplicate": [i == 1 for i in range(len(rows))],
    }, schema=pa.schema([pa.field("clip_id", pa.string()), *CLIP_CAPTION_FIELDS,
                         *clip_embedding_fields(TRAINING_EMBED_DIM), pa.field("duplicate", pa.bool_())]))
    clips.merge(added, left_on="clip_id")
    clips = lance.dataset(str(out / "clips.lance"))
    clips.update({"passed": "false", "filter_reason": "'motion'"}, where=f"clip_id = '{rows[2]['clip_id']}'")
    clips = lance.dataset(str(out / "clips.lance"))
    clips.update_schema_metadata({"embedding_name": "cosmos_embed1", "embedding_model": "test",
                                  "embedding_dim": str(TRAINING_EMBED_DIM)})
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIP (udfs.models.tiny.build_clip) saved to disk: 24-d embeddings."""
    from udfs.models.tiny import build_clip

    return build_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def embedded_output(ray_session, video_dir, tiny_clip, tmp_path_factory) -> Path:
    """A real curate run with tiny-CLIP embeddings: three sample videos (six
    clips) and one corrupt file. Treat it as read-only: copy it before
    running a task that writes (shutil.copytree)."""
    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR
    from engine.curate.task import run

    out = tmp_path_factory.mktemp("embedded_output")
    inputs = [str(video_dir / n) for n in ("hd_30fps_23s.mp4", "odd_25fps_12s.mp4", "short_15fps_3s.mp4", "corrupt.mp4")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"input=[{','.join(inputs)}]", f"output={out}", "transcode.preset=ultrafast",
            "embed=clip", f"embed.model={tiny_clip}", "embed.resources.batch_size=8",
        ])
    run(cfg)
    return out
