"""Cut-detection accuracy: one-to-one matching of detected vs true cuts.

A cut is the index of the first frame of the new shot (for gradual
transitions, the frame after the transition's centre), the convention of
`udfs.split.scene_rules.cut_frames`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CutScore:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        # No detections and nothing to detect is perfect, not undefined.
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: CutScore) -> CutScore:
        return CutScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def as_dict(self) -> dict[str, float | int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision, "recall": self.recall,
                "f1": self.f1}


def match_cuts(truth: Sequence[int], detected: Sequence[int], tolerance: int) -> CutScore:
    """Maximum one-to-one matching with |t - d| <= tolerance.

    On a line, matching greedily in sorted order (pair the earliest truth
    with the earliest detection still in reach) is a maximum matching, so no
    assignment solver is needed.
    """
    t = sorted(int(x) for x in truth)
    d = sorted(int(x) for x in detected)
    i = j = tp = 0
    while i < len(t) and j < len(d):
        if abs(t[i] - d[j]) <= tolerance:
            tp += 1
            i += 1
            j += 1
        elif d[j] < t[i]:
            j += 1
        else:
            i += 1
    return CutScore(tp=tp, fp=len(d) - tp, fn=len(t) - tp)


def score_videos(
    truth: dict[str, Sequence[int]], detected: dict[str, Sequence[int]], tolerances: Iterable[int] = (0, 1, 2)
) -> dict[int, CutScore]:
    """Micro-averaged scores over all videos in `truth`, per tolerance. A
    video missing from `detected` counts as no detections."""
    out: dict[int, CutScore] = {}
    for tol in tolerances:
        total = CutScore(0, 0, 0)
        for name, cuts in truth.items():
            total = total + match_cuts(cuts, detected.get(name, []), tol)
        out[tol] = total
    return out
