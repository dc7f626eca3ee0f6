"""Per-clip analysis: one decode per clip for motion scores and the frames the
model stages consume, aesthetic scoring, and the keep/drop filter columns."""

from udfs.analysis.rules import AESTHETIC, LOW_MOTION
from udfs.schema import CLIP_AESTHETIC_FIELDS, CLIP_MOTION_FIELDS
from udfs.spec import StageSpec, fields

STAGES = [
    # Scored inside transcode from each clip's own packets (no stage of its own).
    StageSpec(node="motion", impl=None, level="clip", switch=("mode", "disable"), columns=fields(CLIP_MOTION_FIELDS),
              filters=(LOW_MOTION,)),
    # One decode of each clip, for the frames of every stage that declares `frames`.
    StageSpec(node="frames", impl="udfs.analysis.clip_analysis:ClipAnalysis", level="clip", step="clip_analysis",
              runtime_keys=frozenset({"decode_threads"}), supplied=("consumers", "motion"), serves_frames=True),
    StageSpec(node="aesthetic", impl="udfs.analysis.aesthetic:AestheticScorer", level="clip", step="aesthetic",
              switch=("enabled", False), runtime_keys=frozenset({"model_batch_size"}),
              columns=fields(CLIP_AESTHETIC_FIELDS), frames="frames.consumers.aesthetic", frame_consumer="aesthetic",
              models=("model",), files=("head",), filters=(AESTHETIC,)),
]
