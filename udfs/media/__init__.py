"""Reading and writing video media: probe, decode/encode helpers, the one-pass
clip transcoder and WebP previews."""

from udfs.schema import VIDEO_PROBE_FIELDS
from udfs.spec import StageSpec, fields

STAGES = [
    StageSpec(node="probe", impl="udfs.media.probe:ProbeVideos", level="video", step="probe",
              columns=fields(VIDEO_PROBE_FIELDS), supplied=("storage_options",)),
    # Fans each video out to its clips (the base clip columns); motion scores
    # previews and quality signals come from the same decode (the `motion`,
    # `preview` and `quality` nodes feed it).
    StageSpec(node="transcode", impl="udfs.media.transcode:ClipTranscoder", level="clip", step="transcode",
              runtime_keys=frozenset({"threads", "thread_type", "decode_threads", "decode", "video_workers"}),
              supplied=("preview", "motion", "quality", "storage_options")),
    StageSpec(node="preview", impl=None, level="clip", switch=("enabled", False)),
]
