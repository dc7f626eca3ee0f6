"""Export formats of the clip table, one module each.

Every writer reads the table through `rows.scan_clips` (a bounded chunk of
clips and their blobs at a time) and writes through `target.ExportTarget`
(local folders and object stores alike); `engine.export.task` picks the formats
from the config.
"""
