"""task=export: the clip table written to layouts other tools read; one
module per format in `exporters/`."""

from engine.export.task import check_export_target, run, write_exports

__all__ = ["check_export_target", "run", "write_exports"]
