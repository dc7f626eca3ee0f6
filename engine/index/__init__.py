"""task=index: vector, full-text and scalar indexes on `clips.lance`; `ann`
picks the vector index and measures the search knobs that reach a recall
target."""

from engine.index import ann
from engine.index.task import run

__all__ = ["ann", "run"]
