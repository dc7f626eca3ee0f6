"""The thresholds panel: clips and hours kept at any threshold, from the
filter rules themselves (`udfs.registry.FILTERS`, `udfs.analysis.rules`).

There is one slider per `Bound` of a rule whose columns the table has (a rule
missing any of its columns judges nothing, as in `judge`), so a new score
column with a rule shows up without touching the UI. The count is what
`judge` (and so `task=filter`) gives at those settings: a row is kept when it
has no error and no rule fails it.

While one slider moves, every other rule's verdict is fixed: the rows those
leave are sorted once by the moving bound's column, with cumulative
durations, and each position of the slider is a binary search (O(log n), no
scan). Moving another slider, or changing a setting, builds that slider's
arrays once (an O(n) pass and a sort).
"""

from __future__ import annotations

import copy
import shlex
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from engine.serve.columns import TableColumns, finite_number
from udfs.analysis.rules import Bound, FilterRule, setting

HISTOGRAM_BINS = 40
EXAMPLES = 4
CACHE_ENTRIES = 32


@dataclass(frozen=True)
class Slider:
    rule: FilterRule
    bound: Bound


@dataclass
class _Sorted:
    """One slider's rows (those every other rule keeps), by its column."""

    values: np.ndarray      # ascending, no NaN
    positions: np.ndarray   # row positions, in that order
    cum_s: np.ndarray       # cumulative durations, len + 1
    free: int               # rows it cannot fail (null / NaN score, or not judging)
    free_s: float


def set_key(settings: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    node, *path = key.split(".")
    target = settings.setdefault(node, {})
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def cli_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _distinct_rows(codes: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows of the code columns, each row's index into them). The
    columns are folded into one int64 key where their sizes allow (a sort of
    n integers; np.unique over rows sorts n tuples, several times slower)."""
    span = 1
    for size in sizes:
        span *= size + 1
    if span < 2 ** 62:
        key = np.zeros(len(codes[0]), dtype=np.int64)
        for c, size in zip(codes, sizes):
            key = key * (size + 1) + (c + 1)
        keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return np.stack([c[first] for c in codes], axis=1), inverse
    return np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)


def parse_check_value(key: str, raw: str, base: Any) -> Any:
    """A check rule's setting from the panel: empty / "null" for none, a
    list of names ("complex, zoom_out") where the setting is a list (or the
    text is not a number), else a number."""
    raw = raw.strip()
    if raw.lower() in ("", "null", "none", "[]"):
        return None
    text = raw.strip("[]")
    if isinstance(base, (list, tuple)):
        return [v.strip() for v in text.split(",") if v.strip()]
    try:
        value = float(text)
    except ValueError:
        return [v.strip() for v in text.split(",") if v.strip()]
    if not np.isfinite(value):
        raise ValueError(f"{key}: {raw!r} is not a finite number")
    return value


class Thresholds:
    """Kept counts of one table version under the registered filters."""

    def __init__(self, cols: TableColumns, rules: Sequence[FilterRule], settings: Mapping[str, Mapping[str, Any]]) -> None:
        self.cols = cols
        self.rules = tuple(r for r in rules if cols.has(*r.columns))
        self.base = copy.deepcopy({k: dict(v) for k, v in settings.items()})
        self.sliders = [Slider(r, b) for r in self.rules for b in r.bounds]
        self._lock = threading.Lock()
        self._sorted: OrderedDict[tuple[Any, ...], _Sorted] = OrderedDict()
        self._checks: dict[tuple[Any, ...], np.ndarray] = {}
        self._orders: dict[str, np.ndarray] = {}
        self._histograms: dict[str, dict[str, Any]] = {}
        self._fails: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._prepared = False

    # ------------------------------------------------------------ the data
    def _prepare(self) -> None:
        if self._prepared:
            return
        names = sorted({c for r in self.rules for c in r.columns})
        self.ok = self.cols.ok()
        self.dur = self.cols.durations()
        self.null = {c: pc.is_null(self.cols.column(c)).to_numpy(zero_copy_only=False) for c in names}
        self.vals = {b.column: self.cols.numeric(b.column) for r in self.rules for b in r.bounds}
        self._prepared = True

    def gates(self) -> list[str]:
        return list(dict.fromkeys(r.gate[0] for r in self.rules if r.gate))

    def check_keys(self) -> list[str]:
        """The settings of rules that judge by a check of their own, not a
        bound (bar fraction, rejected camera motions): inputs, not sliders."""
        return list(dict.fromkeys(k for r in self.rules if r.check is not None for k in r.extra_keys))

    def settings_from(self, params: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The base settings with the sliders' and gates' keys from `params`
        (a number, or empty / "null" for no threshold)."""
        settings = copy.deepcopy(self.base)
        for key in {s.bound.key for s in self.sliders}:
            if key in params:
                raw = str(params[key]).strip()
                if raw.lower() in ("", "null", "none"):
                    set_key(settings, key, None)
                else:
                    set_key(settings, key, finite_number(key, raw))
        for key in self.gates():
            if key in params:
                set_key(settings, key, str(params[key]))
        for key in self.check_keys():
            if key in params:
                set_key(settings, key, parse_check_value(key, str(params[key]), setting(self.base, key)))
        return settings

    def _check_fails(self, rule: FilterRule, settings: Mapping[str, Any]) -> np.ndarray:
        """The rows `rule.check` fails, cached per value of its keys. The
        check is a Python function of a row, so it is called once per
        distinct combination of its columns' values (a handful: camera
        labels, bar sizes), not once per row."""
        key = (rule.name, tuple(repr(setting(settings, k)) for k in rule.extra_keys))
        with self._lock:
            if key in self._checks:
                return self._checks[key]
        table = self.cols.table(list(rule.columns))
        codes, uniques = [], []
        for c in rule.columns:
            encoded = pc.dictionary_encode(table.column(c).combine_chunks())
            codes.append(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64))
            uniques.append(encoded.dictionary.to_pylist())
        combos, inverse = _distinct_rows(codes, [len(u) for u in uniques])
        verdict = np.array([rule.check({c: (uniques[j][code] if code >= 0 else None)
                                        for j, (c, code) in enumerate(zip(rule.columns, combo))}, settings) is not None
                            for combo in combos.tolist()], dtype=bool)
        fails = verdict[inverse.ravel()] & self.ok if len(combos) else np.zeros(len(self.ok), dtype=bool)
        with self._lock:
            self._checks[key] = fails
        return fails

    def _bound_fails(self, bound: Bound, threshold: float) -> np.ndarray:
        v = self.vals[bound.column]
        with np.errstate(invalid="ignore"):
            return v < threshold if bound.fails == "below" else v > threshold

    def _rule_fails(self, rule: FilterRule, settings: Mapping[str, Any], skip: Bound | None = None) -> np.ndarray:
        n = len(self.ok)
        if not rule.judges(settings):
            return np.zeros(n, dtype=bool)
        active = [(b, setting(settings, b.key)) for b in rule.bounds]
        active = [(b, float(t)) for b, t in active if t is not None]
        fails = np.zeros(n, dtype=bool)
        if active and rule.missing:
            missing = np.ones(n, dtype=bool)
            for b, _ in active:
                missing &= self.null[b.column]
            fails |= missing
        for b, t in active:
            if b != skip:
                fails |= self._bound_fails(b, t)
        if rule.check is not None:
            fails |= self._check_fails(rule, settings)
        return fails & self.ok

    def _order_of(self, column: str) -> np.ndarray:
        """Row positions of the column's numbers, ascending (NaN left out)."""
        with self._lock:
            if column in self._orders:
                return self._orders[column]
        v = self.vals[column]
        at = np.flatnonzero(~np.isnan(v))
        order = at[np.argsort(v[at], kind="stable")]
        with self._lock:
            self._orders[column] = order
        return order

    def prepare_sorts(self) -> None:
        """Sort every slider's column now (the server's warm-up), so a slider
        taking the focus picks its rows out of a sorted array, no sort."""
        self._prepare()
        for column in dict.fromkeys(s.bound.column for s in self.sliders):
            self._order_of(column)

    def _rule_fails_cached(self, rule: FilterRule, settings: Mapping[str, Any], skip: Bound | None) -> np.ndarray:
        """`_rule_fails`, kept per rule and the values of its own keys: moving
        one slider reuses every other rule's verdicts."""
        # The skipped bound's own value does not count, only whether it is set (see `missing`).
        key = (rule.name, skip.key if skip else None,
               tuple(repr(setting(settings, k) is None) if skip and k == skip.key else repr(setting(settings, k))
                     for k in rule.keys))
        with self._lock:
            if key in self._fails:
                self._fails.move_to_end(key)
                return self._fails[key]
        fails = self._rule_fails(rule, settings, skip=skip)
        with self._lock:
            self._fails[key] = fails
            while len(self._fails) > 4 * CACHE_ENTRIES:
                self._fails.popitem(last=False)
        return fails

    def kept_mask(self, settings: Mapping[str, Any]) -> np.ndarray:
        """Rows no rule fails and without error: `judge` gives them None."""
        self._prepare()
        kept = self.ok.copy()
        for rule in self.rules:
            kept &= ~self._rule_fails_cached(rule, settings, None)
        return kept

    # --------------------------------------------------------- the sliders
    def _sorted_for(self, slider: Slider, settings: Mapping[str, Any]) -> _Sorted:
        others = tuple(sorted((k, repr(setting(settings, k))) for r in self.rules for k in r.keys
                              if k != slider.bound.key))
        key = (slider.rule.name, slider.bound.key, others, setting(settings, slider.bound.key) is None)
        with self._lock:
            if key in self._sorted:
                self._sorted.move_to_end(key)
                return self._sorted[key]
        keep = self.ok.copy()
        for rule in self.rules:
            keep &= ~self._rule_fails_cached(rule, settings, slider.bound if rule is slider.rule else None)
        v = self.vals[slider.bound.column]
        judged = keep & ~np.isnan(v) & slider.rule.judges(settings)
        free = keep & ~judged
        # The column's rows sorted once; here only those judged are picked out (no sort).
        by_value = self._order_of(slider.bound.column)
        order = by_value[judged[by_value]]
        entry = _Sorted(values=v[order], positions=order,
                        cum_s=np.concatenate([[0.0], np.cumsum(self.dur[order])]),
                        free=int(free.sum()), free_s=float(self.dur[free].sum()))
        with self._lock:
            self._sorted[key] = entry
            while len(self._sorted) > CACHE_ENTRIES:
                self._sorted.popitem(last=False)
        return entry

    def at(self, slider: Slider, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Kept clips and seconds with `slider` at its value in `settings`,
        and the rows just below and just above its cut."""
        self._prepare()
        s = self._sorted_for(slider, settings)
        t = setting(settings, slider.bound.key)
        n = len(s.values)
        if t is None:
            cut = 0 if slider.bound.fails == "below" else n
        else:
            side = "left" if slider.bound.fails == "below" else "right"
            cut = int(np.searchsorted(s.values, float(t), side=side))
        if slider.bound.fails == "below":  # the rows under the cut fail
            kept, kept_s = s.free + n - cut, s.free_s + float(s.cum_s[-1] - s.cum_s[cut])
        else:
            kept, kept_s = s.free + cut, s.free_s + float(s.cum_s[cut])
        below = s.positions[max(0, cut - EXAMPLES):cut]
        above = s.positions[cut:cut + EXAMPLES]
        return {"kept": kept, "kept_s": kept_s, "below": self._examples(below, slider), "above": self._examples(above, slider)}

    def _examples(self, positions: np.ndarray, slider: Slider) -> list[dict[str, Any]]:
        ids = self.cols.ids(positions)
        values = self.vals[slider.bound.column][positions].tolist()
        return [{"clip_id": i, "value": v} for i, v in zip(ids, values)]

    def histogram(self, column: str) -> dict[str, Any]:
        """The column's histogram over the clips without error (the same at every setting: kept once)."""
        self._prepare()
        with self._lock:
            if column in self._histograms:
                return self._histograms[column]
        answer = self._histogram(column)
        with self._lock:
            self._histograms[column] = answer
        return answer

    def _histogram(self, column: str) -> dict[str, Any]:
        v = self.vals[column][self.ok]
        v = v[np.isfinite(v)]
        if not len(v):
            return {"lo": None, "hi": None, "counts": []}
        lo, hi = float(v.min()), float(v.max())
        counts, _ = np.histogram(v, bins=HISTOGRAM_BINS, range=(lo, hi if hi > lo else lo + 1e-9))
        return {"lo": lo, "hi": hi, "counts": counts.tolist()}

    def command(self, output: str, settings: Mapping[str, Any]) -> str:
        # Every key of the rules judging here (a check's own keys too), so the
        # line decides as this panel does whatever the config it runs with says.
        keys = list(dict.fromkeys([*self.gates(), *(s.bound.key for s in self.sliders),
                                   *(k for r in self.rules for k in r.keys)]))
        parts = ["python", "-m", "engine", "task=filter", f"output={output}"]
        parts += [f"{k}={cli_value(setting(settings, k))}" for k in keys]
        return " ".join(shlex.quote(p) for p in parts)

    def answer(self, params: Mapping[str, str], output: str) -> dict[str, Any]:
        """The panel's state at the settings in `params`; `focus` names the
        slider whose examples and (binary-searched) count come back."""
        self._prepare()
        settings = self.settings_from(params)
        focus_key = params.get("focus") or (self.sliders[0].bound.key if self.sliders else None)
        focus = next((s for s in self.sliders if s.bound.key == focus_key), None)
        if focus_key and focus is None:
            raise ValueError(f"no slider {focus_key!r}; the sliders: {[s.bound.key for s in self.sliders]}")
        out: dict[str, Any] = {
            "rows": len(self.ok), "ok_rows": int(self.ok.sum()), "total_s": float(self.dur[self.ok].sum()),
            "gates": {k: setting(settings, k) for k in self.gates()},
            "checks": [{"key": k, "rule": next(r.name for r in self.rules if k in r.extra_keys),
                        "value": setting(settings, k)} for k in self.check_keys()],
            "sliders": [{"key": s.bound.key, "column": s.bound.column, "rule": s.rule.name, "fails": s.bound.fails,
                         "value": setting(settings, s.bound.key),
                         "gate": list(s.rule.gate) if s.rule.gate else None,
                         "judging": s.rule.judges(settings)} for s in self.sliders],
            "command": self.command(output, settings),
        }
        if focus is not None:
            at = self.at(focus, settings)
            out.update(kept=at["kept"], kept_s=at["kept_s"],
                       focus={"key": focus.bound.key, "below": at["below"], "above": at["above"]})
        else:
            kept = self.kept_mask(settings)
            out.update(kept=int(kept.sum()), kept_s=float(self.dur[kept].sum()), focus=None)
        if params.get("histograms", "1") != "0":
            for entry in out["sliders"]:
                entry["histogram"] = self.histogram(entry["column"])
        return out
