"""Starting or joining Ray, once per process."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

log = logging.getLogger(__name__)


def ensure_ray(ray_cfg: Any) -> None:
    """Join `ray_cfg.address`, or start a local Ray; reuse one already up
    (tests and multirun sweeps share one session)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(ray_cfg.get("progress", True))
    if ray.is_initialized():
        return
    address = ray_cfg.get("address")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    elif os.environ.get("RAY_ADDRESS"):
        pass  # a RayJob (or the user) named the cluster: join it as `ray.init()` does
    else:
        # Without an address, ray.init() would join any cluster a `ray start`
        # left on this machine; a run that did not ask for one gets its own.
        kwargs["address"] = "local"
        for key in ("num_cpus", "num_gpus", "object_store_memory"):
            if ray_cfg.get(key) is not None:
                kwargs[key] = ray_cfg.get(key)
    log.info("starting Ray: %s", kwargs)
    ray.init(**kwargs)


def cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
