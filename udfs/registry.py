"""Every stage, collected from the families' `STAGES` lists.

The engine derives curate's plan, the clip schema, the table metadata and
the resume check from these entries (see `udfs.spec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from udfs import analysis, media, models, split
from udfs.spec import StageSpec

STAGES: tuple[StageSpec, ...] = (*media.STAGES, *split.STAGES, *analysis.STAGES, *models.STAGES)

# Config nodes in pipeline order: the order planning and the resume record use.
NODES: tuple[str, ...] = tuple(dict.fromkeys(s.node for s in STAGES))


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
