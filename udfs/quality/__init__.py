"""Quality signals beyond motion: burned-in text, black bars, sharpness,
exposure, black and frozen frames, camera motion and cuts inside a clip.
Computed inside the transcode pass (`clip_quality`), each a column and a
re-thresholdable filter (`rules`)."""

from udfs.quality.rules import QUALITY_RULES
from udfs.quality.settings import any_enabled, quality_columns
from udfs.spec import StageSpec

STAGES = [
    # No stage of its own: the transcode stage samples the frames it decodes
    # (the node feeds it), so the signals cost no extra decode.
    StageSpec(node="quality", impl=None, level="clip", on=any_enabled, columns=quality_columns,
              runtime_keys=frozenset({"device", "threads"}), filters=QUALITY_RULES,
              prepare="udfs.quality.settings:prepare"),
]
