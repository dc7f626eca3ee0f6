"""task=filter: `passed` and `filter_reason` of every clip, recomputed from
the scores the clip table already holds, at this config's thresholds.

Every registered filter (motion, aesthetic, the quality signals) judges the
stored scores exactly as a fresh curate run with the same overrides would
(`udfs.analysis.rules`); no media is read and nothing is recomputed. Only
those two columns are rewritten, as one new Lance version, and only when
some verdict changed. `duplicate` stays dedup's column: the curated view
still leaves duplicates out.

The thresholds applied are recorded in `OUT/filter/settings.json`, so a
resumed curate checks its settings against them rather than against the
ones the table was first made with.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig

from engine.runtime.stages import node_dict
from engine.store import outputs
from engine.store.lance_columns import write_columns
from udfs import registry
from udfs.analysis.filtering import row_errors
from udfs.analysis.rules import FilterRule, judge, reason_names, setting
from udfs.schema import CLIP_FILTER_FIELDS
from udfs.uris import arrow_fs, lance_storage_options, scheme_of

log = logging.getLogger(__name__)

SETTINGS_FILE = ("filter", "settings.json")


def filter_settings(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The config nodes the filters read (`motion`, `aesthetic`, `quality`, `transcode`)."""
    nodes = {key.split(".")[0] for rule in registry.FILTERS for key in rule.keys}
    return {node: node_dict(cfg, node) for node in sorted(nodes) if cfg.get(node) is not None}


def applied_keys(settings: dict[str, dict[str, Any]], rules: tuple[FilterRule, ...] = registry.FILTERS) -> dict[str, Any]:
    """Every filter threshold key and its value: what the record holds."""
    return {key: setting(settings, key) for rule in rules for key in rule.keys}


def active_keys(rule: FilterRule, settings: dict[str, dict[str, Any]]) -> list[str]:
    """The threshold keys of `rule` that are set (none while its gate is shut)."""
    if not rule.judges(settings):
        return []
    return [k for k in (*(b.key for b in rule.bounds), *rule.extra_keys) if setting(settings, k) not in (None, [], ())]


def check_columns(names: list[str], settings: dict[str, dict[str, Any]], root: str) -> None:
    """A threshold set on a filter whose score columns the table lacks (its
    signal was off when the table was made) is an error, not a silent pass."""
    for rule in registry.FILTERS:
        missing = [c for c in rule.columns if c not in names]
        keys = active_keys(rule, settings)
        if missing and keys:
            raise ValueError(f"task=filter: {', '.join(keys)} is set, but the clip table at {root} has no "
                             f"{', '.join(missing)} column (that signal was off when it was made); unset it, or "
                             "make the table again with the signal on")


def verdicts(table: pa.Table, settings: dict[str, dict[str, Any]]) -> tuple[list[bool | None], list[str | None]]:
    """(passed, filter_reason) of every row of `table` at `settings`: null
    for a row with an error (never judged), else whether every filter passed."""
    reasons = judge(table, registry.FILTERS, settings)
    errors = row_errors(table)
    passed = [None if err is not None else why is None for err, why in zip(errors, reasons)]
    return passed, [None if err is not None else why for err, why in zip(errors, reasons)]


def settings_path(root: str) -> str:
    return outputs.join(root, *SETTINGS_FILE)


def read_applied(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The thresholds the last task=filter applied to the output at `root` (None: none ran)."""
    path = settings_path(root)
    try:
        if scheme_of(root):
            fs, p = arrow_fs(path, storage_options)
            with fs.open_input_stream(p) as fh:
                return json.loads(fh.read().decode())["settings"]
        with open(path) as fh:
            return json.load(fh)["settings"]
    except (OSError, ValueError, KeyError):
        return None


def _write_applied(root: str, record: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    text = json.dumps(record, indent=2, default=str)
    path = settings_path(root)
    if scheme_of(root):
        fs, p = arrow_fs(path, storage_options)
        with fs.open_output_stream(p) as fh:
            fh.write(text.encode())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def run(cfg: DictConfig) -> dict[str, Any]:
    layout = outputs.OutputLayout(str(cfg.output))
    config_options = outputs.storage_options(cfg)
    options = lance_storage_options(config_options)
    clips = layout.open_clips(options)
    settings = filter_settings(cfg)
    check_columns(clips.schema.names, settings, layout.root)
    rules = [r for r in registry.FILTERS if all(c in clips.schema.names for c in r.columns)]
    columns = sorted({c for r in rules for c in r.columns} | {"error", "passed", "filter_reason"})
    table = clips.to_table(columns=[c for c in columns if c in clips.schema.names], with_row_id=True,
                           with_row_address=True)
    passed, reasons = verdicts(table, settings)
    old_passed = table.column("passed").to_pylist() if "passed" in table.column_names else [None] * table.num_rows
    old_reasons = (table.column("filter_reason").to_pylist() if "filter_reason" in table.column_names
                   else [None] * table.num_rows)
    changed = sum(1 for a, b, c, d in zip(passed, old_passed, reasons, old_reasons) if a != b or c != d)
    version = clips.version
    if changed:
        values = pa.table({"_rowid": table.column("_rowid"), "_rowaddr": table.column("_rowaddr"),
                           "passed": pa.array(passed, CLIP_FILTER_FIELDS[0].type),
                           "filter_reason": pa.array(reasons, CLIP_FILTER_FIELDS[1].type)})
        version = write_columns(clips, values, list(CLIP_FILTER_FIELDS), options).version
    applied = applied_keys(settings)
    _write_applied(layout.root, {"table_version": version, "settings": applied}, config_options)
    counts = Counter(name for why in reasons for name in reason_names(why))
    newly_dropped = sum(1 for a, b in zip(passed, old_passed) if a is False and b is not False)
    newly_kept = sum(1 for a, b in zip(passed, old_passed) if a is True and b is not True)
    summary = {
        "clips": table.num_rows,
        "clips_passed": sum(1 for p in passed if p),
        "clips_changed": changed,
        "newly_filtered": newly_dropped,
        "newly_passed": newly_kept,
        "filter_reasons": dict(counts.most_common()),
        "filters": [r.name for r in rules],
        "table_version": version,
        "thresholds": {k: v for k, v in applied.items() if v is not None},
    }
    _update_curate_summary(layout, summary, config_options)
    log.info("filter: %d of %d clips pass; %d verdicts changed (%d newly filtered, %d newly passed)",
             summary["clips_passed"], table.num_rows, changed, newly_dropped, newly_kept)
    return summary


def _update_curate_summary(layout: outputs.OutputLayout, result: dict[str, Any],
                           storage_options: dict[str, Any] | None) -> None:
    """summary.json's counts of passed clips and filter reasons follow the new verdicts."""
    summary = outputs.read_summary(layout, storage_options)
    if summary is None:
        return
    summary["clips_passed"] = result["clips_passed"]
    summary["filter_reasons"] = result["filter_reasons"]
    summary["filter"] = {k: result[k] for k in ("table_version", "thresholds", "clips_changed")}
    outputs.write_summary(summary, layout, storage_options)
