"""task=filter: re-threshold a finished clip table from its stored scores."""

from engine.filter.task import read_applied, run, verdicts

__all__ = ["read_applied", "run", "verdicts"]
