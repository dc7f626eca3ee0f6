"""transcode.decode in a curate run: nvdec that cannot run fails before any
video is transcoded; the choice lands in summary.json, as the encoder's does."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from udfs.media.nvdec import NvdecUnavailable


def config(out, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"output={out}", *overrides])


def test_a_run_asking_for_nvdec_without_a_gpu_share_fails_before_any_video_is_decoded(ray_session, good_videos,
                                                                                      tmp_path):
    from engine.curate.task import run

    out = tmp_path / "out"
    cfg = config(out, f"input={good_videos['short_15fps_3s.mp4']}", "transcode.decode=nvdec")
    with pytest.raises(NvdecUnavailable, match="transcode.resources.num_gpus"):
        run(cfg)
    import lance

    assert lance.dataset(out / "clips.lance").count_rows() == 0  # nothing was transcoded


def test_summary_records_the_decoder_and_why(ray_session, good_videos, tmp_path):
    from engine.curate.task import run

    summary = run(config(tmp_path / "out", f"input={good_videos['short_15fps_3s.mp4']}"))
    assert summary["decode"] == {"requested": "auto", "decoder": "cpu",
                                 "why": "NVDEC unusable: the transcode workers ask for no GPU "
                                        "(transcode.resources.num_gpus=0), so they see none; decoding on the CPUs"}
    assert summary["run"]["videos_committed"] == 1


def test_switching_the_decoder_keeps_a_resumable_output(ray_session, good_videos, tmp_path):
    """decode changes how frames are decoded, not which: a run with
    decode=cpu resumes one made with auto."""
    from engine.curate.task import run

    out = tmp_path / "out"
    source = f"input={good_videos['short_15fps_3s.mp4']}"
    run(config(out, source))
    again = run(config(out, source, "transcode.decode=cpu"))
    assert again["run"]["videos_skipped"] == 1
