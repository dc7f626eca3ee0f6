"""Shared fixtures: one Ray session and one set of generated videos per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch/BLAS from oversubscribing the CI machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from engine.synth import write_video  # noqa: E402

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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIP (scripts/random_models.build_clip) saved to disk: 24-d embeddings."""
    from scripts.random_models import build_clip

    return build_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def embedded_output(ray_session, video_dir, tiny_clip, tmp_path_factory) -> Path:
    """A real curate run with tiny-CLIP embeddings: three sample videos (six
    clips) and one corrupt file. Treat it as read-only: copy it before
    running a task that writes (shutil.copytree)."""
    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR
    from engine.curate import run

    out = tmp_path_factory.mktemp("embedded_output")
    inputs = [str(video_dir / n) for n in ("hd_30fps_23s.mp4", "odd_25fps_12s.mp4", "short_15fps_3s.mp4", "corrupt.mp4")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"input=[{','.join(inputs)}]", f"output={out}", "transcode.preset=ultrafast",
            "embed=clip", f"embed.model={tiny_clip}", "embed.resources.batch_size=8",
        ])
    run(cfg)
    return out
