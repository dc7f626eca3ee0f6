"""How right the quality signals are, and what they cost the transcode stage,
on a generated set with known answers (scripts/quality_videos.py), in one run.

Accuracy, per signal:
- text: burned-in subtitles and top-of-frame tickers of several sizes over
  still and moving content (positives) against the same content clean, with
  bars, blurred or dark (negatives); precision and recall of
  `text_area_ratio > --text-threshold`.
- cuts: two shots back to back, the cut at several places (positives),
  against continuous pans, tilts, zooms and a still (negatives); precision
  and recall of `cut_inside`.
- borders: letterbox, pillarbox and windowbox bars of several sizes; mean and
  largest pixel error over the four sides.
- camera: every camera motion over several stills and speeds; the share
  classified right, and a confusion list of the misses.

Cost: the transcode stage (decode, libx264 encode, previews, motion scores)
over the whole set with the quality signals off, with the cheap ones (all
but text) and with all of them; each config run `--repeat` times,
interleaved, the fastest kept; wall and CPU seconds (this process: the
stage runs in it), CPU being the steadier on a shared machine. The whole-job ratio on the two curate
workloads is `scripts/bench_split.py --quality`.

    python scripts/bench_quality.py [--seeds 3] [--repeat 2] [--set text.size=480 ...] [--json out.json]

Time it alone on the machine (`flock -x /tmp/reelsift-cpu.lock ...` here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts import quality_videos as qv  # noqa: E402

BORDER_CASES = {  # name -> (ffmpeg filter, (top, bottom, left, right)) at 640x360
    "letterbox_20": ("scale=640:320,pad=640:360:0:20:black", (20, 20, 0, 0)),
    "letterbox_44": ("scale=640:272,pad=640:360:0:44:black", (44, 44, 0, 0)),
    "letterbox_60": ("scale=640:240,pad=640:360:0:60:black", (60, 60, 0, 0)),
    "pillarbox_40": ("scale=560:360,pad=640:360:40:0:black", (0, 0, 40, 40)),
    "pillarbox_80": ("scale=480:360,pad=640:360:80:0:black", (0, 0, 80, 80)),
    "pillarbox_120": ("scale=400:360,pad=640:360:120:0:black", (0, 0, 120, 120)),
    "windowbox_30_60": ("scale=520:300,pad=640:360:60:30:black", (30, 30, 60, 60)),
    "clean": ("null", (0, 0, 0, 0)),
}
SUBTITLES = ("This is a burned-in subtitle line", "Nobody told me it would be like this", "BREAKING NEWS 24/7")


# `quality` node overrides for every run (--set), as block.key=value.
OVERRIDES: list[str] = []


def quality_node() -> dict:
    """conf's `quality` node with the --set overrides."""
    import yaml

    from reelsift_conf import node

    out = node("quality")
    for item in OVERRIDES:
        key, value = item.removeprefix("quality.").split("=", 1)
        block, name = key.split(".", 1)
        out[block][name] = yaml.safe_load(value)
    return out


def transcoder(quality: dict | None = None):
    from reelsift_conf import stage_args
    from udfs.media.transcode import ClipTranscoder
    from udfs.quality.settings import prepare

    return ClipTranscoder(**stage_args("transcode", quality=prepare(quality or quality_node())))


def split_table(paths: list[Path], clip_len_s: float = 10.0) -> pa.Table:
    from reelsift_conf import stage_args
    from udfs.media.probe import ProbeVideos
    from udfs.split.fixed_stride import FixedStrideSplit

    table = ProbeVideos(**stage_args("probe"))(pa.table({"uri": [str(p) for p in paths]}))
    return FixedStrideSplit(**stage_args("split", "fixed_stride", clip_len_s=clip_len_s, min_clip_s=0.5))(table)


def clip_rows(paths: list[Path], stage=None) -> dict[str, dict]:
    """source path -> its one clip's row."""
    stage = stage or transcoder()
    rows = pa.concat_tables(list(stage(split_table(paths)))).drop_columns(["mp4", "preview_webp"]).to_pylist()
    return {r["source_uri"]: r for r in rows}


def precision_recall(truth: list[bool], guess: list[bool]) -> dict[str, float]:
    tp = sum(t and g for t, g in zip(truth, guess))
    fp = sum(g and not t for t, g in zip(truth, guess))
    fn = sum(t and not g for t, g in zip(truth, guess))
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "positives": sum(truth), "negatives": len(truth) - sum(truth)}


def text_set(folder: Path, seeds: int) -> dict[Path, bool]:
    folder.mkdir(parents=True, exist_ok=True)
    font = qv.font_file(folder)
    out: dict[Path, bool] = {}
    for seed in range(seeds):
        motion = ("pan_right", "static", "zoom_in")[seed % 3]
        clean = qv.render_motion(folder / f"clean_{seed}.mp4", motion, width=640, height=360, seed=seed + 10,
                                 speed=60.0)
        out[clean] = False
        for name, vf in (("bars", "scale=640:272,pad=640:360:0:44:black"), ("blur", "boxblur=6:2"),
                         ("dark", "eq=brightness=-0.35:contrast=0.6")):
            out[qv.apply_filter(clean, folder / f"{name}_{seed}.mp4", vf)] = False
        for k, ratio in enumerate((1 / 14, 1 / 18, 1 / 24)):
            text = SUBTITLES[(seed + k) % len(SUBTITLES)]
            out[qv.apply_filter(clean, folder / f"sub_{seed}_{k}.mp4", qv.subtitle_filter(font, text, 360,
                                                                                           size_ratio=ratio))] = True
        size = 18
        ticker = (f"drawbox=x=0:y=0:w=iw:h={size + 10}:color=navy:t=fill,drawtext=fontfile={font}:"
                  f"text='{SUBTITLES[2]}  markets up 2 percent':fontsize={size}:fontcolor=white:x=8:y=5")
        out[qv.apply_filter(clean, folder / f"ticker_{seed}.mp4", ticker)] = True
    return out


def cut_set(folder: Path, seeds: int) -> dict[Path, bool]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[Path, bool] = {}
    for seed in range(seeds):
        for at in (0.7, 1.5, 2.3):
            out[qv.render_cut(folder / f"cut_{seed}_{at}.mp4", seconds=3.0, cut_at_s=at, seed=seed * 7)] = True
        for motion in qv.MOTIONS:
            out[qv.render_motion(folder / f"cont_{seed}_{motion}.mp4", motion, seed=seed * 7 + 3,
                                 speed=80.0 + 40 * seed)] = False
    return out


def camera_set(folder: Path, seeds: int) -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {qv.render_motion(folder / f"cam_{seed}_{m}.mp4", m, seed=100 + seed, speed=90.0 + 40 * seed): m
            for seed in range(seeds) for m in qv.MOTIONS}


def border_set(folder: Path, seeds: int) -> dict[Path, tuple[int, int, int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for seed in range(seeds):
        clean = qv.render_motion(folder / f"bclean_{seed}.mp4", ("pan_right", "tilt_up", "static")[seed % 3],
                                 width=640, height=360, seed=200 + seed, speed=60.0)
        for name, (vf, want) in BORDER_CASES.items():
            out[qv.apply_filter(clean, folder / f"{name}_{seed}.mp4", vf)] = want
    return out


def accuracy(work: Path, seeds: int, text_threshold: float) -> dict:
    texts, cuts = text_set(work / "text", seeds), cut_set(work / "cuts", seeds)
    cameras, borders = camera_set(work / "camera", seeds), border_set(work / "borders", seeds)
    rows = clip_rows([*texts, *cuts, *cameras, *borders])
    row = lambda p: rows[str(p)]  # noqa: E731
    text_guess = [(row(p)["text_area_ratio"] or 0.0) > text_threshold for p in texts]
    cut_guess = [bool(row(p)["cut_inside"]) for p in cuts]
    errors = [abs(got - want) for p, sides in borders.items()
              for got, want in zip((row(p)["border_top"], row(p)["border_bottom"], row(p)["border_left"],
                                    row(p)["border_right"]), sides)]
    misses = Counter(f"{want} -> {row(p)['camera_motion']}" for p, want in cameras.items()
                     if row(p)["camera_motion"] != want)
    return {
        "text": {**precision_recall(list(texts.values()), text_guess), "threshold": text_threshold,
                 "positive_min": min(row(p)["text_area_ratio"] for p, t in texts.items() if t),
                 "negative_max": max(row(p)["text_area_ratio"] for p, t in texts.items() if not t)},
        "cuts": precision_recall(list(cuts.values()), cut_guess),
        "borders": {"cases": len(borders), "mean_px_error": sum(errors) / len(errors), "max_px_error": max(errors)},
        "camera": {"clips": len(cameras), "accuracy": 1 - sum(misses.values()) / len(cameras),
                   "misses": dict(misses)},
    }


def cost(work: Path, repeat: int) -> dict:
    """Seconds of the transcode stage over one set, per quality config."""
    paths = sorted((work / "text").glob("*.mp4")) + sorted((work / "camera").glob("*.mp4"))
    table = split_table(paths)
    full = quality_node()
    off = {b: {**v, "enabled": False} for b, v in full.items()}
    cheap = {**full, "text": {**full["text"], "enabled": False}}
    configs = {"off": off, "cheap (all but text)": cheap, "all (default)": full}
    stages = {name: transcoder(q) for name, q in configs.items()}
    best = {name: float("inf") for name in configs}
    cpu = {name: float("inf") for name in configs}
    for _ in range(repeat):
        for name, stage in stages.items():
            t0, c0 = time.perf_counter(), time.process_time()
            clips = sum(t.num_rows for t in stage(table))
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    seconds = sum(r["num_frames"] / r["fps"] for r in table.select(["num_frames", "fps"]).to_pylist())
    return {"videos": len(paths), "clips": clips, "source_s": round(seconds, 1),
            "stage_s": {k: round(v, 2) for k, v in best.items()},
            "ratio": {k: round(v / best["off"], 3) for k, v in best.items()},
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_ratio": {k: round(v / cpu["off"], 3) for k, v in cpu.items()}}


def print_accuracy(acc: dict) -> None:
    print("| signal | measure | value |\n|---|---|---|")
    for name in ("text", "cuts"):
        a = acc[name]
        print(f"| {name} | precision / recall ({a['positives']} positive, {a['negatives']} negative clips) | "
              f"{a['precision']:.3f} / {a['recall']:.3f} |")
    t = acc["text"]
    print(f"| text | text_area_ratio: smallest positive / largest negative (threshold {t['threshold']}) | "
          f"{t['positive_min']:.4f} / {t['negative_max']:.4f} |")
    b = acc["borders"]
    print(f"| borders | pixel error, mean / largest ({b['cases']} clips x 4 sides) | "
          f"{b['mean_px_error']:.2f} / {b['max_px_error']} |")
    cam = acc["camera"]
    print(f"| camera | accuracy ({cam['clips']} clips) | {cam['accuracy']:.3f} {cam['misses'] or ''} |")


def print_cost(c: dict, repeat: int, settings: list[str]) -> None:
    if settings:
        print(f"\nquality settings: {' '.join(settings)}")
    print(f"\ntranscode stage over {c['videos']} videos ({c['source_s']} s of source), fastest of {repeat}:")
    print("| quality signals | stage s | ratio to off | CPU s | CPU ratio to off |\n|---|---:|---:|---:|---:|")
    for name, s in c["stage_s"].items():
        print(f"| {name} | {s:.2f} | {c['ratio'][name]:.3f} | {c['cpu_s'][name]:.2f} | {c['cpu_ratio'][name]:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="variants of each case")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each cost config (the fastest kept)")
    parser.add_argument("--text-threshold", type=float, default=0.005)
    parser.add_argument("--set", nargs="*", default=[], metavar="BLOCK.KEY=VALUE",
                        help="quality settings for every run, e.g. text.size=480")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the cost runs (no timing: no lock needed)")
    parser.add_argument("--cost-only", action="store_true", help="skip the accuracy set")
    parser.add_argument("--work", help="folder for the generated videos (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    OVERRIDES.extend(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = {}
        if not args.cost_only:
            results["accuracy"] = accuracy(work, args.seeds, args.text_threshold)
        if not args.accuracy_only:
            if args.cost_only:  # the cost set is the accuracy set's text and camera videos
                text_set(work / "text", args.seeds), camera_set(work / "camera", args.seeds)
            results["cost"] = cost(work, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if "accuracy" in results:
        print_accuracy(results["accuracy"])
    if "cost" in results:
        print_cost(results["cost"], args.repeat, args.set)


if __name__ == "__main__":
    main()
