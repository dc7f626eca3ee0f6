"""Benchmark the model stages against the same model called in a plain loop.

    PYTHONPATH=. python scripts/bench_models.py --quick          # brief CPU run
    PYTHONPATH=. python scripts/bench_models.py                   # full CPU run (+ GPU section on CUDA)

Weights cannot be downloaded here, so models are full-size architectures
with random weights (udfs/models/tiny.py), saved and loaded through the
stages' own loading code. Each measurement runs our stage on an Arrow batch
(unpacking frames, windowing, bucketing, writing columns) and the *same
model object* driven directly in a plain Python loop on the same frames, and
reports throughput plus the overhead ratio ours/plain (aim: <= 1.1).

CPU section: CLIP ViT-B/32-sized embedder (clips/s) and a Qwen2.5-VL-style
captioner (generated tokens/s) at a size chosen by --caption-size.
GPU section (only when CUDA is present): a CLIP model with a ViT-g/14-sized
vision tower (Cosmos-Embed1's EVA-ViT-G backbone size; Cosmos-Embed1's own
remote code cannot be built without its checkpoint), a Qwen2.5-VL-7B-sized
captioner vs a plain generate loop, and vLLM offline throughput if vLLM is
installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

# Run as a script, the repo root is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reelsift_conf import stage_args
from udfs.schema import frame_fields  # noqa: E402
from engine.sample import write_video
from udfs.models.tiny import build_clip, build_qwen2_5_vl
from udfs.models.caption import CaptionStage, Window, window_spans
from udfs.models.embed import ClipEmbedStage, l2_normalize, _features
from udfs.media.video import decode_rgb, pack_frames

# Qwen2.5-VL-style presets: (text hidden, layers, heads, kv heads, intermediate,
# vision hidden, vision depth, vision heads, vision intermediate).
CAPTION_SIZES = {
    "tiny": (64, 2, 4, 2, 128, 32, 1, 2, 64),
    "small": (256, 4, 4, 2, 1024, 256, 4, 4, 1024),
    "0.5b": (896, 24, 14, 2, 4864, 640, 8, 10, 2560),  # Qwen2.5-0.5B text tower, reduced vision tower
    "3b": (2048, 36, 16, 2, 11008, 1280, 32, 16, 3420),  # Qwen2.5-VL-3B
    "7b": (3584, 28, 28, 4, 18944, 1280, 32, 16, 3420),  # Qwen2.5-VL-7B
}

VIT_B32 = dict(vision_hidden=768, text_hidden=512, layers=12, heads=12, text_heads=8, image_size=224, patch_size=32,
               projection_dim=512, vocab_size=2000, max_text_len=77)


def _once(fn: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(ours: Callable[[], Any], plain: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall times of ours and plain, run alternately so load from other
    processes on a shared machine hits both alike (after the caller's warm-up)."""
    t_ours, t_plain = [], []
    for i in range(repeats):
        first, second = (ours, plain) if i % 2 == 0 else (plain, ours)
        a, b = _once(first), _once(second)
        t_ours.append(a if first is ours else b)
        t_plain.append(b if first is ours else a)
    return statistics.median(t_ours), statistics.median(t_plain)


def synthetic_frames(workdir: Path, num_frames: int, width: int, height: int) -> np.ndarray:
    path = write_video(workdir / f"bench_{width}x{height}_{num_frames}.mp4", width=width, height=height, fps=30,
                       scenes=[num_frames // 2, num_frames - num_frames // 2])
    return decode_rgb(str(path), width, height)


def frames_table(consumer: str, clips: list[tuple[np.ndarray, list[int]]], num_frames: int) -> pa.Table:
    rows = []
    f_col, i_col, hw_col = (f.name for f in frame_fields(consumer))
    for k, (frames, indices) in enumerate(clips):
        packed, idx, hw = pack_frames(frames, indices)
        rows.append({"clip_id": str(k), "num_frames": num_frames, "fps": 30.0, "error": None,
                     f_col: packed, i_col: idx, hw_col: hw})
    schema = pa.schema([pa.field("clip_id", pa.string()), pa.field("num_frames", pa.int64()),
                        pa.field("fps", pa.float64()), pa.field("error", pa.string())] + frame_fields(consumer))
    return pa.Table.from_pylist(rows, schema=schema)


# ---------------------------------------------------------------- embedding
def bench_embed(workdir: Path, *, device: str, clip_kwargs: dict, size: int, num_clips: int, batch: int,
                repeats: int, label: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = build_clip(workdir / f"clip_{label}", **clip_kwargs)
    build_s = time.perf_counter() - t0
    stage = ClipEmbedStage(model=model_dir, device=device, dtype="auto", frames={"count": 8}, frame_batch_size=64,
                           skip_filtered=False, revision=None)
    emb = stage.embedder
    source = synthetic_frames(workdir, 64, size, size)
    clips = [(source[(k * 7 + np.arange(8) * 8) % len(source)], list(range(0, 64, 8))) for k in range(num_clips)]
    table = frames_table("embed", clips, 64)
    batches = [table.slice(s, batch) for s in range(0, table.num_rows, batch)]

    def ours() -> None:
        for b in batches:
            stage(b)

    @torch.inference_mode()
    def plain() -> None:
        # The model alone: preprocess each batch's frames, one forward, mean per clip.
        for s in range(0, len(clips), batch):
            group = [c for c, _ in clips[s : s + batch]]
            frames = [f for c in group for f in c]
            px = emb.processor(images=frames, return_tensors="pt")["pixel_values"].to(emb.device, emb.dtype)
            feats = l2_normalize(_features(emb.model.get_image_features(pixel_values=px)).float().cpu().numpy())
            l2_normalize(feats.reshape(len(group), -1, feats.shape[-1]).mean(axis=1))

    ours(), plain()  # warm-up
    t_ours, t_plain = compare(ours, plain, repeats)
    return {"bench": f"embed[{label}]", "device": device, "dtype": str(emb.dtype), "clips": num_clips,
            "frames_per_clip": 8, "size": size, "build_s": round(build_s, 1),
            "ours_clips_per_s": round(num_clips / t_ours, 2), "plain_clips_per_s": round(num_clips / t_plain, 2),
            "overhead_ratio": round(t_ours / t_plain, 3)}


# ------------------------------------------------------------------ caption
def bench_caption(workdir: Path, *, device: str, preset: str, num_clips: int, clip_frames: int, size: int,
                  max_new_tokens: int, batch: int, repeats: int, vllm: bool) -> list[dict[str, Any]]:
    h, layers, heads, kv, inter, vh, vd, vheads, vinter = CAPTION_SIZES[preset]
    t0 = time.perf_counter()
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model_dir = build_qwen2_5_vl(
            workdir / f"qwen_vl_{preset}", hidden=h, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
            vision_hidden=vh, vision_depth=vd, vision_heads=vheads, vision_intermediate=vinter, vocab_size=2000,
            min_pixels=4 * 28 * 28, max_pixels=size * size,
            dtype=torch.bfloat16 if device.startswith("cuda") else None,
        )
    build_s = time.perf_counter() - t0
    stage = CaptionStage(**stage_args("caption", "qwen_vl", model=model_dir, device=device, temperature=0.0,
                                      max_new_tokens=max_new_tokens, batch_size=batch))
    cap = stage.captioner
    source = synthetic_frames(workdir, clip_frames, size, size)
    indices = list(range(0, clip_frames, 15))  # 2 fps at 30 fps, as frame extraction delivers
    clips = [(source[indices], indices) for _ in range(num_clips)]
    table = frames_table("caption", clips, clip_frames)
    spans = window_spans(clip_frames)

    def ours() -> int:
        before = stage.generated_tokens
        stage(table)
        return stage.generated_tokens - before

    @torch.inference_mode()
    def plain() -> int:
        # The same model and preprocessing, windows in order, fixed-size batches.
        windows = []
        for frames, idx in clips:
            idx_arr = np.asarray(idx)
            for a, b in spans:
                sel = (idx_arr >= a) & (idx_arr < b)
                windows.append(Window(0, a, b, frames[sel], 2.0))
        tokens = 0
        for s in range(0, len(windows), batch):
            cap.generate(stage.prompt, windows[s : s + batch], max_new_tokens=max_new_tokens, temperature=0.0,
                         top_p=1.0, seed=0)
            tokens += cap.last_generated_tokens
        return tokens

    tokens_ours, tokens_plain = ours(), plain()  # warm-up, and the token counts
    t_ours, t_plain = compare(ours, plain, repeats)
    n_windows = num_clips * len(spans)
    results = [{"bench": f"caption[{preset}]", "device": device, "dtype": str(cap.dtype), "clips": num_clips,
                "windows": n_windows, "frames_per_window": len(indices) // len(spans), "size": size,
                "max_new_tokens": max_new_tokens, "batch": batch, "build_s": round(build_s, 1),
                "ours_tokens_per_s": round(tokens_ours / t_ours, 1),
                "plain_tokens_per_s": round(tokens_plain / t_plain, 1),
                "ours_windows_per_s": round(n_windows / t_ours, 3),
                "overhead_ratio": round((t_ours / max(tokens_ours, 1)) / (t_plain / max(tokens_plain, 1)), 3)}]
    if vllm:
        results.append(bench_vllm(model_dir, clips, spans, stage.prompt, max_new_tokens, preset))
    return results


def bench_vllm(model_dir: str, clips, spans, prompt: str, max_new_tokens: int, preset: str) -> dict[str, Any]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"bench": f"caption_vllm[{preset}]", "skipped": "vllm not installed"}
    from udfs.models.caption import QwenVLVllmCaptioner

    captioner = QwenVLVllmCaptioner(model_dir, dtype="bfloat16")
    windows = []
    for frames, idx in clips:
        idx_arr = np.asarray(idx)
        for a, b in spans:
            windows.append(Window(0, a, b, frames[(idx_arr >= a) & (idx_arr < b)], 2.0))
    captioner.generate(prompt, windows[:1], max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    t0 = time.perf_counter()
    captioner.generate(prompt, windows, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    elapsed = time.perf_counter() - t0
    return {"bench": f"caption_vllm[{preset}]", "windows": len(windows),
            "tokens_per_s": round(captioner.last_generated_tokens / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few clips, small caption model, 1 repeat")
    parser.add_argument("--only", choices=["embed", "caption"], default=None)
    parser.add_argument("--caption-size", choices=sorted(CAPTION_SIZES), default=None,
                        help="CPU caption model size (default: small with --quick, 0.5b otherwise)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even if CUDA is present")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per side, alternating ours/plain (default 2 quick, 5/4 full)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        work = Path(tmp)
        if args.only in (None, "embed"):
            results.append(bench_embed(work, device="cpu", clip_kwargs=VIT_B32, size=224,
                                       num_clips=8 if quick else 64, batch=8 if quick else 32,
                                       repeats=args.repeats or (2 if quick else 5), label="vit-b32"))
            print(json.dumps(results[-1]), flush=True)
        if args.only in (None, "caption"):
            preset = args.caption_size or ("small" if quick else "0.5b")
            results += bench_caption(work, device="cpu", preset=preset, num_clips=2 if quick else 4,
                                     clip_frames=512, size=224 if quick else 336,
                                     max_new_tokens=16 if quick else 64, batch=4,
                                     repeats=args.repeats or (2 if quick else 4),
                                     vllm=False)
            print(json.dumps(results[-1]), flush=True)
        if torch.cuda.is_available() and not args.no_gpu:
            if args.only in (None, "embed"):
                vit_g = dict(vision_hidden=1408, text_hidden=1024, layers=40, heads=16, text_heads=16, image_size=224,
                             patch_size=14, projection_dim=768, vocab_size=2000, max_text_len=77)
                results.append(bench_embed(work, device="cuda", clip_kwargs=vit_g, size=224,
                                           num_clips=64 if quick else 512, batch=64, repeats=2 if quick else 3,
                                           label="vit-g14"))
                print(json.dumps(results[-1]), flush=True)
            if args.only in (None, "caption"):
                gpu_results = bench_caption(work, device="cuda", preset="small" if quick else "7b",
                                            num_clips=8 if quick else 32, clip_frames=512, size=448,
                                            max_new_tokens=64 if quick else 256, batch=16, repeats=1,
                                            vllm=True)
                results += gpu_results
                for r in gpu_results:
                    print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
