"""Where clips start and end: fixed-stride spans and shot detection
(TransNetV2, the content detector), the rules that turn per-frame transition
scores into spans, the low-resolution decode they share, and cut metrics."""

from udfs.schema import VIDEO_SCENE_FIELDS, VIDEO_SPAN_FIELDS
from udfs.spec import StageSpec, fields

# chunk_frames bounds memory only: scores are those of the whole video at once.
_SCENE_RUNTIME = frozenset({"decode_threads", "decode_workers", "chunk_frames"})

STAGES = [
    StageSpec(node="split", choice="fixed_stride", impl="udfs.split.fixed_stride:FixedStrideSplit", level="video",
              step="split_fixed_stride", columns=fields(VIDEO_SPAN_FIELDS)),
    StageSpec(node="split", choice="transnetv2", impl="udfs.split.scenes:TransNetV2Split", level="video",
              step="split_transnetv2", columns=fields(VIDEO_SPAN_FIELDS, VIDEO_SCENE_FIELDS),
              runtime_keys=_SCENE_RUNTIME | {"batch_size", "gpu_decode", "prefetch_videos", "torch_threads"},
              weights=("weights",), supplied=("storage_options",)),
    StageSpec(node="split", choice="content", impl="udfs.split.scenes:ContentSplit", level="video",
              step="split_content", columns=fields(VIDEO_SPAN_FIELDS, VIDEO_SCENE_FIELDS),
              runtime_keys=_SCENE_RUNTIME, supplied=("storage_options",)),
]
