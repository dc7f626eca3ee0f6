"""Pipeline stages: plain callable classes, one module per stage family.

A stage's ``__init__`` loads what it needs (models, encoders); its
``__call__(batch: pa.Table) -> pa.Table`` (or an iterator of tables) adds the
columns its family declares in ``engine.schema``. Stages never read Hydra
config or global state; ``engine.pipeline`` builds them from config.
"""
