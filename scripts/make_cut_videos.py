"""Generate synthetic videos with known shot transitions and their ground truth.

Hard cuts, dissolves and fades at several sizes and frame rates. Writes the
videos plus `cuts.json` ({file name: [cut frame, ...]}, the format
scripts/eval_scenes.py reads) and `transitions.json` (the kind and length of
each transition, for breaking results down).

    PYTHONPATH=. python scripts/make_cut_videos.py OUT_DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.sample import write_transition_video  # noqa: E402

# name: (width, height, fps, scene lengths in seconds, transitions)
SPECS: dict[str, tuple[int, int, float, list[float], list[tuple[str, float]]]] = {
    "cuts_320x240_24fps.mp4": (320, 240, 24, [3, 4.5, 2.5, 5], [("cut", 0)] * 3),
    "cuts_640x360_30fps.mp4": (640, 360, 30, [4, 2, 6, 3, 3], [("cut", 0)] * 4),
    "cuts_odd_318x180_25fps.mp4": (318, 180, 25, [2.5, 3, 3], [("cut", 0)] * 2),
    "dissolve_480x270_30fps.mp4": (480, 270, 30, [4, 4, 4, 4], [("dissolve", 0.4), ("dissolve", 0.8), ("cut", 0)]),
    "fade_426x240_24fps.mp4": (426, 240, 24, [4, 4, 4], [("fade", 0.5), ("fade", 1.0)]),
    "mixed_854x480_60fps.mp4": (854, 480, 60, [3, 3, 3, 3], [("cut", 0), ("dissolve", 0.5), ("fade", 0.5)]),
}
QUICK = ("cuts_320x240_24fps.mp4", "dissolve_480x270_30fps.mp4", "fade_426x240_24fps.mp4")


def make(out_dir: Path, names: list[str] | None = None) -> dict[str, list[int]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    truth: dict[str, list[int]] = {}
    details: dict[str, list[dict[str, object]]] = {}
    for name, (w, h, fps, scene_s, trans_s) in SPECS.items():
        if names is not None and name not in names:
            continue
        scenes = [int(round(s * fps)) for s in scene_s]
        # Even lengths put the transition's centre exactly between two frames.
        transitions = [(kind, int(round(length * fps / 2)) * 2) for kind, length in trans_s]
        _, cuts = write_transition_video(out_dir / name, scenes=scenes, transitions=transitions,
                                         width=w, height=h, fps=fps)
        truth[name] = cuts
        details[name] = [{"cut": c, "kind": k, "frames": n} for c, (k, n) in zip(cuts, transitions)]
    (out_dir / "cuts.json").write_text(json.dumps(truth, indent=1))
    (out_dir / "transitions.json").write_text(json.dumps(details, indent=1))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="only a few small videos")
    args = parser.parse_args()
    truth = make(args.out_dir, list(QUICK) if args.quick else None)
    for name, cuts in truth.items():
        print(f"{name}: cuts at {cuts}")
    print(f"ground truth: {args.out_dir / 'cuts.json'}")


if __name__ == "__main__":
    main()
