"""transcode.decode=auto|cpu|nvdec on a CPU machine: no PyNvVideoCodec and no
GPU here, so CUDA is faked and PyNvVideoCodec is a stand-in module whose
SimpleDecoder decodes with PyAV and hands out NV12 frames through DLPack,
as NVDEC's do. The transcode's own NVDEC path (pacing by PyAV's packets,
the timestamp check, NV12 -> yuv420p, the CPU fallbacks) runs for real."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import av
import pyarrow as pa
import pytest

from engine.sample import write_video
from reelsift_conf import stage_args
from udfs.media import nvdec
from udfs.media.nvdec import NvdecUnavailable, choose_decoder
from udfs.media.probe import ProbeVideos
from udfs.media.transcode import ClipTranscoder
from udfs.split.fixed_stride import FixedStrideSplit


class FakeFrame:
    """One decoded frame as PyNvVideoCodec gives it: NV12, (1.5H, W) over
    DLPack, and its presentation timestamp."""

    def __init__(self, nv12, pts: int) -> None:
        self._nv12, self._pts = nv12, pts

    def __dlpack__(self, **kwargs):
        return self._nv12.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._nv12.__dlpack_device__()

    def getPTS(self) -> int:  # noqa: N802 - PyNvVideoCodec's name
        return self._pts


def fake_pynvvideocodec(*, pts_shift: int = 0, drop_at: int | None = None,
                        fail_at: int | None = None) -> types.ModuleType:
    """A PyNvVideoCodec whose SimpleDecoder yields PyAV's frames as NV12;
    `pts_shift` / `drop_at` make it disagree with the source (at the start /
    from frame `drop_at` on), as a decoder that misreads a file would, and
    `fail_at` makes it raise there, as a driver error does."""
    module = types.ModuleType("PyNvVideoCodec")
    module.__spec__ = importlib.machinery.ModuleSpec("PyNvVideoCodec", None)
    module.OutputColorType = types.SimpleNamespace(NATIVE="native", RGB="rgb")
    module.opened = []

    class SimpleDecoder:
        def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type=None):
            assert output_color_type == "native" and use_device_memory
            self.container = av.open(path)
            self.stream = self.container.streams.video[0]
            self.frames = self.container.decode(self.stream)
            self.index = 0
            self.served = 0
            module.opened.append(self)

        def get_stream_metadata(self):
            ctx = self.stream.codec_context
            return types.SimpleNamespace(width=ctx.width, height=ctx.height)

        def get_batch_frames(self, n):
            out = []
            for frame in self.frames:
                index, self.index = self.index, self.index + 1
                if fail_at is not None and index == fail_at:
                    raise RuntimeError("cuvidMapVideoFrame failed: CUDA_ERROR_LAUNCH_FAILED")
                if drop_at is not None and index == drop_at:
                    continue
                out.append(FakeFrame(frame.reformat(format="nv12").to_ndarray(), frame.pts + pts_shift))
                if len(out) == n:
                    break
            self.served += len(out)
            return out

    module.SimpleDecoder = SimpleDecoder
    return module


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA GPU and a PyNvVideoCodec that installs the given fake."""
    monkeypatch.setattr(nvdec, "cuda_available", lambda: True)
    monkeypatch.setattr(nvdec, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    nvdec.choose_decoder.cache_clear()
    nvdec.stats.clear()
    nvdec.fallbacks.clear()

    def install(**kwargs) -> types.ModuleType:
        module = fake_pynvvideocodec(**kwargs)
        monkeypatch.setitem(sys.modules, "PyNvVideoCodec", module)
        return module

    yield install
    nvdec.choose_decoder.cache_clear()


@pytest.fixture
def no_pynvvideocodec(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # unimportable, even where installed
    nvdec.choose_decoder.cache_clear()
    yield
    nvdec.choose_decoder.cache_clear()


def plan(uri: str, clip_len_s: float = 10.0) -> pa.Table:
    spans = FixedStrideSplit(**stage_args("split", "fixed_stride", clip_len_s=clip_len_s, min_clip_s=1.0))
    return spans(ProbeVideos(**stage_args("probe"))(pa.table({"uri": [uri]})))


MOTION = {"mode": "score-only", "fps": 2}


def transcode(table: pa.Table, decode: str, **kwargs) -> list[dict]:
    stage = ClipTranscoder(**stage_args("transcode", decode=decode, preset="ultrafast", crf=18, motion=MOTION,
                                        **kwargs))
    return pa.concat_tables(list(stage(table))).to_pylist()


def test_nvdec_without_pynvvideocodec_fails_before_any_video_is_opened(no_pynvvideocodec, monkeypatch):
    opened = []
    monkeypatch.setattr("udfs.media.transcode.open_video", lambda *a: opened.append(a))
    with pytest.raises(NvdecUnavailable, match="transcode.decode=nvdec cannot run: PyNvVideoCodec is not "
                                               "installed.*transcode.decode=auto"):
        ClipTranscoder(**stage_args("transcode", decode="nvdec"))
    assert opened == []
    with pytest.raises(ValueError, match="unsupported transcode.decode"):
        choose_decoder("gpu")


def test_nvdec_without_a_gpu_fails_naming_the_gpu_share(gpu, monkeypatch):
    gpu()
    monkeypatch.setattr(nvdec, "cuda_available", lambda: False)
    with pytest.raises(NvdecUnavailable, match="no CUDA GPU visible.*transcode.resources.num_gpus"):
        choose_decoder("nvdec")


def test_auto_falls_back_to_the_cpu_and_says_so_once(no_pynvvideocodec, good_videos, caplog):
    table = plan(str(good_videos["short_15fps_3s.mp4"]), clip_len_s=1.0)
    with caplog.at_level(logging.INFO, logger="udfs.media.nvdec"):
        first = ClipTranscoder(**stage_args("transcode", decode="auto"))
        second = ClipTranscoder(**stage_args("transcode", decode="auto"))  # a task's next batch
        clips = pa.concat_tables(list(second(table))).to_pylist()
    assert first.decoder_choice == second.decoder_choice
    assert first.decoder_choice.as_dict() == {
        "requested": "auto", "decoder": "cpu",
        "why": "NVDEC unusable: PyNvVideoCodec is not installed; decoding on the CPUs"}
    said = [r.getMessage() for r in caplog.records if "transcode decode" in r.getMessage()]
    assert said == ["transcode decode: cpu (NVDEC unusable: PyNvVideoCodec is not installed; decoding on the CPUs)"]
    assert [c["error"] for c in clips] == [None, None, None]


def test_nvdec_clips_equal_the_cpu_path(gpu, good_videos):
    """Frames from the (fake) NVDEC, paced by PyAV's demux with the audio:
    the clips are byte-for-byte those of the CPU decode, previews, motion
    and audio included."""
    fake = gpu()
    table = plan(str(good_videos["hd_30fps_23s.mp4"]))
    gpu_clips = transcode(table, "nvdec")
    cpu_clips = transcode(table, "cpu")
    assert [(c["start_frame"], c["end_frame"]) for c in gpu_clips] == [(0, 300), (300, 600), (600, 690)]
    assert gpu_clips == cpu_clips
    assert all(c["error"] is None and c["has_audio"] and c["preview_webp"] for c in gpu_clips)
    assert [d.served for d in fake.opened] == [690]  # every frame came from the fake NVDEC
    assert nvdec.stats == {"nvdec": 1}


def test_auto_takes_nvdec_where_it_runs(gpu, good_videos):
    gpu()
    stage = ClipTranscoder(**stage_args("transcode", decode="auto"))
    assert stage.decoder_choice.decoder == "nvdec" and "NVIDIA H100" in stage.decoder_choice.why


def test_a_decoder_that_disagrees_at_the_start_sends_the_video_to_the_cpu(gpu, good_videos):
    gpu(pts_shift=1)
    table = plan(str(good_videos["short_15fps_3s.mp4"]), clip_len_s=1.0)
    assert transcode(table, "nvdec") == transcode(table, "cpu")
    assert nvdec.stats == {"cpu": 1}
    (reason,) = nvdec.fallbacks
    assert "NVDEC gave pts 1 for frame 0, the packets say pts 0" in reason


def test_a_decoder_that_loses_a_frame_later_fails_the_clips_instead_of_shifting_them(gpu, good_videos):
    gpu(drop_at=40)
    clips = transcode(plan(str(good_videos["hd_30fps_23s.mp4"])), "nvdec", preview={"enabled": False})
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 300), (300, 600), (600, 690)]
    for clip in clips:
        assert clip["mp4"] is None
        assert clip["error"].startswith("decode failed at frame 40: NvdecError: NVDEC gave pts")
        assert "for frame 40" in clip["error"]


@pytest.mark.parametrize("fail_at, falls_back", [(0, True), (96, False)])
def test_a_decoder_that_raises_costs_the_video_its_nvdec_not_the_batch(gpu, good_videos, fail_at, falls_back):
    """A driver error before any frame is handed on: the CPU decodes the
    video. After: its open clips fail as with any decode error (a
    ValueError recorded on the rows, not an exception that fails the task)."""
    gpu(fail_at=fail_at)
    table = plan(str(good_videos["hd_30fps_23s.mp4"]))
    clips = transcode(table, "nvdec", preview={"enabled": False})
    if falls_back:
        assert [c["error"] for c in clips] == [None, None, None] and nvdec.stats == {"cpu": 1}
        assert "NVDEC failed at frame 0 (RuntimeError: cuvidMapVideoFrame failed" in next(iter(nvdec.fallbacks))
    else:
        for clip in clips:  # frame 96 of a batch of 8 that NVDEC could not deliver
            assert clip["error"] == ("decode failed at frame 96: NvdecError: NVDEC failed at frame 96 (RuntimeError: "
                                     "cuvidMapVideoFrame failed: CUDA_ERROR_LAUNCH_FAILED)")


def test_sources_nvdec_cannot_take_are_decoded_on_the_cpu(gpu, good_videos, tmp_path, caplog):
    """MJPEG (no NVDEC decoder), 4:4:4 and odd sizes go to PyAV, each reason said once."""
    fake = gpu()
    mjpeg = write_video(tmp_path / "mjpeg.mkv", width=96, height=64, fps=12, seconds=2, codec="mjpeg",
                        pix_fmt="yuvj420p")
    odd = str(good_videos["odd_25fps_12s.mp4"])  # 253x141, 4:4:4
    with caplog.at_level(logging.INFO, logger="udfs.media.nvdec"):
        for uri in (str(mjpeg), str(mjpeg), odd):
            table = plan(uri, clip_len_s=1.0)
            assert transcode(table, "nvdec", keep_audio=False) == transcode(table, "cpu", keep_audio=False)
    assert fake.opened == [] and nvdec.stats == {"cpu": 3}
    assert set(nvdec.fallbacks) == {"NVDEC has no mjpeg decoder",
                                    "yuv444p source (NVDEC's output here is 8-bit 4:2:0 limited range)"}
    said = [r.getMessage() for r in caplog.records if "instead of NVDEC" in r.getMessage()]
    assert len(said) == 2  # once per reason, not per video


def test_nv12_to_i420_matches_swscale():
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    yuv = rng.integers(0, 256, (90, 64), dtype=np.uint8)  # 60 rows of Y, then U, then V
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    nv12 = frame.reformat(format="nv12").to_ndarray()
    out = nvdec.nv12_to_i420(torch.from_numpy(nv12[None]), 60, 64).numpy()[0]
    assert (out == yuv).all()
