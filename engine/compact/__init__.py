"""task=compact: merge the small fragments of an existing output's tables
and retire old versions (what curate does as it runs), for outputs made by
older runs or grown by many appends."""

from engine.compact.task import run

__all__ = ["run"]
