"""Starting or joining Ray, once per process, with the settings a long run
relies on to survive lost workers and nodes.

Ray Data already retries what a lost worker or node was doing: tasks are
retried without limit on system failures (a worker or node died), actor
pools restart their actors without limit and retry their tasks. What it
does not retry is an exception raised by a stage: the stages record bad
input as error rows instead of raising, so a raise is a bug and fails the
block. `ray.max_errored_blocks` (default 0) is how many such blocks a run may
lose before it fails; the videos of a lost block are not committed, and the
same command again redoes them (see docs/resilience.md).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from typing import Any

import ray

from engine.runtime.private_apis import PrivateApiChanged, local_monitor_processes

log = logging.getLogger(__name__)


def missing_bytecode() -> bool:
    """True when Ray's modules have no compiled bytecode and Python will not
    write any: then every process (the driver, each Ray daemon and worker)
    compiles its imports from source, seconds of CPU each. uv installs
    without bytecode unless asked (`--compile-bytecode`), and container
    images often set PYTHONDONTWRITEBYTECODE."""
    if not sys.dont_write_bytecode:
        return False
    source = ray.__file__
    return not (source and os.path.exists(importlib.util.cache_from_source(source)))


# Warnings our dependencies raise about their own internals, with nothing a
# user can do about them: Ray Data's DataContext sets its own deprecated
# fields when copied; Lance calls its own deprecated DataFile.path(); Ray
# Data's advice to raise `override_num_blocks` for a one-video read.
DEPENDENCY_NOISE = (
    (DeprecationWarning, r"`use_polars` is deprecated"),
    (DeprecationWarning, r"`use_arrow_tensor_v2` is deprecated"),
    (DeprecationWarning, r"`use_push_based_shuffle` is deprecated"),
    (DeprecationWarning, r"DataFile\.path\(\) is deprecated"),
    (UserWarning, r"The maximum number of concurrent tasks for .* is less than the concurrency limit"),
)


def quiet_dependency_noise() -> None:
    """Ignore the warnings in `DEPENDENCY_NOISE`, and Ray Data's note that its
    progress bars are off (the way back is `log.ray_progress=true`, not the
    DataContext field it names); every other warning passes."""
    for category, message in DEPENDENCY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if _progress_note not in progress_logger.filters:
        progress_logger.addFilter(_progress_note)


def _progress_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Progress bars disabled")


def ensure_ray(ray_cfg: Any, *, progress_bars: bool = False) -> None:
    """Join `ray_cfg.address`, or start a local Ray; reuse one already up
    (tests and multirun sweeps share one session). `progress_bars`: Ray
    Data's own, per operator (`log.ray_progress`)."""
    quiet_dependency_noise()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.max_errored_blocks = int(ray_cfg.get("max_errored_blocks", 0) or 0)
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
        spare = ray_cfg.get("spare_workers")
        if spare is not None:
            cpus = ray_cfg.get("num_cpus") or os.cpu_count() or 1
            kwargs["_system_config"] = {"num_workers_soft_limit": int(cpus) + int(spare)}
    if missing_bytecode():
        log.warning("the Python packages have no compiled bytecode and PYTHONDONTWRITEBYTECODE is set: every Ray "
                    "worker compiles Ray, Ray Data and pandas from source at start-up (seconds of CPU each). "
                    "Install with `uv pip install --compile-bytecode` (UV_COMPILE_BYTECODE=1) or run "
                    "`python -m compileall` over site-packages")
    log.info("starting Ray: %s", kwargs)
    ray.init(**kwargs)
    if kwargs.get("address") == "local":
        # Registered after Ray's own exit hook, so it runs first.
        atexit.register(stop_local_ray)


def stop_local_ray() -> None:
    """Stop the Ray this process started, ~1.5 s sooner than Ray's own exit
    hook, which first sleeps 0.5 s, then terminates its processes one by one
    and gives each up to a second: the autoscaler monitor, terminated after
    the GCS, spends that whole second trying to tell the GCS it was stopped.
    The monitor holds nothing a finished local run needs, so it is killed
    first. Every command paid this on exit, on top of the work."""
    if not ray.is_initialized():
        return
    try:
        monitors = local_monitor_processes()
    except PrivateApiChanged as exc:
        log.debug("stopping Ray the slow way: %s", exc)
        monitors = []
    for process in monitors:
        if process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:  # Ray's shutdown below kills and reaps it anyway
                pass
    ray.shutdown()


def cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def largest_node_cpus() -> float:
    """CPUs of the cluster's largest live node (what one node's tasks share)."""
    return max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=1.0) or 1.0


def driver_node_strategy() -> Any:
    """Scheduling that keeps an actor on the driver's node: a run's
    bookkeeping actors must outlive any worker node, and when the driver's
    node goes the run goes with it anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
