"""Benchmark clip analysis on CPU.

Measures, on the same synthetic H.264 clips:
- baseline: decode each clip to numpy RGB at 2 fps (native size) with PyAV;
- motion scoring only (ClipAnalysis with motion, no consumers);
- frame extraction only (ClipAnalysis with the default consumers);
- both in one pass (the pipeline's configuration), and the same work done as
  separate passes (one decode for motion + one per consumer) for contrast;
- the size of the transient frame columns per clip (what travels to the
  consumer stages instead of re-decoding there);
- aesthetic scoring images/s with a full-size, randomly initialised
  CLIP ViT-L/14 vision tower + MLP head (weights do not change speed).

    PYTHONPATH=. python scripts/bench_analysis.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.sample import write_video  # noqa: E402
from reelsift_conf import stage_args  # noqa: E402
from udfs.analysis.clip_analysis import ClipAnalysis  # noqa: E402
from udfs.media.video import decode_rgb_bytes  # noqa: E402

CONSUMERS = {
    "aesthetic": {"policy": "sequence", "fps": 1, "size": 224, "crop": True},
    "embed": {"policy": "uniform", "count": 8, "size": 224, "crop": True},
    "caption": {"policy": "sequence", "fps": 2, "size": 448},
}
MOTION = {"mode": "enable", "fps": 2}


def make_clips(directory: Path, count: int, width: int, height: int, fps: int, seconds: float) -> list[bytes]:
    clips = []
    for i in range(count):
        # x264 defaults for GOP/B-frames, like the transcode stage's output.
        path = write_video(directory / f"clip{i}.mp4", width=width, height=height, fps=fps, seconds=seconds,
                           scenes=None, moving=i % 4 != 3, crf=23, gop=250)
        clips.append(path.read_bytes())
    return clips


def timed(fn, clips: list[bytes], min_seconds: float) -> tuple[float, int]:
    """clips/s over at least `min_seconds` (whole passes over the clips)."""
    done, start = 0, time.perf_counter()
    while True:
        for clip in clips:
            fn(clip)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed, done


def table_of(clip: bytes) -> pa.Table:
    return pa.table({"clip_id": ["c"], "mp4": pa.array([clip], pa.large_binary()), "error": pa.array([None], pa.string())})


def bench_decode(args, clips: list[bytes]) -> dict:
    step = round(args.fps / 2)
    def analysis(consumers: dict | None, motion: dict | None) -> ClipAnalysis:
        return ClipAnalysis(**stage_args("frames", consumers=consumers, motion=motion,
                                         decode_threads=args.decode_threads))

    full = analysis(CONSUMERS, MOTION)
    motion_only = analysis(None, MOTION)
    frames_only = analysis(CONSUMERS, None)
    per_consumer = [analysis({k: v}, None) for k, v in CONSUMERS.items()]

    def separate(clip: bytes) -> None:
        motion_only(table_of(clip))
        for stage in per_consumer:
            stage(table_of(clip))

    runs = {
        "baseline_decode_rgb_2fps": lambda c: decode_rgb_bytes(c, step=step),
        "motion_scoring": lambda c: motion_only(table_of(c)),
        "frame_extraction": lambda c: frames_only(table_of(c)),
        "motion_plus_frames_one_pass": lambda c: full(table_of(c)),
        "motion_plus_frames_separate_passes": separate,
    }
    results = {}
    for name, fn in runs.items():
        fn(clips[0])  # warm-up
        rate, n = timed(fn, clips, args.seconds)
        results[name] = {"clips_per_s": round(rate, 2), "clips": n}
        print(f"{name:38s} {rate:8.2f} clips/s  ({n} clips)", flush=True)
    out = full(table_of(clips[0]))
    frame_bytes = sum(out.column(c).nbytes for c in out.column_names if c.endswith(("_frames", "_frame_indices")))
    results["transient_frame_bytes_per_clip"] = int(frame_bytes)
    results["mp4_bytes_per_clip"] = int(np.mean([len(c) for c in clips]))
    print(f"transient frame columns per clip: {frame_bytes / 1e6:.2f} MB (mp4 {results['mp4_bytes_per_clip'] / 1e6:.2f} MB)")
    return results


def bench_aesthetic(args, tmp: Path) -> dict:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from udfs.analysis.aesthetic import AestheticHead, AestheticScorer

    torch.set_num_threads(args.torch_threads)
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
    model_dir, head_path = tmp / "clip-l14", tmp / "head.pth"
    CLIPVisionModelWithProjection(config).save_pretrained(model_dir)
    CLIPImageProcessor().save_pretrained(model_dir)
    torch.save(AestheticHead(768).state_dict(), head_path)
    scorer = AestheticScorer(**stage_args("aesthetic", model=str(model_dir), head=str(head_path),
                                         model_batch_size=args.image_batch, device="cpu"))
    images = np.random.default_rng(0).integers(0, 256, (args.image_batch, 224, 224, 3), dtype=np.uint8)
    scorer.score_frames(images[:1])  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        scorer.score_frames(images)
        done += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds:
            break
    rate = done / elapsed
    print(f"aesthetic ViT-L/14 fp32 CPU ({args.torch_threads} threads, batch {args.image_batch}): {rate:.2f} images/s")
    return {"aesthetic_images_per_s": round(rate, 3), "images": done, "torch_threads": args.torch_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run: 4 short 360p clips, 2 s per measurement")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum wall time per measurement")
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--skip-aesthetic", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="only the aesthetic measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.width, args.height, args.clip_seconds, args.seconds = 4, 640, 360, 2.0, 2.0
        args.image_batch, args.torch_threads = 2, 1
    results: dict = {"setup": {k: str(v) for k, v in vars(args).items() if k != "json"}}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_decode:
            clips = make_clips(tmp, args.clips, args.width, args.height, args.fps, args.clip_seconds)
            print(f"{len(clips)} clips {args.width}x{args.height} {args.fps} fps {args.clip_seconds:g} s, "
                  f"decode_threads={args.decode_threads}")
            results.update(bench_decode(args, clips))
        if not args.skip_aesthetic:
            results.update(bench_aesthetic(args, tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
