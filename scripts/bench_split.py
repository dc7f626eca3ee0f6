"""Whole-pipeline wall time against plain FFmpeg on the same job.

Both sides decode the same 2-minute 720p video once and encode the same
fixed-stride spans with libx264 at the same preset/CRF: FFmpeg as one
process with a segment muxer and keyframes forced at the span starts (the
fastest way FFmpeg itself can do it), reelsift through its Ray Data pipeline
after Ray has started. Prints the ratio and each side's peak memory.

    python scripts/bench_split.py [--seconds 120] [--preset medium] [--crf 23]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class PeakRSS:
    """Peak resident memory of this process and all its descendants (Ray's
    workers are children of the raylet, so it is sampled as well)."""

    def __init__(self, extra_roots: list[int] | None = None, interval: float = 0.1) -> None:
        self.roots = [os.getpid(), *(extra_roots or [])]
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        seen: set[int] = set()
        total = 0
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_ffmpeg(src: Path, out_dir: Path, spans: list[tuple[int, int]], preset: str, crf: int) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    starts = [s for s, _ in spans]
    last_end = spans[-1][1]
    force = "+".join(f"eq(n,{s})" for s in starts)
    cmd = [
        ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
        "-vf", f"trim=end_frame={last_end}", "-an",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-force_key_frames", f"expr:{force}",
        "-f", "segment", "-segment_frames", ",".join(str(s) for s in starts[1:]), "-reset_timestamps", "1",
        str(out_dir / "clip_%04d.mp4"),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--work", default=str(REPO / "bench_out" / "split"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR
    from engine.curate import run
    from engine.ray_session import ensure_ray
    from engine.synth import write_video
    from udfs.split.fixed_stride import fixed_stride_spans

    work = Path(args.work)
    src = work / f"bench_{args.width}x{args.height}_{args.fps}fps_{int(args.seconds)}s.mp4"
    if not src.exists():
        print(f"generating {src} ...", flush=True)
        write_video(src, width=args.width, height=args.height, fps=args.fps, seconds=args.seconds, crf=18)
    num_frames = int(round(args.seconds * args.fps))
    spans = fixed_stride_spans(num_frames, args.fps, clip_len_s=10.0, min_clip_s=2.0)

    def engine_cfg(out: Path, *extra: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=[
                f"input={src}", f"output={out}", "overwrite=true", f"transcode.preset={args.preset}",
                f"transcode.crf={args.crf}", "motion.mode=disable", "ray.progress=false", *extra])

    ensure_ray(engine_cfg(work / "unused").ray)  # Ray start-up is not part of the timing
    import ray

    raylet_pids = [p.pid for p in psutil.process_iter(["name", "cmdline"])
                   if any("raylet" in (c or "") for c in (p.info["cmdline"] or [])[:1])]

    results: dict[str, float] = {}
    with PeakRSS() as ff_mem:
        results["ffmpeg_s"] = run_ffmpeg(src, work / "ffmpeg_clips", spans, args.preset, args.crf)
    results["ffmpeg_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    # The first run in a fresh Ray also pays for Ray warming its worker
    # processes (each imports PyAV, pyarrow, Lance) on the same cores; it is
    # reported on its own, and the comparison uses warm runs.
    runs = (("engine_cold", ["preview.enabled=false"]), ("engine", ["preview.enabled=false"]),
            ("engine_with_previews", []))
    for label, extra in runs:
        with PeakRSS(raylet_pids) as mem:
            t0 = time.perf_counter()
            summary = run(engine_cfg(work / label, *extra))
            results[f"{label}_s"] = time.perf_counter() - t0
        results[f"{label}_transcode_busy_s"] = summary["stages"]["transcode"]["busy_s"]
        results[f"{label}_peak_rss_mb"] = mem.peak / 2**20
        assert summary["clips"] == len(spans), summary
    ray.shutdown()

    ff_bytes = sum(p.stat().st_size for p in (work / "ffmpeg_clips").glob("*.mp4"))
    results["ffmpeg_clip_mb"] = ff_bytes / 2**20
    results["engine_clip_mb"] = summary["clip_bytes"] / 2**20
    results["ratio"] = results["engine_s"] / results["ffmpeg_s"]
    results["ratio_with_previews"] = results["engine_with_previews_s"] / results["ffmpeg_s"]
    results["ratio_transcode_stage"] = results["engine_transcode_busy_s"] / results["ffmpeg_s"]
    results["ratio_cold"] = results["engine_cold_s"] / results["ffmpeg_s"]

    print(f"\n{args.seconds:.0f} s {args.width}x{args.height}@{args.fps} -> {len(spans)} clips, "
          f"libx264 preset={args.preset} crf={args.crf}, {os.cpu_count()} cores")
    print(f"{'':28s}{'wall s':>9s}{'peak RSS MB':>13s}{'ratio':>8s}")
    print(f"{'ffmpeg (one process)':28s}{results['ffmpeg_s']:9.1f}{results['ffmpeg_peak_rss_mb']:13.0f}{1:8.2f}")
    print(f"{'reelsift, first run (cold)':28s}{results['engine_cold_s']:9.1f}"
          f"{results['engine_cold_peak_rss_mb']:13.0f}{results['ratio_cold']:8.2f}")
    print(f"{'reelsift, no previews':28s}{results['engine_s']:9.1f}{results['engine_peak_rss_mb']:13.0f}"
          f"{results['ratio']:8.2f}")
    print(f"{'reelsift, with previews':28s}{results['engine_with_previews_s']:9.1f}"
          f"{results['engine_with_previews_peak_rss_mb']:13.0f}{results['ratio_with_previews']:8.2f}")
    print(f"transcode stage busy time alone (warm, no previews): {results['engine_transcode_busy_s']:.1f} s "
          f"({results['ratio_transcode_stage']:.2f}x ffmpeg); output MB ffmpeg {results['ffmpeg_clip_mb']:.1f} "
          f"vs reelsift {results['engine_clip_mb']:.1f}")
    print("peak RSS for reelsift covers the driver and every Ray process (raylet, GCS, workers).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
