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
                                  [--crf 23] [--cli] [--quality] [--repeat N] [--json results.json]

`--quality` runs the default config with the quality signals off, with the
cheap ones only (all but text) and with all of them (text included), and prints each one's
wall and CPU time against the first.

Time it alone on the machine (`flock -x /tmp/reelsift-cpu.lock ...` here).
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

# reelsift overrides per engine configuration.
QUALITY_BLOCKS = ("text", "borders", "sharpness", "exposure", "camera", "cuts")
CONFIGS = {
    "default": [],
    "bare": ["motion.mode=disable", "preview.enabled=false"],
    # The default run as it was before the quality signals, and with the cheap ones only.
    "no_quality": [f"quality.{b}.enabled=false" for b in QUALITY_BLOCKS],
    "cheap_quality": [*(f"quality.{b}.enabled=true" for b in QUALITY_BLOCKS[1:]), "quality.text.enabled=false"],
    "all_quality": [f"quality.{b}.enabled=true" for b in QUALITY_BLOCKS],
}
# --quality: what the quality signals cost, each config against no_quality.
QUALITY_CONFIGS = ["no_quality", "cheap_quality", "all_quality"]
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
    extra process trees (Ray's workers are children of the raylet), and the
    CPU seconds they used while it ran (`cpu_s`).

    CPU seconds are what the quality-cost ratios compare: on a machine
    shared with other work, wall time moves with the neighbours' load and
    CPU time much less. A process that ends between two reads loses its
    last `interval` of CPU from the count.

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
        # pid -> (CPU seconds when first seen inside the window, last read)
        self._cpu: dict[int, tuple[float, float]] = {}
        self._before: set[int] = set()
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
        for pid, proc in self._procs.items():
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            # A process that was there before the window counts from then; a new one from its start.
            base = self._cpu[pid][0] if pid in self._cpu else (used if pid in self._before else 0.0)
            self._cpu[pid] = (base, used)
        return total

    @property
    def cpu_s(self) -> float:
        return sum(last - base for base, last in self._cpu.values())

    def _run(self) -> None:
        walked = 0.0
        while not self._stop.is_set():
            if time.monotonic() - walked >= self.refresh:
                self._walk()
                walked = time.monotonic()
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._walk()
        self._before = set(self._procs)
        self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._total()


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
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for cmd in jobs:
        proc = subprocess.Popen(cmd)
        with PeakRSS([proc.pid], children_only=True, interval=0.02) as mem:
            if proc.wait() != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd)
        peak = max(peak, mem.peak)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    clips = list(out_dir.glob("*.mp4"))
    return {"wall_s": wall, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "peak_rss_mb": peak / 2**20, "clips": len(clips),
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
    return {"wall_s": wall, "cpu_s": mem.cpu_s, "peak_rss_mb": mem.peak / 2**20, "clips": summary["clips"],
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
    return {"wall_s": wall, "cpu_s": mem.cpu_s, "peak_rss_mb": mem.peak / 2**20, "clips": summary["clips"],
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
    parser.add_argument("--quality", action="store_true",
                        help=f"what the quality signals cost: configs {' '.join(QUALITY_CONFIGS)}, each against "
                             "no_quality (the default run without them)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each reelsift config, interleaved; the fastest wall and CPU are kept")
    parser.add_argument("--short-count", type=int, default=60)
    parser.add_argument("--cli", action="store_true",
                        help="also time the default config as a whole `python -m engine` command")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every reelsift run (e.g. transcode.threads=2)")
    parser.add_argument("--work", default=str(REPO / "bench_out" / "split"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quality:
        args.configs = QUALITY_CONFIGS

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
            fastest: dict[str, dict] = {}
            for _ in range(args.repeat):  # interleaved, so a burst of load hits every config alike
                for config in args.configs:
                    overrides = engine_overrides(inputs[name], work / f"out_{name}", preset, args.crf,
                                                 [*CONFIGS[config], *args.override])
                    res = run_engine(overrides, raylet_pids)
                    assert res["clips"] == expected_clips[name] and not res["clips_failed"], res
                    print(f"{name:6s} {preset:9s} reelsift {config:14s}{res['wall_s']:7.1f} s  "
                          f"cpu {res['cpu_s']:6.1f} s  stages {res['stages']}", flush=True)
                    best = fastest.setdefault(config, res)
                    best["wall_s"], best["cpu_s"] = min(best["wall_s"], res["wall_s"]), min(best["cpu_s"], res["cpu_s"])
            for config in args.configs:
                res = fastest[config]
                res["ratio"] = res["wall_s"] / ff["wall_s"]
                runs.append({"workload": name, "preset": preset, "run": f"reelsift {config}", "config": config,
                             **res})
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
    print("| workload | preset | run | wall s | ratio to FFmpeg | CPU s | output MB | peak RSS MB | stage busy s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in runs:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items())
        print(f"| {r['workload']} | {r['preset']} | {r['run']} | {r['wall_s']:.1f} | {r['ratio']:.2f} | "
              f"{r.get('cpu_s', float('nan')):.1f} | {r['clip_mb']:.1f} | {r['peak_rss_mb']:.0f} | {stages} |")
    print("peak RSS for reelsift covers the driver and every Ray process (raylet, GCS, workers).")
    if args.quality:
        print(f"\nWhat the quality signals cost, against the default run without them (fastest of {args.repeat}; "
              "CPU: driver and every Ray process):")
        print("| workload | preset | signals | wall s | wall ratio | CPU s | CPU ratio |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in runs:
            if r.get("config") not in QUALITY_CONFIGS:
                continue
            base = next(b for b in runs if b.get("config") == "no_quality" and b["workload"] == r["workload"]
                        and b["preset"] == r["preset"])
            r["quality_wall_ratio"], r["quality_cpu_ratio"] = r["wall_s"] / base["wall_s"], r["cpu_s"] / base["cpu_s"]
            label = {"no_quality": "none", "cheap_quality": "cheap (all but text)", "all_quality": "all"}
            print(f"| {r['workload']} | {r['preset']} | {label[r['config']]} | {r['wall_s']:.1f} | "
                  f"{r['quality_wall_ratio']:.3f} | {r['cpu_s']:.1f} | {r['quality_cpu_ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
