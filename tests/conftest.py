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
