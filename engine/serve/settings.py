"""The `serve` config node, and the filter settings the thresholds panel starts from.

Defaults live in conf/config.yaml only: code that has no config of its own
(tests, notebooks) composes the default one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class MapSettings:
    max_points: int
    bins: int
    fit_rows: int
    umap: str | bool
    seed: int
    on_index: bool


@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    allow_remote: bool
    read_only: bool
    page_size: int
    model: str | None
    device: str
    max_body_bytes: int
    max_label_ids: int
    warm_up: bool
    map: MapSettings

    @classmethod
    def from_config(cls, node: DictConfig | dict[str, Any]) -> ServeSettings:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown serve settings {sorted(unknown)}; known: {sorted(known)}")
        values["map"] = MapSettings(**values["map"])
        return cls(**values)


def default_config(*overrides: str) -> DictConfig:
    """The project's composed config (conf/config.yaml and its defaults)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from engine.cli import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def filter_settings(cfg: DictConfig, root: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{node: settings} of every config node a registered filter reads, as
    task=filter takes them (`engine.filter.task.filter_settings`), with the
    thresholds the last task=filter on the output at `root` applied over them:
    the panel starts where the table's `passed` was decided."""
    from engine.filter.task import filter_settings as of_config
    from engine.filter.task import read_applied
    from engine.serve.thresholds import set_key

    settings = of_config(cfg)
    applied = read_applied(root, storage_options) if root else None
    for key, value in (applied or {}).items():
        set_key(settings, key, value)
    return settings
