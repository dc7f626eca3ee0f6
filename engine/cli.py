"""The Hydra application: `python -m engine input=PATH output=PATH [+experiment=NAME] [k=v ...]`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("reelsift")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
    from engine.synth import make_sample_set

    log.info("generating the built-in sample videos in %s", target)
    make_sample_set(target)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from engine.pipeline import run

    prepare_sample(cfg)
    output = job_output(cfg)
    summary = run(cfg, output=output)
    brief = {k: summary[k] for k in ("videos", "videos_ok", "videos_failed", "clips", "clips_failed",
                                     "clips_passed", "hours_in", "hours_out")}
    brief["wall_s"] = round(summary["wall_s"]["total"], 2)
    log.info("done: %s -> %s", json.dumps(brief), output)
    for err in summary["errors"]:
        log.warning("input error: %s: %s", err["uri"], err["error"])
