"""Scene-detection throughput and accuracy on one synthetic 720p video with cuts.

Runs, on the same video: plain decode to 48x27 (the floor), TransNetV2
(`TransNetV2Split`), the content detector (`ContentSplit`), and PySceneDetect's
ContentDetector and AdaptiveDetector (benchmark-only dependency: the `bench`
extra, `scenedetect` + `opencv-python-headless`). Reports frames/s, CPU
cores used (process CPU time / wall time), frames/s per core, and F1 of the
detected cuts at tolerances 0/1/2 frames.

    PYTHONPATH=. python scripts/bench_scenes.py --seconds 20      # quick
    PYTHONPATH=. python scripts/bench_scenes.py                   # full 2-minute run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.sample import write_video  # noqa: E402
from reelsift_conf import stage_args
from udfs.split.scene_metrics import match_cuts  # noqa: E402
from udfs.split.scene_rules import cut_frames  # noqa: E402

TOLERANCES = (0, 1, 2)


def make_bench_video(path: Path, seconds: float, fps: int = 30, width: int = 1280, height: int = 720) -> list[int]:
    """Scenes of 1.5-8 s (seeded), hard cuts between them. Returns the cuts."""
    rng = np.random.default_rng(20241124)
    total = int(round(seconds * fps))
    scenes: list[int] = []
    while sum(scenes) < total:
        scenes.append(int(rng.integers(int(1.5 * fps), 8 * fps)))
    scenes[-1] -= sum(scenes) - total
    if len(scenes) > 1 and scenes[-1] < fps:  # fold a stub last scene into the previous one
        stub = scenes.pop()
        scenes[-1] += stub
    cuts = [int(c) for c in np.cumsum(scenes)[:-1]]
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists() and json.loads(meta.read_text()) == cuts):
        write_video(path, width=width, height=height, fps=fps, scenes=scenes)
        meta.write_text(json.dumps(cuts))
    return cuts


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds over all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_split_stage(stage, path: Path, fps: float) -> tuple[list[int], int]:
    import pyarrow as pa

    table = pa.table({"uri": [str(path)], "fps": [fps], "num_frames": pa.array([None], pa.int64()),
                      "error": pa.array([None], pa.string())})
    row = stage(table).to_pylist()[0]
    if row["error"]:
        raise RuntimeError(row["error"])
    return cut_frames(row["transition_probs"], stage.threshold), len(row["transition_probs"])


def pyscenedetect_cuts(path: Path, detector_name: str) -> list[int]:
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, open_video

    video = open_video(str(path))  # OpenCV backend, PySceneDetect's default
    manager = SceneManager()  # auto-downscale on, as a user gets by default
    manager.add_detector(ContentDetector() if detector_name == "ContentDetector" else AdaptiveDetector())
    manager.detect_scenes(video)
    scenes = manager.get_scene_list()
    return [int(start.get_frames()) for start, _ in scenes[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="video length (default 120)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reelsift_bench"))
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: decode transnetv2 content pyscenedetect")
    parser.add_argument("--precision", default="auto", help="TransNetV2 precision (auto|fp32|bf16)")
    parser.add_argument("--device", default="auto", help="TransNetV2 device (auto|cpu|cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from udfs.split.scene_decode import decode_small_cpu
    from udfs.split.scenes import ContentSplit, TransNetV2Split

    path = args.workdir / f"bench_720p_{int(args.seconds)}s.mp4"
    t0 = time.perf_counter()
    cuts = make_bench_video(path, args.seconds)
    # Each method first runs once on a short clip, so one-off costs (lazy
    # imports, codec/thread-pool/oneDNN set-up) stay out of the timings.
    warm = args.workdir / "bench_720p_warmup.mp4"
    make_bench_video(warm, 3.0)
    fps = 30.0
    print(f"video: {path} ({args.seconds:.0f}s, 1280x720@30, {len(cuts)} cuts; ready in {time.perf_counter() - t0:.1f}s)")
    print(f"torch threads: {torch.get_num_threads()}")

    rows: list[dict] = []

    def record(name: str, frames: int, wall: float, cpu: float, detected: list[int] | None) -> None:
        cores = max(cpu / wall, 1e-9)
        row = {"method": name, "frames": frames, "wall_s": round(wall, 3), "fps": round(frames / wall, 1),
               "cores_used": round(cores, 2), "fps_per_core": round(frames / wall / cores, 1)}
        if detected is not None:
            for t in TOLERANCES:
                row[f"f1@{t}"] = round(match_cuts(cuts, detected, t).f1, 3)
        rows.append(row)
        print(json.dumps(row))

    if "decode" not in args.skip:
        # The floors: decode + resize only, with each detector's settings.
        decode_small_cpu(str(warm), 48, 27, threads=1, interpolation="AREA")
        frames, wall, cpu = timed(lambda: decode_small_cpu(str(path), 48, 27, threads=1, interpolation="AREA"))
        record("decode 48x27 AREA (floor)", len(frames), wall, cpu, None)
        frames, wall, cpu = timed(lambda: decode_small_cpu(str(path), 64, 36, threads=1,
                                                           interpolation="FAST_BILINEAR"))
        record("decode 64x36 FAST_BILINEAR", len(frames), wall, cpu, None)
    if "content" not in args.skip:
        stage = ContentSplit(**stage_args("split", "content"))
        run_split_stage(stage, warm, fps)
        (detected, n), wall, cpu = timed(lambda: run_split_stage(stage, path, fps))
        record("content (ours)", n, wall, cpu, detected)
    if "transnetv2" not in args.skip:
        stage = TransNetV2Split(**stage_args("split", "transnetv2", device=args.device, precision=args.precision))
        run_split_stage(stage, warm, fps)
        (detected, n), wall, cpu = timed(lambda: run_split_stage(stage, path, fps))
        record(f"TransNetV2 ({stage.predictor.device.type}, {stage.predictor.autocast_dtype or 'fp32'})",
               n, wall, cpu, detected)
    if "pyscenedetect" not in args.skip:
        n = int(round(args.seconds * fps))  # make_bench_video writes exactly this many
        for name in ("ContentDetector", "AdaptiveDetector"):
            pyscenedetect_cuts(warm, name)
            detected, wall, cpu = timed(lambda: pyscenedetect_cuts(path, name))
            record(f"PySceneDetect {name}", n, wall, cpu, detected)

    print()
    header = ["method", "fps", "cores_used", "fps_per_core", "f1@0", "f1@1", "f1@2"]
    print(" | ".join(f"{h:>14}" if h != "method" else f"{h:<34}" for h in header))
    for row in rows:
        print(" | ".join(f"{str(row.get(h, '-')):>14}" if h != "method" else f"{row[h]:<34}" for h in header))
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "cuts": cuts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
