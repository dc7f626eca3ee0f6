"""transcode.encoder by capability: a GPU without NVENC (A100, H100) gets
libx264 under `auto`, and an explicit h264_nvenc fails before any video is
decoded. CUDA and the encoder are faked where this CPU machine has none."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from udfs.media import encoders
from udfs.media.encoders import EncoderUnavailable, choose_encoder


@pytest.fixture
def h100(monkeypatch):
    """A visible CUDA GPU that cannot open an NVENC session, as an H100."""
    monkeypatch.setattr(encoders, "cuda_available", lambda: True)
    monkeypatch.setattr(encoders, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")

    def no_nvenc() -> None:
        raise OSError("avcodec_open2(h264_nvenc): OpenEncodeSessionEx failed: no encode device (10)")

    monkeypatch.setattr(encoders, "open_nvenc_session", no_nvenc)
    encoders.nvenc_probe.cache_clear()
    yield
    encoders.nvenc_probe.cache_clear()


def test_auto_falls_back_to_libx264_when_the_nvenc_probe_fails(h100):
    choice = choose_encoder("auto")
    assert choice.encoder == "libx264" and "NVIDIA H100 80GB HBM3 cannot open an NVENC session" in choice.why
    assert "OpenEncodeSessionEx" in choice.why


def test_auto_takes_nvenc_where_a_session_opens(monkeypatch):
    monkeypatch.setattr(encoders, "cuda_available", lambda: True)
    monkeypatch.setattr(encoders, "gpu_name", lambda: "NVIDIA L4")
    monkeypatch.setattr(encoders, "open_nvenc_session", lambda: None)
    encoders.nvenc_probe.cache_clear()
    try:
        choice = choose_encoder("auto")
    finally:
        encoders.nvenc_probe.cache_clear()
    assert choice.encoder == "h264_nvenc" and "NVIDIA L4" in choice.why


def test_the_real_probe_fails_cleanly_without_a_gpu(monkeypatch):
    # FFmpeg's own h264_nvenc, really opened where there is no NVENC device.
    monkeypatch.setattr(encoders, "cuda_available", lambda: True)
    encoders.nvenc_probe.cache_clear()
    try:
        works, why = encoders.nvenc_probe()
    finally:
        encoders.nvenc_probe.cache_clear()
    assert not works and "cannot open an NVENC session" in why


def test_explicit_nvenc_on_a_gpu_without_it_fails_naming_the_gpu(h100):
    with pytest.raises(EncoderUnavailable, match="NVIDIA H100 80GB HBM3 cannot open an NVENC session.*libx264"):
        choose_encoder("h264_nvenc")
    with pytest.raises(ValueError, match="unsupported encoder"):
        choose_encoder("libx265")


def test_a_transcoder_under_auto_encodes_with_libx264_here():
    from reelsift_conf import stage_args
    from udfs.media.transcode import ClipTranscoder

    stage = ClipTranscoder(**stage_args("transcode", encoder="auto"))
    assert stage.encoder == "libx264" and stage.encoder_choice.requested == "auto"


def test_a_run_asking_for_nvenc_fails_before_any_video_is_decoded(ray_session, good_videos, tmp_path):
    from engine.curate.task import run

    out = tmp_path / "out"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"input={good_videos['short_15fps_3s.mp4']}",
                                                       f"output={out}", "transcode.encoder=h264_nvenc"])
    with pytest.raises(EncoderUnavailable, match="transcode.resources.num_gpus"):
        run(cfg)
    import lance

    assert lance.dataset(out / "clips.lance").count_rows() == 0  # nothing was transcoded


def test_the_gpu_node_experiment_gives_the_models_the_gpus_and_the_encode_the_cpus():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=gpu_node", "input=x", "output=y"])
    assert cfg.split.name == "transnetv2" and cfg.split.resources.num_gpus == 0.5
    assert cfg.embed.name == "clip" and cfg.embed.resources.num_gpus == 0.5
    assert cfg.transcode.encoder == "libx264" and cfg.transcode.threads == 4
    # NVDEC where PyNvVideoCodec is installed: the tasks need a GPU token to see one.
    assert cfg.transcode.decode == "auto" and cfg.transcode.resources.num_gpus == 0.02
    # 200 one-CPU tasks (more than an 8-GPU node's cores) fit the 4 GPUs the models leave.
    models = sum(cfg[n].resources.num_gpus * cfg[n].resources.concurrency for n in ("split", "embed"))
    assert models + 200 * cfg.transcode.resources.num_gpus <= 8



def test_a_small_gpu_share_does_not_count_more_workers_than_the_cpus_hold():
    from engine.runtime.stages import StageStep, worker_slots

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=gpu_node", "input=x", "output=y"])
    transcode = StageStep.from_node("transcode", "udfs.media.transcode:ClipTranscoder",
                                    {"resources": cfg.transcode.resources})
    assert (transcode.num_cpus, transcode.num_gpus) == (1, 0.02)
    # 8 GPUs / 0.02 would be 400 slots; a node of 96 CPUs runs 96 one-CPU transcode tasks.
    assert worker_slots(transcode, cpus=96, gpus=8) == 96
    assert worker_slots(transcode, cpus=96, gpus=0.1) == 5  # here the GPU token is the bound
