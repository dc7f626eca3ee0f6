"""Pipeline stages: plain callable classes, one subpackage per stage family.

- ``udfs.media``: reading and writing video media (probe, decode/encode
  helpers, the one-pass clip transcoder, WebP previews).
- ``udfs.split``: where clips start and end (fixed stride; shot detection with
  TransNetV2 or the content detector, span rules, low-res decode, metrics).
- ``udfs.analysis``: per-clip scores and the keep/drop decision (the single
  clip decode, frame extraction, motion, aesthetics, filter columns).
- ``udfs.models``: learned models over clip frames (model resolution,
  embeddings, captions, Qwen vision preprocessing).

A stage's ``__init__`` loads what it needs (models, encoders); its
``__call__(batch: pa.Table) -> pa.Table`` (or an iterator of tables) adds the
columns its family declares in ``udfs.schema``. Stages never read Hydra
config, Ray or global state; the tasks in ``engine`` build them from config.
A ``udfs`` module may import only the leaf plumbing ``udfs.schema`` and
``udfs.uris`` (``tests/test_layout.py`` enforces this).
"""
