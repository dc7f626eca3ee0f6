"""Precision / recall / F1 of detected shot cuts against ground truth.

Ground truth (and `--pred`) is JSON: {video file name: [cut frame, ...]},
a cut being the first frame of the new shot (scripts/make_cut_videos.py
writes one). Matching is one-to-one within a tolerance of 0, 1 and 2 frames.
Either pass detections (`--pred`) or let a detector run on the videos, which
are looked up next to the ground-truth file (or in `--video-dir`):

    PYTHONPATH=. python scripts/eval_scenes.py --truth /tmp/cuts/cuts.json --detector transnetv2 content
    PYTHONPATH=. python scripts/eval_scenes.py --truth cuts.json --pred my_cuts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udfs.split.scene_metrics import CutScore, match_cuts, score_videos  # noqa: E402
from udfs.split.scene_rules import cut_frames  # noqa: E402

TOLERANCES = (0, 1, 2)
DETECTORS = ("transnetv2", "content")


def build_detector(name: str, threshold: float | None = None, **kwargs):  # -> stage instance
    from udfs.split.scenes import ContentSplit, TransNetV2Split

    cls = {"transnetv2": TransNetV2Split, "content": ContentSplit}[name]
    if threshold is not None:
        kwargs["threshold"] = threshold
    return cls(**kwargs)


def detect_cuts(stage, paths: list[Path]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Run a split stage on `paths`; cuts from its transition_probs at its
    own threshold. Returns ({name: cuts}, {name: error})."""
    import av
    import pyarrow as pa

    fps = []
    for p in paths:
        with av.open(str(p)) as c:
            fps.append(float(c.streams.video[0].average_rate or 0))
    table = pa.table({"uri": [str(p) for p in paths], "fps": fps, "num_frames": [None] * len(paths),
                      "error": pa.array([None] * len(paths), pa.string())})
    cuts: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for p, row in zip(paths, stage(table).to_pylist()):
        if row["error"]:
            errors[p.name] = row["error"]
            continue
        cuts[p.name] = cut_frames(row["transition_probs"], stage.threshold)
    return cuts, errors


def format_scores(label: str, scores: dict[int, CutScore]) -> str:
    parts = [f"tol={t}: P={s.precision:.3f} R={s.recall:.3f} F1={s.f1:.3f} (tp={s.tp} fp={s.fp} fn={s.fn})"
             for t, s in scores.items()]
    return f"{label:<12} " + " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--pred", type=Path, help="detections JSON, same format as --truth")
    parser.add_argument("--detector", nargs="*", choices=DETECTORS, default=[])
    parser.add_argument("--threshold", type=float, help="override the detector's threshold")
    parser.add_argument("--video-dir", type=Path, help="where the videos are (default: next to --truth)")
    parser.add_argument("--per-video", action="store_true")
    parser.add_argument("--json", type=Path, help="write all scores here")
    args = parser.parse_args()

    truth: dict[str, list[int]] = json.loads(args.truth.read_text())
    runs: dict[str, dict[str, list[int]]] = {}
    if args.pred:
        runs["pred"] = json.loads(args.pred.read_text())
    video_dir = args.video_dir or args.truth.parent
    paths = [video_dir / name for name in truth]
    for name in args.detector:
        stage = build_detector(name, args.threshold)
        t0 = time.perf_counter()
        cuts, errors = detect_cuts(stage, paths)
        print(f"{name}: {time.perf_counter() - t0:.1f}s for {len(paths)} videos")
        for video, err in errors.items():
            print(f"  {video}: {err}")
        runs[name] = cuts
    if not runs:
        parser.error("give --pred and/or --detector")

    report: dict[str, dict] = {}
    for label, detected in runs.items():
        scores = score_videos(truth, detected, TOLERANCES)
        print(format_scores(label, scores))
        report[label] = {"overall": {t: s.as_dict() for t, s in scores.items()}, "per_video": {}}
        for video, cuts in truth.items():
            per = {t: match_cuts(cuts, detected.get(video, []), t) for t in TOLERANCES}
            report[label]["per_video"][video] = {"truth": cuts, "detected": detected.get(video, []),
                                                 **{f"f1@{t}": s.f1 for t, s in per.items()}}
            if args.per_video:
                print("   " + format_scores(video[:40], per) + f"  truth={cuts} detected={detected.get(video, [])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
