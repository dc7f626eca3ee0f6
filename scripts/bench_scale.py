"""Runs at scale: time to the first committed clip, wall time and peak memory
of the curate job, with and without periodic commits; a resume after a kill
at 50 % against a clean run; memory against video length and input count.

Every run is the real command (`python -m engine ...`) in a fresh process
with its own local Ray, so times include Ray's start-up and memory is the
whole process tree (driver, raylet, GCS, workers; proportional set size, so
the object store's shared pages count once). Inputs are synthetic
(engine.sample) and generated before any timing.

    .venv/bin/python scripts/bench_scale.py --prepare            # inputs only (shared CPU lock)
    flock -x /tmp/reelsift-cpu.lock .venv/bin/python scripts/bench_scale.py --scenario short
    ... --scenario long | resume | inputs | all;  --json out.json;  --preset medium

Scenarios:
  short   200 videos of 12 s, 320x180: periodic commits (default 60 s)
          against one commit at the end, two alternating runs of each.
  long    720p 24 fps, 5 min and 60 min (twelve copies of a generated 5 min
          segment, remuxed): peak memory against length (`--long-end-only`
          adds the 60 min run without periodic commits).
  resume  the short set, a commit every 16 clip rows or 10 s: a run killed
          (kill -9) once half the videos are committed, then the same command;
          its wall time against a clean run. Videos are committed 8 at a time
          (a writer's batch of 16 clip rows), two batches sometimes together,
          so the kill lands at 104-112 of 200, which flatters; the ratio at
          exactly half is also given, from the cost per video the two runs
          imply ((clean - resume) / videos the kill left done).
  inputs  1,000 and 100,000 inputs (empty files: each becomes an error row
          after the probe): the run completes; driver and total peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORK = REPO / "bench_out" / "scale"
# The encode preset of every run (stated in the report; `--preset`): ultrafast
# keeps the 60-minute 720p run within the machine's time; the commit overhead
# and the memory ratios do not depend on it. The resume ratio does: the less
# work per video, the larger each command's fixed cost (Python imports, Ray's
# start, cold workers) against it, so ultrafast is its hardest case.
PRESET = "ultrafast"
SHORT_N = 200


# ------------------------------------------------------------------ inputs

def short_set() -> Path:
    from engine.sample import write_video

    root = WORK / "inputs" / "short"
    marker = root / ".done"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        for i in range(SHORT_N):
            write_video(root / f"s{i:03d}.mp4", width=320, height=180, fps=24, seconds=12, crf=28)
        marker.touch()
    return root


def concat_copies(segment: Path, out: Path, copies: int) -> Path:
    """`copies` back-to-back copies of `segment` in one file, by remuxing its
    packets with shifted timestamps (no re-encode)."""
    import av

    tmp = out.with_suffix(".part.mp4")
    with av.open(str(segment)) as src, av.open(str(tmp), "w") as dst:
        vin = src.streams.video[0]
        vout = dst.add_stream_from_template(vin)
        span = None
        for copy in range(copies):
            src.seek(0)
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                if span is None:
                    span = int(vin.duration or (vin.frames / vin.average_rate / vin.time_base))
                shift = copy * span
                packet.pts = (packet.pts or 0) + shift
                packet.dts = packet.dts + shift
                packet.stream = vout
                dst.mux(packet)
    tmp.rename(out)
    return out


def long_set() -> tuple[Path, Path]:
    from engine.sample import write_video

    root = WORK / "inputs" / "long"
    root.mkdir(parents=True, exist_ok=True)
    five = root / "five_min" / "720p_5min.mp4"
    sixty = root / "sixty_min" / "720p_60min.mp4"
    if not five.exists():
        five.parent.mkdir(parents=True, exist_ok=True)
        # 24 fps, a scene change every 30 s so the content varies.
        write_video(five, width=1280, height=720, fps=24, scenes=[720] * 10, crf=30, gop=48)
    if not sixty.exists():
        sixty.parent.mkdir(parents=True, exist_ok=True)
        concat_copies(five, sixty, 12)
    return five.parent, sixty.parent


def empty_set(n: int) -> Path:
    root = WORK / "inputs" / f"empty_{n}"
    marker = root / ".done"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / f"e{i:06d}.mp4").touch()
        marker.touch()
    return root


# ------------------------------------------------------------------ measuring

def smaps_rollup_mb(pid: int) -> dict[str, float]:
    """Pss, Pss_Anon, Pss_File and Pss_Shmem of one process, MB (Linux)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def process_label(proc) -> str:
    """A short name: ray::<task or actor>, raylet, gcs_server, the driver..."""
    cmd = proc.cmdline()
    if not cmd:
        return proc.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split(":")[2] if cmd[0].count(":") >= 2 else cmd[0]
    name = os.path.basename(cmd[0])
    if name.startswith("python") and len(cmd) > 1:
        return "python " + " ".join(os.path.basename(c) for c in cmd[1:3])
    return name


def tree_pss_mb(pid: int) -> tuple[float, float, list[dict]]:
    """(whole process tree, the root process alone) proportional set size, MB,
    and each process's share (anonymous memory vs the object store's shared
    pages), largest first."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0, []
    total = own = 0.0
    parts = []
    for proc in procs:
        try:
            mem = smaps_rollup_mb(proc.pid)
            label = process_label(proc)
        except (OSError, psutil.Error):
            continue
        total += mem.get("Pss", 0.0)
        if proc.pid == pid:
            own = mem.get("Pss", 0.0)
        parts.append({"process": label, "pid": proc.pid, "pss_mb": round(mem.get("Pss", 0.0)),
                      "anon_mb": round(mem.get("Pss_Anon", 0.0)), "shmem_mb": round(mem.get("Pss_Shmem", 0.0))})
    parts.sort(key=lambda p: -p["pss_mb"])
    return total, own, parts


def committed(output: Path, table: str) -> int:
    import lance

    try:
        return lance.dataset(str(output / table)).count_rows()
    except (ValueError, OSError):
        return 0


def run_engine(label: str, inputs: Path, output: Path, *overrides: str, kill_at_videos: int | None = None,
               watch_first_clip: bool = True) -> dict:
    """One `python -m engine` run; returns its wall time, time to the first
    committed clip, peak memory and summary (None when killed)."""
    import shutil

    cmd = [sys.executable, "-m", "engine", f"input={inputs}", f"output={output}", f"transcode.preset={PRESET}",
           "ray.num_cpus=2", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=WORK, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(WORK / f"{label}.log", "w"))
    peak: dict = {"total": 0.0, "driver": 0.0, "breakdown": []}
    first_clip = None
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total, own, parts = tree_pss_mb(proc.pid)
            if total > peak["total"]:
                peak["total"], peak["breakdown"] = total, parts
            peak["driver"] = max(peak["driver"], own)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    killed = False
    while proc.poll() is None:
        if watch_first_clip and first_clip is None and committed(output, "clips.lance") > 0:
            first_clip = time.perf_counter() - started
        if kill_at_videos is not None and committed(output, "videos.lance") >= kill_at_videos:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            break
        time.sleep(0.2)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the killed driver's own Ray processes
    except ProcessLookupError:
        pass
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{label} failed, see {WORK / (label + '.log')}")
    summary = None if killed else json.loads((output / "summary.json").read_text())
    result = {
        "label": label, "wall_s": round(wall, 1), "first_clip_s": None if first_clip is None else round(first_clip, 1),
        "peak_mb": round(peak["total"]), "driver_peak_mb": round(peak["driver"]), "killed": killed,
        # Where the memory was at the peak: every process, largest first.
        "peak_breakdown": peak["breakdown"],
    }
    if summary:
        result.update(videos=summary["videos"], clips=summary["clips"], commits=summary["run"]["commits"],
                      skipped=summary["run"]["videos_skipped"], first_commit_s=summary["run"]["first_commit_s"],
                      commit_s=summary["run"].get("commit_s"), stream_s=summary["wall_s"]["pipeline"])
    else:
        result.update(videos_committed=committed(output, "videos.lance"))
    print(json.dumps(result), flush=True)
    if not os.environ.get("KEEP_OUTPUTS") and not killed and label != "resume_killed":
        shutil.rmtree(output, ignore_errors=True)
    return result


def fresh(name: str) -> Path:
    import shutil

    path = WORK / "out" / name
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ scenarios

def scenario_short() -> list[dict]:
    inputs = short_set()
    rows = []
    for rep in range(2):  # alternate, so drift in the machine hits both alike
        rows.append(run_engine(f"short_commit60_{rep}", inputs, fresh("short_a")))
        rows.append(run_engine(f"short_end_only_{rep}", inputs, fresh("short_b"), "write.commit_every_s=null"))
    return rows


def scenario_long(end_only: bool = False) -> list[dict]:
    """A video is committed whole, so one long video is one commit whatever
    `write.commit_every_s` says; the end-only 60 min run (another ~12 min on
    two cores) is there to show that, with `--long-end-only`."""
    five, sixty = long_set()
    rows = [run_engine("long_5min", five, fresh("long_5")),
            run_engine("long_60min_commit60", sixty, fresh("long_60a"))]
    if end_only:
        rows.append(run_engine("long_60min_end_only", sixty, fresh("long_60b"), "write.commit_every_s=null"))
    ratio = round(rows[1]["peak_mb"] / rows[0]["peak_mb"], 3)
    print(json.dumps({"peak_ratio_60_vs_5": ratio}), flush=True)
    return rows


def scenario_resume() -> list[dict]:
    inputs = short_set()
    # A commit every 16 clip rows (8 videos) or 10 s, so the kill lands near
    # half the videos (with the default 60 s a 70 s run has no commit in the
    # middle).
    every = ("write.commit_every_s=10", "write.commit_every_rows=16")
    clean = run_engine("resume_clean", inputs, fresh("resume_clean"), *every)
    out = fresh("resume")
    killed = run_engine("resume_killed", inputs, out, *every, kill_at_videos=SHORT_N // 2, watch_first_clip=False)
    again = run_engine("resume_again", inputs, out, *every, watch_first_clip=False)
    done = again["killed_at_videos"] = killed["videos_committed"]
    again["ratio_to_clean"] = round(again["wall_s"] / clean["wall_s"], 3)
    # Both runs pay the same fixed cost; the clean one did `done` videos more.
    per_video = (clean["wall_s"] - again["wall_s"]) / done
    again["ratio_at_half"] = round((again["wall_s"] + (done - SHORT_N / 2) * per_video) / clean["wall_s"], 3)
    print(json.dumps({"resume_ratio": again["ratio_to_clean"], "killed_at_videos": done,
                      "ratio_at_half": again["ratio_at_half"], "preset": PRESET}), flush=True)
    return [clean, killed, again]


def scenario_inputs() -> list[dict]:
    overrides = ("probe.resources.batch_size=64", "split.resources.batch_size=64", "write.max_videos_in_flight=4096")
    return [run_engine(f"inputs_{n}", empty_set(n), fresh(f"inputs_{n}"), *overrides, watch_first_clip=False)
            for n in (1_000, 100_000)]


SCENARIOS = {"short": scenario_short, "long": scenario_long, "resume": scenario_resume, "inputs": scenario_inputs}


def main() -> None:
    global PRESET
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="generate the inputs and stop")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--json", type=Path, help="append the results here")
    parser.add_argument("--long-end-only", action="store_true",
                        help="long: also the 60 min run without periodic commits")
    parser.add_argument("--preset", default=PRESET, help=f"x264 preset of every run (default {PRESET})")
    args = parser.parse_args()
    PRESET = args.preset
    WORK.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        short_set()
        long_set()
        empty_set(1_000)
        empty_set(100_000)
        return
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = {name: SCENARIOS[name](args.long_end_only) if name == "long" else SCENARIOS[name]()
               for name in names}
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.exists() else {}
        existing.update(results)
        args.json.write_text(json.dumps(existing, indent=1))


if __name__ == "__main__":
    main()
