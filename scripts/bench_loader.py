"""Benchmark ClipDataset against a bare PyAV loop over the same clips.

Both sides decode the same mp4 bytes to the same frames (same count, stride,
random starts, resize and centre crop) in N processes:

- loader: `ClipDataset(...).loader(num_workers=N, persistent_workers=True)`,
  a torchdata StatefulDataLoader whose workers read the clip table (Lance
  blobs) and hand batches to the main process; batches made by the dataset
  (`ClipDataset(batch_size=B)`, decoded into shared memory) or collated by
  the DataLoader from samples (`loader(batch_size=B)`);
- bare loop: the same clips as .mp4 files on disk, N processes of a
  multiprocessing pool, each opening its share of files with PyAV and
  decoding the same frame indices (nothing is sent back).

Throughput is samples/s over whole epochs after a warm-up epoch (best of
--reps); first-batch latency is reported cold (a new loader: fork server,
workers, table scan) and warm (a new epoch of persistent workers). Target:
loader >= 0.9x the bare loop.

    PYTHONPATH=. python scripts/bench_loader.py --workers 1,2 --json bench_out/loader.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udfs.media.frames import FrameSpec, centre_crop, window_indices  # noqa: E402
from engine.training.dataset import ClipDataset, sample_rng, worker_context  # noqa: E402


def make_table(root: Path, count: int, width: int, height: int, fps: int, seconds: float) -> list[Path]:
    """`count` synthetic clips as files and as a clip table (OUT/clips.lance)
    holding the same bytes."""
    import lance
    import pyarrow as pa

    from udfs.schema import CLIP_CAPTION_FIELDS, CLIP_FILTER_FIELDS, clip_id_for, clip_schema, conform
    from engine.sample import write_video

    paths, rows = [], []
    for i in range(count):
        # x264 with a long GOP and B-frames, like the transcode stage's clips.
        path = write_video(root / "files" / f"clip{i:04d}.mp4", width=width, height=height, fps=fps,
                           seconds=seconds, moving=True, crf=23, gop=250)
        n = int(round(seconds * fps))
        paths.append(path)
        rows.append({"clip_id": clip_id_for(str(path), 0, n), "video_id": "bench", "source_uri": str(path),
                     "clip_index": i, "start_s": 0.0, "end_s": n / fps, "start_frame": 0, "end_frame": n,
                     "mp4": path.read_bytes(), "width": width, "height": height, "fps": float(fps), "num_frames": n,
                     "num_bytes": path.stat().st_size, "passed": True, "caption": f"synthetic clip {i}"})
    schema = clip_schema([*CLIP_CAPTION_FIELDS, *CLIP_FILTER_FIELDS])
    # One fragment, written in order: row i is file i.
    lance.write_dataset(conform(pa.Table.from_pylist(rows), schema), str(root / "out" / "clips.lance"),
                        schema=schema)
    return paths


# ------------------------------------------------------------------ bare loop
def bare_decode(task: tuple[str, list[int], FrameSpec]) -> int:
    """Open one file with PyAV and decode `indices`, resized and cropped as
    the loader does; returns the frames decoded."""
    import av

    path, indices, spec = task
    wanted = set(indices)
    last = max(indices)
    got = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = 1
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                sh, sw = spec.scaled_hw(frame.height, frame.width)
                rgb = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation=spec.interpolation)
                got[index] = centre_crop(rgb, spec.output_size)
            if index >= last:
                break
    frames = np.ascontiguousarray(np.stack([got[i] for i in indices]).transpose(0, 3, 1, 2))
    return int(frames.shape[0])


def bare_share(tasks: list[tuple[str, list[int], FrameSpec]]) -> int:
    return sum(bare_decode(t) for t in tasks)


def warm(_: int) -> int:
    import av  # noqa: F401 - the loader's workers import PyAV and numpy too

    time.sleep(0.2)
    return os.getpid()


def bare_tasks(paths: list[Path], spec: FrameSpec, fps: float, num_frames: int, seed: int,
               epoch: int) -> list[tuple[str, list[int], FrameSpec]]:
    """Each file with the frame indices ClipDataset draws for its row."""
    tasks = []
    for row_id, path in enumerate(paths):
        idx, _ = window_indices(spec, lo=0, hi=num_frames, clip_fps=fps, rng=sample_rng(seed, epoch, row_id))
        tasks.append((str(path), [int(i) for i in idx], spec))
    return tasks


def run_bare(pool, tasks, workers: int) -> float:
    shares = [tasks[w::workers] for w in range(workers)]
    start = time.perf_counter()
    done = pool.map(bare_share, shares, chunksize=1)
    elapsed = time.perf_counter() - start
    assert sum(done) == sum(len(t[1]) for t in tasks)
    return elapsed


# ------------------------------------------------------------------- loader
def run_loader(out: Path, args: argparse.Namespace, workers: int, batched: bool) -> dict:
    """`batched`: the dataset makes batches (decoding into shared memory);
    else the DataLoader collates samples."""
    ds = ClipDataset(out, num_frames=args.num_frames, frame_stride=args.stride, size=args.size, caption="clip",
                     shuffle=True, seed=args.seed, batch_size=args.batch_size if batched else None)
    loader = ds.loader(batch_size=None if batched else args.batch_size, num_workers=workers,
                       persistent_workers=True, prefetch_factor=args.prefetch)
    ds.set_epoch(0)
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    cold = time.perf_counter() - start
    count = len(first["clip_id"]) + sum(len(b["clip_id"]) for b in it)
    assert count == args.clips, count
    times, warm_first = [], []
    for epoch in range(1, args.reps + 1):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        it = iter(loader)
        batch = next(it)
        warm_first.append(time.perf_counter() - start)
        n = len(batch["clip_id"]) + sum(len(b["clip_id"]) for b in it)
        times.append(time.perf_counter() - start)
        assert n == args.clips
        assert batch["frames"].shape[1:] == (args.num_frames, 3, *args.size)
    del it, loader
    return {"epoch_s": times, "first_batch_cold_s": cold, "first_batch_warm_s": float(np.median(warm_first))}


def check_same_frames(out: Path, paths: list[Path], args: argparse.Namespace, spec: FrameSpec) -> None:
    """The loader samples what the bare loop decodes (indices of 3 clips)."""
    ds = ClipDataset(out, num_frames=args.num_frames, frame_stride=args.stride, size=args.size, caption="clip",
                     shuffle=False, seed=args.seed)
    ds.set_epoch(1)
    tasks = {Path(t[0]).name: t[1] for t in bare_tasks(paths, spec, args.fps, args.num_frames_clip, args.seed, 1)}
    for sample, path in zip(ds, paths[:3]):
        assert sample["frame_indices"].tolist() == tasks[path.name], (sample["frame_indices"], tasks[path.name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--modes", default="batched,samples",
                        help="batched: ClipDataset(batch_size=B); samples: DataLoader(batch_size=B) collates")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.size = tuple(args.size)
    args.modes = [m for m in args.modes.split(",") if m]
    args.num_frames_clip = int(round(args.seconds * args.fps))
    spec = FrameSpec.window(args.num_frames, frame_stride=args.stride, size=args.size)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = make_table(root, args.clips, args.width, args.height, args.fps, args.seconds)
        print(f"made {args.clips} clips ({args.width}x{args.height}, {args.fps} fps, {args.seconds} s) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        check_same_frames(root / "out", paths, args, spec)
        results = []
        for workers in (int(w) for w in args.workers.split(",")):
            loaders = {mode: run_loader(root / "out", args, workers, mode == "batched") for mode in args.modes}
            ctx = worker_context()
            with ctx.Pool(workers) as pool:
                pool.map(warm, range(workers), chunksize=1)
                run_bare(pool, bare_tasks(paths, spec, args.fps, args.num_frames_clip, args.seed, 0), workers)
                bare = [run_bare(pool, bare_tasks(paths, spec, args.fps, args.num_frames_clip, args.seed, e),
                                 workers) for e in range(1, args.reps + 1)]
            for mode, loader in loaders.items():
                row = {
                    "workers": workers,
                    "mode": mode,
                    "loader_samples_s": args.clips / min(loader["epoch_s"]),
                    "bare_samples_s": args.clips / min(bare),
                    "first_batch_cold_s": loader["first_batch_cold_s"],
                    "first_batch_warm_s": loader["first_batch_warm_s"],
                    "loader_epoch_s": loader["epoch_s"],
                    "bare_epoch_s": bare,
                }
                row["ratio"] = row["loader_samples_s"] / row["bare_samples_s"]
                results.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                  if not k.endswith("epoch_s")}), flush=True)

    print()
    print(f"clips: {args.clips} x {args.width}x{args.height} @ {args.fps} fps, {args.seconds} s; sample: "
          f"{args.num_frames} frames every {args.stride}, {args.size[0]}x{args.size[1]}, batch {args.batch_size}; "
          f"cpus: {os.cpu_count()}")
    print("| workers | batches made by | ClipDataset samples/s | bare PyAV loop samples/s | ratio | "
          "first batch cold (s) | first batch warm (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        made_by = "the dataset" if r["mode"] == "batched" else "DataLoader collate"
        print(f"| {r['workers']} | {made_by} | {r['loader_samples_s']:.1f} | {r['bare_samples_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['first_batch_cold_s']:.2f} | {r['first_batch_warm_s']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "machine": platform.platform(), "results": results}, indent=2,
                                        default=str))


if __name__ == "__main__":
    multiprocessing.freeze_support()
    main()
