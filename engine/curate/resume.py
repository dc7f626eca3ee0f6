"""What makes a resumed run's clips the same as a clean run's: the settings
that define the clips, recorded with the clip table and checked on resume.

A run that resumes an output adds clips to a table that earlier runs began.
If the split, transcode, preview or analysis settings changed in between,
the table would mix clips made two ways, so the run refuses, naming the
settings that changed, unless forced (`resume=force`). Settings that only
change how fast the work runs (resources, threads, batch sizes) are not
recorded.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from engine.runtime.stages import node_dict
from udfs.registry import NODES, choices, spec_for
from udfs.spec import StageSpec

# Schema metadata key of the clip table holding `clip_settings` as JSON.
SETTINGS_KEY = "reelsift.clip_settings"

class ResumeError(RuntimeError):
    """The output cannot be resumed with this config."""


def clip_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of `cfg` that define the clips, as flat dotted keys.

    Derived from the stage registry: every registered node's keys except its
    runtime keys; an off stage records only its switch. The clip decode's
    settings matter only while a stage that takes its frames is on."""
    nodes = {name: node_dict(cfg, name) for name in NODES if cfg.get(name) is not None}
    specs = {name: spec_for(name, data) for name, data in nodes.items()}
    active = {name: spec is not None and spec.is_on(nodes[name]) for name, spec in specs.items()}
    wants_frames = any(active[n] and spec.frames for n, spec in specs.items() if spec)
    out: dict[str, Any] = {}
    for name, data in nodes.items():
        spec = specs[name]
        on = active[name] and (wants_frames if spec.serves_frames else True)
        if not on:
            key = _switch_key(name, spec)
            data = {key: data[key]} if key in data else {}
        _flatten(data, name, out, spec.runtime() if spec else frozenset())
    return out


def _switch_key(node: str, spec: StageSpec | None) -> str | None:
    if spec is not None and spec.switch:
        return spec.switch[0]
    # A group node set to its "none" choice (no spec): its switch is `name`.
    return next((s.switch[0] for s in choices(node).values() if s.switch), None)


def _flatten(data: Any, prefix: str, out: dict[str, Any], runtime: frozenset[str]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in runtime:
                _flatten(value, f"{prefix}.{key}", out, runtime)
    else:
        out[prefix] = data


def encode(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (recorded, current) for every key that differs."""
    keys = sorted(set(recorded) | set(current))
    return {k: (recorded.get(k), current.get(k)) for k in keys if recorded.get(k) != current.get(k)}


def check_resumable(output: str, recorded_json: str | None, current: dict[str, Any], *, force: bool) -> None:
    """Raise `ResumeError` when `output`'s clips were made with other settings.

    `recorded_json` is what the clip table recorded (None: an output written
    before resume existed). `force` lets the run continue anyway."""
    if recorded_json is None:
        if force:
            return
        raise ResumeError(
            f"{output} holds clips without a record of the settings that made them (written by an older "
            "reelsift), so a resumed run cannot know it would add matching clips. Pass overwrite=true to start "
            "over, or resume=force to add to it anyway.")
    changes = changed_settings(json.loads(recorded_json), current)
    if not changes or force:
        return
    listed = ", ".join(f"{k} ({_show(old)} -> {_show(new)})" for k, (old, new) in changes.items())
    raise ResumeError(
        f"{output} was curated with different clip settings: {listed}. Resuming would mix clips made two ways. "
        "Pass overwrite=true to start over with the new settings, or resume=force to keep the clips already "
        "made and add the rest with the new settings.")


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, default=str)


def resume_mode(cfg: DictConfig) -> tuple[bool, bool]:
    """(resume, force) from `cfg.resume` (true | false | force)."""
    value = cfg.get("resume", True)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "force":
            return True, True
        if lowered in ("true", "false"):
            return lowered == "true", False
        raise ValueError(f"resume={value!r}: use true, false or force")
    return bool(value), False
