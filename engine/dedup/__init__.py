"""task=dedup: semantic dedup of a table's embeddings (k-means, then pairwise
similarity within clusters); the stages it runs live in `udfs.dedup`."""

from engine.dedup.task import run

__all__ = ["run"]
