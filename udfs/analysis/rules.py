"""Filters as rules over stored scores.

A filter never decides anything a score column does not hold: its verdict is
a function of the row's scores and its thresholds. The same rule judges a
clip while curate runs (the stage that made the score applies it) and when
`task=filter` re-thresholds a finished table, so both give the same
`passed` and `filter_reason`.

Most rules are bounds: a score column, the config key of its threshold, and
whether a clip fails below or above it (null threshold: score only). The UI's
threshold sliders are built from the same bounds. A rule may also have a
check of its own (a list of rejected labels).

Each rule belongs to the stage spec that makes its columns
(`StageSpec.filters`); `judge` runs a list of them in registry order. A
reason reads `"<rule>: <detail>"`, and the summary counts clips per rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from udfs.analysis.filtering import REASON_SEPARATOR, row_errors

Settings = Mapping[str, Mapping[str, Any]]
# (row scores by column, the run's settings by node) -> why the row fails, or None.
Check = Callable[[Mapping[str, Any], Settings], str | None]


@dataclass(frozen=True)
class Bound:
    """Fail a clip whose `column` is below (or above) the threshold at config key `key`."""

    column: str
    key: str
    fails: Literal["below", "above"]

    def detail(self, value: float, threshold: float) -> str | None:
        if self.fails == "below" and value < threshold:
            return f"{self.column}={value:.4g}<{threshold:g}"
        if self.fails == "above" and value > threshold:
            return f"{self.column}={value:.4g}>{threshold:g}"
        return None


@dataclass(frozen=True)
class FilterRule:
    """One re-thresholdable filter: its bounds and/or its own check."""

    name: str
    bounds: tuple[Bound, ...] = ()
    check: Check | None = None
    # Columns `check` reads beyond the bounds'.
    extra_columns: tuple[str, ...] = ()
    # Config keys `check` reads (its thresholds).
    extra_keys: tuple[str, ...] = ()
    # (key, value): the rule judges only while the setting has that value (motion.mode=enable).
    gate: tuple[str, Any] | None = None
    # The reason for a row whose bound columns are all null while a bound is set.
    missing: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([b.column for b in self.bounds] + list(self.extra_columns)))

    @property
    def keys(self) -> tuple[str, ...]:
        """Every config key a re-threshold of this rule may change."""
        gate = (self.gate[0],) if self.gate else ()
        return tuple(dict.fromkeys([*gate, *(b.key for b in self.bounds), *self.extra_keys]))

    def judges(self, settings: Settings) -> bool:
        """Whether the rule judges at all under `settings` (its gate, if any, is open)."""
        return self.gate is None or setting(settings, self.gate[0]) == self.gate[1]

    def reason(self, row: Mapping[str, Any], settings: Settings) -> str | None:
        if not self.judges(settings):
            return None
        parts: list[str] = []
        active = [(b, setting(settings, b.key)) for b in self.bounds]
        active = [(b, t) for b, t in active if t is not None]
        if active and self.missing and all(row[b.column] is None for b, _ in active):
            parts.append(self.missing)
        else:
            for bound, threshold in active:
                value = row[bound.column]
                if value is not None and (why := bound.detail(value, float(threshold))):
                    parts.append(why)
        if self.check is not None and (why := self.check(row, settings)):
            parts.append(why)
        return f"{self.name}: " + ", ".join(parts) if parts else None


def setting(settings: Settings, key: str) -> Any:
    """The value of dotted `key` ("quality.text.max_area") in `settings`, None when unset."""
    node, *path = key.split(".")
    value: Any = settings.get(node)
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def judge(table: pa.Table, rules: Sequence[FilterRule], settings: Settings) -> list[str | None]:
    """Per row, the reasons (joined) the `rules` fail it for, in their order;
    None where it passes them all. Rows with `error` set are never judged,
    and a rule whose columns the table lacks judges nothing."""
    errors = row_errors(table)
    reasons: list[str | None] = [None] * table.num_rows
    for rule in rules:
        if any(c not in table.column_names for c in rule.columns):
            continue
        values = {c: table.column(c).to_pylist() for c in rule.columns}
        for i in range(table.num_rows):
            if errors[i] is not None:
                continue
            why = rule.reason({c: values[c][i] for c in rule.columns}, settings)
            if why is not None:
                reasons[i] = why if reasons[i] is None else reasons[i] + REASON_SEPARATOR + why
    return reasons


def reason_names(reason: str | None) -> list[str]:
    """The rule names in a `filter_reason` ("low motion: ...; text: ..." -> ["low motion", "text"])."""
    if not reason:
        return []
    return [part.split(":", 1)[0].strip() for part in reason.split(REASON_SEPARATOR) if part.strip()]


# -- the analysis family's rules ---------------------------------------------

LOW_MOTION = FilterRule(
    "low motion",
    bounds=(Bound("motion_global_mean", "motion.global_mean_threshold", "below"),
            Bound("motion_per_patch_min", "motion.per_patch_min_threshold", "below")),
    gate=("motion.mode", "enable"),
    missing="no motion data (no sampled frame carries motion vectors: intra-only or single-frame clip)")
AESTHETIC = FilterRule(
    "aesthetic", bounds=(Bound("aesthetic_score", "aesthetic.threshold", "below"),), missing="no frames to score")
