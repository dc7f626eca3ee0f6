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
          adds the 60 min run without periodic commits). `--split content`
          or `--split transnetv2` runs it with that splitter; `--long-minutes
          2,20` picks other lengths (the short one is generated, the long
          one is copies of it, so the long must be a multiple).
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


LONG_MINUTES = (5, 60)


def long_set(minutes: tuple[int, int] = LONG_MINUTES) -> tuple[Path, Path]:
    from engine.sample import write_video

    short_min, long_min = minutes
    if long_min % short_min:
        raise ValueError(f"the long video ({long_min} min) must be a multiple of the short one ({short_min} min)")
    root = WORK / "inputs" / "long"
    root.mkdir(parents=True, exist_ok=True)
    # The 5/60 pair keeps its original folder names (earlier results name them).
    names = {5: "five_min", 60: "sixty_min"}
    short = root / names.get(short_min, f"{short_min}_min") / f"720p_{short_min}min.mp4"
    long = root / names.get(long_min, f"{long_min}_min") / f"720p_{long_min}min.mp4"
    if not short.exists():
        short.parent.mkdir(parents=True, exist_ok=True)
        # 24 fps, a scene change every 30 s so the content varies (and scene splitters find cuts).
        write_video(short, width=1280, height=720, fps=24, scenes=[720] * (2 * short_min), crf=30, gop=48)
    if not long.exists():
        long.parent.mkdir(parents=True, exist_ok=True)
        concat_copies(short, long, long_min // short_min)
    return short.parent, long.parent


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


def scenario_long(end_only: bool = False, split: str = "fixed_stride",
                  minutes: tuple[int, int] = LONG_MINUTES) -> list[dict]:
    """A video is committed whole, so one long video is one commit whatever
    `write.commit_every_s` says; the end-only 60 min run (another ~12 min on
    two cores) is there to show that, with `--long-end-only`."""
    short, long = long_set(minutes)
    a, b = minutes
    extra = () if split == "fixed_stride" else (f"split={split}",)
    tag = "" if split == "fixed_stride" else f"_{split}"
    rows = [run_engine(f"long{tag}_{a}min", short, fresh(f"long_{a}"), *extra),
            run_engine(f"long{tag}_{b}min_commit60", long, fresh(f"long_{b}a"), *extra)]
    if end_only:
        rows.append(run_engine(f"long{tag}_{b}min_end_only", long, fresh(f"long_{b}b"), *extra,
                               "write.commit_every_s=null"))
    ratio = round(rows[1]["peak_mb"] / rows[0]["peak_mb"], 3)
    print(json.dumps({f"peak_ratio_{b}_vs_{a}": ratio, "split": split}), flush=True)
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


# ------------------------------------------------------------------ table at scale

TABLE_VIDEOS = 100_000
TABLE_CLIPS_PER_VIDEO = 10
TABLE_DIM = 64
TABLE_FILTER = "aesthetic_bucket = 3"


def tiny_clip() -> bytes:
    """A real, decodable 1 s 64x36 H.264 clip (~3 KB): every clip row's media,
    so ClipDataset and the UI read real MP4s without any encoding per row."""
    import tempfile

    from engine.sample import write_video

    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / "tiny.mp4", width=64, height=36, fps=24, num_frames=24, crf=35)
        return path.read_bytes()


def table_schema(out: Path, dim: int):
    """The clip table's schema as curate makes it with the default config,
    plus an embedding column (`dim` floats) so that search has vectors."""
    from hydra import compose, initialize_config_dir

    from engine.cli import CONFIG_DIR
    from engine.curate.plan import plan_stages, table_metadata
    from udfs.schema import clip_embedding_fields
    import pyarrow as pa

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"output={out}"])
    base = plan_stages(cfg).clip_schema()
    # No model made these vectors, so the table records none (search takes them as given).
    schema = pa.schema([*base, *clip_embedding_fields(dim),
                        pa.field("aesthetic_bucket", pa.int32())])  # a 10 %-selective column for filters
    return cfg, schema.with_metadata(table_metadata(cfg, base))


def clip_rows(schema, video_ids: list[str], clips: int, media: bytes, rng, dim: int):
    import numpy as np
    import pyarrow as pa

    from udfs.schema import conform

    n = len(video_ids) * clips
    vid = np.repeat(np.array(video_ids, dtype=object), clips)
    index = np.tile(np.arange(clips, dtype=np.int32), len(video_ids))
    start = index.astype(np.float64) * 10.0
    passed = rng.random(n) < 0.8
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cols = {
        "clip_id": [f"{v}_{i:04d}" for v, i in zip(vid, index)],
        "video_id": vid.tolist(),
        "source_uri": [f"/data/raw/{v}.mp4" for v in vid],
        "clip_index": index,
        "start_s": start, "end_s": start + 10.0,
        "start_frame": (start * 24).astype(np.int64), "end_frame": ((start + 10.0) * 24).astype(np.int64),
        "mp4": pa.array([media] * n, pa.large_binary()),
        "codec": ["h264"] * n, "width": np.full(n, 64, np.int32), "height": np.full(n, 36, np.int32),
        "fps": np.full(n, 24.0), "num_frames": np.full(n, 24, np.int64), "num_bytes": np.full(n, len(media), np.int64),
        "has_audio": np.zeros(n, bool),
        "sharpness": rng.random(n, dtype=np.float32), "brightness": rng.random(n, dtype=np.float32),
        "contrast": rng.random(n, dtype=np.float32),
        "motion_global_mean": rng.random(n, dtype=np.float32),
        "motion_per_patch_min": rng.random(n, dtype=np.float32),
        "camera_motion": rng.choice(["static", "pan", "tilt", "zoom"], n).tolist(),
        "passed": passed, "filter_reason": [None if p else "motion" for p in passed],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "aesthetic_bucket": rng.integers(0, 10, n).astype(np.int32),
    }
    return conform(pa.table(cols), schema)


def video_report(video_id: str, clips: int):
    import pyarrow as pa

    from udfs.schema import VIDEO_SCHEMA, conform

    row = {"video_id": [video_id], "uri": [f"/data/raw/{video_id}.mp4"], "size_bytes": [50_000_000],
           "duration_s": [clips * 10.0], "fps": [24.0], "num_frames": [clips * 240], "width": [1280],
           "height": [720], "codec": ["h264"], "pix_fmt": ["yuv420p"], "has_audio": [False],
           "span_start_frames": [[i * 240 for i in range(clips)]],
           "span_end_frames": [[(i + 1) * 240 for i in range(clips)]]}
    return conform(pa.table(row), VIDEO_SCHEMA)


def build_table(out: Path, videos: int, clips: int, dim: int, commit_videos: int, writers: int = 2) -> dict:
    """`videos` x `clips` clip rows through curate's own commit path: the
    writer UDF (FragmentWriter, `write.resources.batch_size` rows a call, one
    fragment per video a call), the driver's Progress and OutputStore.commit
    every `commit_videos` complete videos, compaction between commits once
    `write.compact_every_fragments` fragments were added, and orphan removal
    and compaction at the end, all with the default config's settings.
    `writers` writer calls run at a time (threads; Lance writes outside the
    GIL), as curate runs one writer task per `write.cpus_per_writer` CPUs,
    at least two."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from engine.curate.commits import OutputStore, Progress
    from engine.store.lance_io import FragmentWriter
    from engine.store.outputs import OutputLayout

    cfg, schema = table_schema(out, dim)
    write = cfg.write
    per_call = int(write.resources.batch_size)
    layout = OutputLayout(str(out))
    store = OutputStore(layout, schema, None)
    run_id = "bench"
    store.create(overwrite=True, run_id=run_id)
    writer = FragmentWriter(uri=layout.clips, schema=schema)
    progress = Progress()
    media, rng = tiny_clip(), np.random.default_rng(0)
    timings = {"rows_s": 0.0, "write_s": 0.0, "commit_s": 0.0, "compact_s": 0.0}
    compactions, started = 0, time.perf_counter()
    group = max(1, commit_videos)
    pool = ThreadPoolExecutor(max_workers=max(1, writers))
    for first in range(0, videos, group):
        ids = [f"v{v:07d}" for v in range(first, min(videos, first + group))]
        t = time.perf_counter()
        rows = clip_rows(schema, ids, clips, media, rng, dim)
        timings["rows_s"] += time.perf_counter() - t
        for video_id in ids:
            progress.add_reports([(video_report(video_id, clips), [f"{video_id}_{i:04d}" for i in range(clips)])])
        t = time.perf_counter()
        for written in pool.map(writer, [rows.slice(at, per_call) for at in range(0, rows.num_rows, per_call)]):
            progress.add_written(written)
        timings["write_s"] += time.perf_counter() - t
        ready = progress.complete()
        t = time.perf_counter()
        video_rows, fragments, _ = progress.take(ready)
        store.commit(video_rows, fragments, run_id)
        timings["commit_s"] += time.perf_counter() - t
        every = write.get("compact_every_fragments")
        if every and store.fragments_since_compaction >= int(every) and first + group < videos:
            t = time.perf_counter()
            store.compact(target_rows=int(write.target_rows_per_fragment), keep_s=write.get("keep_versions_s"))
            timings["compact_s"] += time.perf_counter() - t
            compactions += 1
    pool.shutdown()
    t = time.perf_counter()
    store.remove_orphans()
    store.compact(target_rows=int(write.target_rows_per_fragment), keep_s=write.get("keep_versions_s"))
    timings["compact_s"] += time.perf_counter() - t
    total = time.perf_counter() - started
    return {"videos": videos, "clips": videos * clips, "commits": store.commits,
            "compactions_while_running": compactions, "build_s": round(total, 1),
            **{k: round(v, 1) for k, v in timings.items()},
            "compaction_share": round(timings["compact_s"] / total, 4)}


def one_fragment_copy(src: Path, dst: Path) -> None:
    """The same rows and tables in one fragment each (the reference)."""
    import shutil

    import lance

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for table in ("clips.lance", "videos.lance"):
        ds = lance.dataset(str(dst / table))
        if len(ds.get_fragments()) > 1:
            ds.optimize.compact_files(target_rows_per_fragment=1 << 40, max_rows_per_group=1024,
                                      materialize_deletions=True)
        assert len(lance.dataset(str(dst / table)).get_fragments()) == 1


def table_figures(out: Path, dim: int, rng) -> dict:
    """One pass of every reader's figure on the output `out`, seconds."""
    import http.client

    import lance
    import numpy as np

    from engine import search
    from engine.serve.app import BackgroundServer, make_app
    from engine.store.views import curated_filter
    from engine.training import ClipDataset

    def timed(fn):
        t = time.perf_counter()
        value = fn()
        return time.perf_counter() - t, value

    ds = lance.dataset(str(out / "clips.lance"))
    fig: dict = {"fragments": len(ds.get_fragments())}
    curated = curated_filter(ds.schema)
    fig["curated_scan_s"], n = timed(lambda: ds.to_table(filter=curated, columns=["clip_id", "video_id", "start_s",
                                                                                   "end_s"]).num_rows)
    fig["count_rows_filter_s"], m = timed(lambda: ds.count_rows(filter=f"{TABLE_FILTER} AND passed"))
    fig["curated_rows"], fig["filtered_rows"] = n, m

    fig["clipdataset_start_s"], loader = timed(lambda: ClipDataset(str(out), num_frames=8, size=32, batch_size=8,
                                                                    caption=None, seed=int(rng.integers(1 << 30))))
    # The first batch selects the curated rows of the version, then reads and decodes 8 clips.
    fig["clipdataset_first_batch_s"], shape = timed(lambda: next(iter(loader))["frames"].shape)
    searcher = search.open(str(out), device="cpu")
    q = rng.standard_normal(dim).astype(np.float32)
    fig["filtered_search_s"], hits = timed(lambda: searcher.search(vector=q / np.linalg.norm(q), where=TABLE_FILTER,
                                                                   k=10).num_rows)
    assert hits == 10 and shape[0] == 8

    def get(url: str, path: str) -> int:
        host, port = url.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
        return len(body)

    t = time.perf_counter()
    with BackgroundServer(make_app(str(out))) as url:
        fig["ui_first_gallery_s"], _ = timed(lambda: get(url, "/"))
        fig["ui_first_gallery_with_start_s"] = time.perf_counter() - t
        fig["ui_overview_s"], _ = timed(lambda: get(url, "/overview"))
    return fig


def scenario_table(videos: int = TABLE_VIDEOS, clips: int = TABLE_CLIPS_PER_VIDEO, dim: int = TABLE_DIM,
                   commit_videos: int = 1000, repeats: int = 3) -> list[dict]:
    """`videos` x `clips` clip rows through curate's commit path, then every
    reader's figure on the table as curate left it and on the same rows in
    one fragment, alternating, `repeats` times each (median)."""
    import numpy as np

    out, ref = WORK / "out" / "table_curate", WORK / "out" / "table_one_fragment"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = build_table(out, videos, clips, dim, commit_videos)
    print(json.dumps({"build": build}), flush=True)
    one_fragment_copy(out, ref)
    rng = np.random.default_rng(7)
    for path in (out, ref):  # warm-up, not counted: imports, the page cache, Lance's first open
        table_figures(path, dim, rng)
    runs: dict[str, list[dict]] = {"curate": [], "one_fragment": []}
    for _ in range(repeats):
        for name, path in (("curate", out), ("one_fragment", ref)):
            runs[name].append(table_figures(path, dim, rng))
    result = {"build": build}
    for name, rows in runs.items():
        result[name] = {k: (rows[0][k] if k in ("fragments", "curated_rows", "filtered_rows")
                            else round(float(np.median([r[k] for r in rows])), 4)) for k in rows[0]}
    result["ratio"] = {k: round(result["curate"][k] / result["one_fragment"][k], 3)
                       for k in result["curate"] if k.endswith("_s") and result["one_fragment"][k] > 0}
    print(json.dumps(result), flush=True)
    if not os.environ.get("KEEP_OUTPUTS"):
        shutil.rmtree(ref, ignore_errors=True)
    return [result]


SCENARIOS = {"short": scenario_short, "long": scenario_long, "resume": scenario_resume, "inputs": scenario_inputs,
             "table": scenario_table}


def main() -> None:
    global PRESET
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="generate the inputs and stop")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--json", type=Path, help="append the results here")
    parser.add_argument("--long-end-only", action="store_true",
                        help="long: also the 60 min run without periodic commits")
    parser.add_argument("--preset", default=PRESET, help=f"x264 preset of every run (default {PRESET})")
    parser.add_argument("--split", default="fixed_stride", choices=["fixed_stride", "content", "transnetv2"],
                        help="long: the splitter of both runs")
    parser.add_argument("--videos", type=int, default=TABLE_VIDEOS, help="table: videos (default 100,000)")
    parser.add_argument("--clips-per-video", type=int, default=TABLE_CLIPS_PER_VIDEO, help="table: clips per video")
    parser.add_argument("--commit-videos", type=int, default=1000, help="table: complete videos per commit")
    parser.add_argument("--repeats", type=int, default=3, help="table: passes over each table (median)")
    parser.add_argument("--long-minutes", default=",".join(map(str, LONG_MINUTES)),
                        help="long: SHORT,LONG video minutes (LONG a multiple of SHORT; default 5,60)")
    args = parser.parse_args()
    minutes = tuple(int(m) for m in args.long_minutes.split(","))
    table_args = dict(videos=args.videos, clips=args.clips_per_video, commit_videos=args.commit_videos,
                      repeats=args.repeats)
    PRESET = args.preset
    WORK.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        short_set()
        long_set(minutes)
        empty_set(1_000)
        empty_set(100_000)
        return
    # "all" is the engine runs; the table scenario is run by name.
    names = [n for n in SCENARIOS if n != "table"] if args.scenario == "all" else [args.scenario]
    results = {name: SCENARIOS[name](args.long_end_only, args.split, minutes) if name == "long"
               else SCENARIOS[name](**table_args) if name == "table" else SCENARIOS[name]() for name in names}
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.exists() else {}
        existing.update(results)
        args.json.write_text(json.dumps(existing, indent=1))


if __name__ == "__main__":
    main()
