"""task=serve: the browser workbench over an output folder (`app`: routes;
`ui/`: templates and static files)."""

from engine.serve.app import run

__all__ = ["run"]
