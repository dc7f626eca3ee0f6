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

from engine.stages import node_dict

# Schema metadata key of the clip table holding `clip_settings` as JSON.
SETTINGS_KEY = "reelsift.clip_settings"

# Config nodes whose settings shape the clips and their columns.
CLIP_NODES = ("split", "transcode", "preview", "motion", "frames", "aesthetic", "embed", "caption")

# Keys that change speed, placement or memory, never the output.
RUNTIME_KEYS = frozenset({
    "resources", "storage_options", "threads", "decode_threads", "decode_workers", "prefetch_videos",
    "torch_threads", "batch_size", "frame_batch_size", "model_batch_size", "gpu_decode", "video_workers",
    "thread_type",
})

# The key that turns a node off, and the value meaning "off"; an off node's
# other settings do not matter.
_SWITCHES = {"preview": ("enabled", False), "aesthetic": ("enabled", False), "embed": ("name", "none"),
             "caption": ("name", "none"), "motion": ("mode", "disable")}


class ResumeError(RuntimeError):
    """The output cannot be resumed with this config."""


def clip_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of `cfg` that define the clips, as flat dotted keys."""
    nodes = {name: node_dict(cfg, name) for name in CLIP_NODES}
    active = {name: _is_on(name, data) for name, data in nodes.items()}
    # Frames are extracted only for the model stages (motion is scored from
    # the transcode's own packets).
    active["frames"] = any(active[n] for n in ("aesthetic", "embed", "caption"))
    out: dict[str, Any] = {}
    for name, data in nodes.items():
        if not active[name]:
            key, _ = _SWITCHES.get(name, (None, None))
            data = {key: data[key]} if key in data else {}
        _flatten(data, name, out)
    return out


def _is_on(name: str, data: dict[str, Any]) -> bool:
    if name not in _SWITCHES:
        return True
    key, off = _SWITCHES[name]
    return data.get(key, off) != off


def _flatten(data: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in RUNTIME_KEYS:
                _flatten(value, f"{prefix}.{key}", out)
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
