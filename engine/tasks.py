"""The tasks `python -m engine` can run, and running several in a row.

Each task is a package of `engine` with `run(cfg) -> summary`. A run's
`task.steps` lists the tasks to run, in order, on one output folder and one
Ray session (`task=dedup` is `[dedup]`; `+experiment=full` chains several).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Task name -> the module whose `run(cfg)` does it. Tasks that read input
# videos need `input`; every task works on `output`.
TASKS: dict[str, str] = {
    "curate": "engine.curate",
    "export": "engine.export",
    "dedup": "engine.dedup",
    "filter": "engine.filter",
    "index": "engine.index",
    "search": "engine.search",
    "serve": "engine.serve",
    "compact": "engine.compact",
}
READS_VIDEOS = frozenset({"curate"})


def task_runner(name: str) -> Callable[[DictConfig], dict[str, Any]]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).run


def task_steps(cfg: DictConfig) -> list[str]:
    steps = [str(s) for s in cfg.task.steps]
    if not steps:
        raise ValueError("task.steps is empty: name at least one task")
    for name in steps:
        task_runner(name)  # unknown names fail before the first task starts
    return steps


def run_tasks(cfg: DictConfig,
              after: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every task of `cfg.task.steps` on `cfg.output`, calling `after`
    with each one's summary as it finishes; the summaries by task name."""
    summaries: dict[str, dict[str, Any]] = {}
    for name in task_steps(cfg):
        log.info("task %s: %s", name, cfg.output)
        summaries[name] = task_runner(name)(cfg)
        if after:
            after(name, summaries[name])
    return summaries
