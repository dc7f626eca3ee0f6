"""reelsift's Hydra configuration: `config.yaml` and one folder per group.

This folder ships inside the wheel as the package `reelsift_conf`
(pyproject.toml maps it), so an installed `reelsift` finds its defaults
wherever it runs; in a checkout the editable install maps the same name
here.

Code that builds a stage by hand (tests, benchmarks, `scripts/gpu_check.py`,
which runs where Hydra is not installed) reads the same defaults with
`stage_args`: plain YAML, merged the way the defaults list merges it, and
checked against Hydra's own composition by tests/test_stage_registry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DIR = str(Path(__file__).resolve().parent)


def _load(path: Path) -> dict[str, Any]:
    import yaml  # PyYAML comes with Hydra and with transformers

    return yaml.safe_load(path.read_text()) or {}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def default_choice(group: str) -> str | None:
    """The option config.yaml's defaults list picks for `group`, if it is a group."""
    for entry in _load(Path(DIR) / "config.yaml").get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def node(name: str, choice: str | None = None) -> dict[str, Any]:
    """Config node `name` with its defaults: the group file `<name>/<choice>.yaml`
    (by default the one config.yaml picks), then config.yaml's own `name:`
    block on top, as `_self_` last in the defaults list does."""
    root = _load(Path(DIR) / "config.yaml")
    choice = choice or default_choice(name)
    data = _load(Path(DIR) / name / f"{choice}.yaml") if choice else {}
    return _merge(data, root.get(name) or {})


def stage_args(name: str, choice: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of the stage registered for node `name` (option
    `choice`), as a default run gives them; `overrides` replace any of them.
    Arguments the engine supplies get their plain-run value: no storage
    options, the nodes that feed the stage as configured."""
    from udfs.registry import NODES, prepare_node, spec_for
    from udfs.spec import ENGINE_KEYS

    data = node(name, choice)
    spec = spec_for(name, data)
    if spec is None or spec.impl is None:
        raise ValueError(f"config node {name!r} ({choice or data.get('name')}) names no stage class")
    args = {k: v for k, v in data.items() if k not in ENGINE_KEYS and k not in spec.engine_only}
    for key in spec.supplied:
        if key == "storage_options":
            args[key] = None
        elif key == "name":
            args[key] = data["name"]
        elif key in NODES:
            args[key] = prepare_node(key, node(key))
    args.update(overrides)
    return args
