"""The Hydra application: `python -m engine [task=NAME] input=PATH output=PATH [+experiment=NAME] [k=v ...]`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

import reelsift_conf
from engine.curate.report import no_clips_reason

log = logging.getLogger("reelsift")

CONFIG_DIR = reelsift_conf.DIR

# The curate summary's headline numbers, for the log line at the end.
CURATE_BRIEF = ("videos", "videos_ok", "videos_failed", "clips", "clips_failed", "clips_passed", "hours_in", "hours_out")


def job_output(cfg: DictConfig) -> str:
    """Each job of a multirun sweep writes under its own numbered folder."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return os.path.join(str(cfg.output), f"job{hc.job.num}")
    return str(cfg.output)


def prepare_sample(cfg: DictConfig) -> None:
    """Generate the built-in sample videos on first use: nothing is downloaded."""
    if not cfg.get("generate_sample"):
        return
    target = Path(str(cfg.input))
    if target.is_dir() and any(target.iterdir()):
        return
    from engine.sample import make_sample_set

    log.info("generating the built-in sample videos in %s", target)
    make_sample_set(target)


def log_summary(task: str, summary: dict, output: str) -> None:
    if task == "curate":
        log_curate_report(summary, output)
        return
    brief = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    if isinstance(summary.get("exports"), dict):
        brief["exports"] = summary["exports"]  # where each format went
    log.info("%s done: %s -> %s", task, json.dumps(brief, default=str), output)


def log_curate_report(summary: dict, output: str) -> None:
    """The end-of-run report: counts, why clips were filtered, the input
    errors by cause with a hint each, the stage times, where the output is."""
    brief = {k: summary[k] for k in CURATE_BRIEF}
    brief["wall_s"] = round(summary["wall_s"]["total"], 2)
    log.info("done: %s -> %s", json.dumps(brief), output)
    for reason, count in (summary.get("filter_reasons") or {}).items():
        log.info("filtered: %d clips: %s", count, reason)
    for group in summary.get("error_groups") or []:
        example = group["examples"][0]
        log.warning("input errors: %d x %s (e.g. %s: %s). Hint: %s", group["count"], group["cause"],
                    example["uri"], example["error"], group["hint"])
    busy = {name: round(float(t.get("busy_s", 0.0)), 2) for name, t in (summary.get("stages") or {}).items()
            if isinstance(t, dict)}
    if busy:
        log.info("stage busy seconds: %s", json.dumps(busy))
    log.info("output: %s (clips.lance, videos.lance, summary.json)", output)


class NoClipsError(SystemExit):
    """A run that had inputs and made no clip: the process exits non-zero."""


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from engine.tasks import READS_VIDEOS, run_tasks, task_steps

    if READS_VIDEOS.intersection(task_steps(cfg)):
        prepare_sample(cfg)
    with open_dict(cfg):
        cfg.output = job_output(cfg)
    summaries = run_tasks(cfg, after=lambda name, summary: log_summary(name, summary, str(cfg.output)))
    reason = no_clips_reason(summaries["curate"]) if "curate" in summaries else None
    if reason:
        log.error("no clips: %s", reason)
        raise NoClipsError(2)
