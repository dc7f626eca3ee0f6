"""The curate job's wall time against plain FFmpeg doing the same decode +
libx264 encode, on two workloads, in one run:

- `long`:  one 120 s 1280x720 30 fps video (no audio) cut into twelve 10 s
  clips. FFmpeg: one process, one decode, the same spans through the segment
  muxer with keyframes forced at each span start (the fastest way FFmpeg
  itself can do it).
- `short`: 60 videos of 8 s at 640x360 30 fps with AAC audio, one clip each.
  FFmpeg: a loop of one process per file (video and audio re-encoded), which
  is what a user scripting FFmpeg over a folder runs.

reelsift runs each workload twice: with the default config (WebP previews
and motion scores on) and bare (`motion.mode=disable preview.enabled=false`),
both at the same preset and CRF as FFmpeg. Ray starts once before the timed
runs (its start-up is reported on its own); the first engine run of the
session warms Ray's worker processes on a small input and is reported as
"cold" (it runs on eight short videos). With `--cli`, the default config also runs as a whole command
(`python -m engine ...` in a fresh process: imports, Ray start, the job),
which is what a user times with `time`.

    python scripts/bench_split.py [--workloads long short] [--presets medium veryfast]
                                  [--crf 23] [--cli] [--json results.json]

Time it alone on the machine (`flock -x /tmp/reelsift-cpu.lock ...` here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# reelsift overrides per engine configuration.
CONFIGS = {
    "default": [],
    "bare": ["motion.mode=disable", "preview.enabled=false"],
}
WORKLOADS = ("long", "short")
# Videos of the first (cold) run, which starts Ray's worker processes.
WARM_VIDEOS = 8


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class PeakRSS:
    """Peak resident memory of this process and all its descendants, plus
    extra process trees (Ray's workers are children of the raylet).

    The monitor runs beside what it measures, so it is kept cheap: the
    process trees are walked (a scan of every /proc entry) once per `refresh`
    seconds, and in between only the known processes' RSS is read. Walking
    them every 0.1 s cost the engine runs ~1 s of CPU per minute."""

    def __init__(self, extra_roots: list[int] | None = None, interval: float = 0.1,
                 children_only: bool = False, refresh: float = 1.0) -> None:
        # children_only: just the extra roots and their descendants (one FFmpeg process), not this one.
        self.roots = [*([] if children_only else [os.getpid()]), *(extra_roots or [])]
        self.interval = interval
        self.refresh = refresh
        self.peak = 0
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _walk(self) -> None:
        procs: dict[int, psutil.Process] = {}
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    procs.setdefault(proc.pid, proc)
            except psutil.Error:
                continue
        self._procs = procs

    def _total(self) -> int:
        total = 0
        for proc in self._procs.values():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        walked = 0.0
        while not self._stop.is_set():
            if time.monotonic() - walked >= self.refresh:
                self._walk()
                walked = time.monotonic()
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ inputs
def long_input(work: Path) -> list[Path]:
    from engine.sample import write_video

    src = work / "long" / "long_1280x720_30fps_120s.mp4"
    if not src.exists():
        print(f"generating {src} ...", flush=True)
        write_video(src, width=1280, height=720, fps=30, seconds=120, crf=18)
    return [src]


def short_inputs(work: Path, count: int = 60) -> list[Path]:
    from engine.sample import write_video

    folder = work / "short"
    paths = []
    for i in range(count):
        path = folder / f"short_{i:03d}.mp4"
        if not path.exists():
            if i == 0:
                print(f"generating {count} short videos in {folder} ...", flush=True)
            # A hard cut at a different place in each file, so no two are alike.
            cut = 60 + (i * 7) % 120
            write_video(path, width=640, height=360, fps=30, scenes=[cut, 240 - cut], audio=True, crf=18)
        paths.append(path)
    return paths


def spans_of(path: Path) -> tuple[list[tuple[int, int]], float, bool]:
    """The default config's fixed-stride spans, the frame rate and whether
    the file has audio (from the same probe the engine runs)."""
    from udfs.media.probe import probe_video
    from udfs.split.fixed_stride import fixed_stride_spans

    row = probe_video(str(path))
    spans = fixed_stride_spans(row["num_frames"], row["fps"], clip_len_s=10.0, min_clip_s=2.0)
    return spans, row["fps"], bool(row["has_audio"])


# ------------------------------------------------------------------ FFmpeg
def ffmpeg_command(src: Path, out_dir: Path, spans: list[tuple[int, int]], fps: float, audio: bool, preset: str,
                   crf: int) -> list[str]:
    """One FFmpeg process: decode once, encode the spans (back to back, from
    frame 0) with libx264 (+ AAC), one mp4 per span."""
    last_end = spans[-1][1]
    cmd = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
           "-vf", f"trim=end_frame={last_end}",
           "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
    cmd += ["-af", f"atrim=end={last_end / fps:.6f}", "-c:a", "aac"] if audio else ["-an"]
    if len(spans) == 1:
        return cmd + [str(out_dir / f"{src.stem}_0000.mp4")]
    starts = [s for s, _ in spans]
    force = "+".join(f"eq(n,{s})" for s in starts)
    return cmd + ["-force_key_frames", f"expr:{force}", "-f", "segment",
                  "-segment_frames", ",".join(str(s) for s in starts[1:]), "-reset_timestamps", "1",
                  str(out_dir / f"{src.stem}_%04d.mp4")]


def run_ffmpeg(jobs: list[list[str]], out_dir: Path) -> dict[str, float]:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    peak = 0
    t0 = time.perf_counter()
    for cmd in jobs:
        proc = subprocess.Popen(cmd)
        with PeakRSS([proc.pid], children_only=True, interval=0.02) as mem:
            if proc.wait() != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd)
        peak = max(peak, mem.peak)
    wall = time.perf_counter() - t0
    clips = list(out_dir.glob("*.mp4"))
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "clips": len(clips),
            "clip_mb": sum(p.stat().st_size for p in clips) / 2**20}


# ------------------------------------------------------------------ reelsift
def engine_overrides(inputs: list[Path], out: Path, preset: str, crf: int, extra: list[str]) -> list[str]:
    source = str(inputs[0])
    if len(inputs) > 1:  # a JSON file list, one of the input forms the engine takes
        listing = out.parent / f"{out.name}_inputs.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps([str(p.resolve()) for p in inputs]))
        source = str(listing)
    return [f"input={source}", f"output={out}", "overwrite=true", f"transcode.preset={preset}",
            f"transcode.crf={crf}", *extra]


def default_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_engine(overrides: list[str], raylet_pids: list[int]) -> dict[str, float]:
    from engine.curate.task import run

    cfg = default_config(overrides)
    with PeakRSS(raylet_pids) as mem:
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
    stages = {name: round(s["busy_s"], 2) for name, s in summary["stages"].items()}
    return {"wall_s": wall, "peak_rss_mb": mem.peak / 2**20, "clips": summary["clips"],
            "clips_failed": summary["clips_failed"], "clip_mb": summary["clip_bytes"] / 2**20,
            "pipeline_s": summary["wall_s"]["pipeline"], "stages": stages}


def run_engine_cli(overrides: list[str]) -> dict[str, float]:
    """The whole command in a fresh interpreter, as a user runs it."""
    cmd = [sys.executable, "-m", "engine", *overrides]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        wall = time.perf_counter() - t0
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output=")))
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": mem.peak / 2**20, "clips": summary["clips"],
            "clips_failed": summary["clips_failed"], "clip_mb": summary["clip_bytes"] / 2**20,
            "pipeline_s": summary["wall_s"]["pipeline"],
            "stages": {name: round(s["busy_s"], 2) for name, s in summary["stages"].items()}}


def raylet_process_ids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("raylet" in (c or "") for c in (p.info["cmdline"] or [])[:1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--presets", nargs="+", default=["medium", "veryfast"])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["default", "bare"])
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--short-count", type=int, default=60)
    parser.add_argument("--cli", action="store_true",
                        help="also time the default config as a whole `python -m engine` command")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every reelsift run (e.g. transcode.threads=2)")
    parser.add_argument("--work", default=str(REPO / "bench_out" / "split"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(args.work)
    inputs = {"long": long_input(work) if "long" in args.workloads else [],
              "short": short_inputs(work, args.short_count) if "short" in args.workloads else []}
    plans = {name: [spans_of(p) for p in paths] for name, paths in inputs.items()}
    expected_clips = {name: sum(len(s) for s, _, _ in plan) for name, plan in plans.items()}

    from engine.runtime.ray_session import ensure_ray
    from omegaconf import OmegaConf

    t0 = time.perf_counter()
    ensure_ray(default_config([]).ray)
    results: dict[str, object] = {"ray_start_s": time.perf_counter() - t0, "cores": os.cpu_count(), "runs": []}
    raylet_pids = raylet_process_ids()

    # The first run in a fresh Ray also pays for starting its worker
    # processes (each imports Ray Data, pandas, PyAV, pyarrow and Lance:
    # ~2.4 s of CPU): reported alone, and `--cli` times a whole cold command.
    # Eight videos, not one, so that it starts as many workers as a stream of
    # many videos keeps busy at once (reads waiting for admission, probe,
    # split, transcode, writers); with one, the first many-video run below
    # still started four more (~4 s on two cores).
    cold = run_engine(engine_overrides(short_inputs(work, WARM_VIDEOS), work / "out_cold", args.presets[0], args.crf,
                                       args.override), raylet_pids)
    results["cold_run"] = cold

    runs: list[dict] = results["runs"]  # type: ignore[assignment]
    for preset in args.presets:
        for name in args.workloads:
            jobs = [ffmpeg_command(p, work / "ffmpeg_clips", spans, fps, audio, preset, args.crf)
                    for p, (spans, fps, audio) in zip(inputs[name], plans[name])]
            ff = run_ffmpeg(jobs, work / "ffmpeg_clips")
            assert ff["clips"] == expected_clips[name], (ff, expected_clips[name])
            runs.append({"workload": name, "preset": preset, "run": "ffmpeg", **ff, "ratio": 1.0})
            print(f"{name:6s} {preset:9s} ffmpeg           {ff['wall_s']:7.1f} s", flush=True)
            for config in args.configs:
                overrides = engine_overrides(inputs[name], work / f"out_{name}", preset, args.crf,
                                             [*CONFIGS[config], *args.override])
                res = run_engine(overrides, raylet_pids)
                assert res["clips"] == expected_clips[name] and not res["clips_failed"], res
                res["ratio"] = res["wall_s"] / ff["wall_s"]
                runs.append({"workload": name, "preset": preset, "run": f"reelsift {config}", **res})
                print(f"{name:6s} {preset:9s} reelsift {config:8s}{res['wall_s']:7.1f} s  {res['ratio']:.2f}x  "
                      f"stages {res['stages']}", flush=True)
            if args.cli and preset == args.presets[0]:
                overrides = engine_overrides(inputs[name], work / f"out_cli_{name}", preset, args.crf, args.override)
                res = run_engine_cli(overrides)
                res["ratio"] = res["wall_s"] / ff["wall_s"]
                runs.append({"workload": name, "preset": preset, "run": "reelsift default, whole command", **res})
                print(f"{name:6s} {preset:9s} whole command    {res['wall_s']:7.1f} s  {res['ratio']:.2f}x",
                      flush=True)

    import ray

    ray.shutdown()
    if args.override:
        print(f"\noverrides for every reelsift run: {' '.join(args.override)}")
    print(f"\nRay start-up (not in the runs below): {results['ray_start_s']:.1f} s; first (cold) engine run on {WARM_VIDEOS} "
          f"short videos: {cold['wall_s']:.1f} s; {os.cpu_count()} cores; libx264 crf={args.crf}")
    print("| workload | preset | run | wall s | ratio to FFmpeg | output MB | peak RSS MB | stage busy s |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in runs:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items())
        print(f"| {r['workload']} | {r['preset']} | {r['run']} | {r['wall_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['clip_mb']:.1f} | {r['peak_rss_mb']:.0f} | {stages} |")
    print("peak RSS for reelsift covers the driver and every Ray process (raylet, GCS, workers).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
