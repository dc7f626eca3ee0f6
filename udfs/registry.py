"""Every stage, collected from the families' `STAGES` lists.

The engine derives curate's plan, the clip schema, the table metadata and
the resume check from these entries (see `udfs.spec`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from udfs import analysis, media, models, quality, split
from udfs.analysis.rules import FilterRule
from udfs.spec import StageSpec

# Quality before motion and aesthetic: transcode judges its clips by the
# quality and motion rules, the aesthetic stage after it by its own, so a
# clip's reasons are listed in this order however they were made.
STAGES: tuple[StageSpec, ...] = (*media.STAGES, *split.STAGES, *quality.STAGES, *analysis.STAGES, *models.STAGES)

# Config nodes in pipeline order: the order planning and the resume record use.
NODES: tuple[str, ...] = tuple(dict.fromkeys(s.node for s in STAGES))

# Every filter, in the order its reasons are listed (`udfs.analysis.rules`).
FILTERS: tuple[FilterRule, ...] = tuple({r.name: r for s in STAGES for r in s.filters}.values())


def filters_of(node: str) -> tuple[FilterRule, ...]:
    """The filters of config node `node`'s stages."""
    return tuple({r.name: r for s in STAGES if s.node == node for r in s.filters}.values())


def choices(node: str) -> dict[str | None, StageSpec]:
    """The specs of config node `node`, by `choice` (None for a single-stage node)."""
    return {s.choice: s for s in STAGES if s.node == node}


def spec_for(node: str, params: Mapping[str, Any]) -> StageSpec | None:
    """The spec a config node selects (by its `name` for a group), or None when
    the node names no stage (`embed: none`); an unknown name raises."""
    options = choices(node)
    if not options:
        raise KeyError(f"no stage is registered for config node {node!r}")
    if None in options:
        return options[None]
    name = params.get("name")
    if name in options:
        return options[name]
    spec = next(iter(options.values()))
    if spec.switch and spec.switch == ("name", name):
        return None
    known = sorted(c for c in options if c) + ([spec.switch[1]] if spec.switch and spec.switch[0] == "name" else [])
    raise ValueError(f"unknown {node}={name!r}; choose one of {known}")


def prepare_node(node: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Config node `node` as its workers get it: checked and resolved by its
    spec's `prepare` hook (on the driver, before any video is decoded)."""
    spec = spec_for(node, data)
    if spec is None or not spec.prepare or not spec.is_on(data):
        return dict(data)
    module, _, function = spec.prepare.partition(":")
    return getattr(importlib.import_module(module), function)(data)
