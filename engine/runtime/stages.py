"""How a stage becomes a Ray Data step: its class, arguments and resources
from a config node, pool sizing that fits the cluster, and `map_batches`.

Every task that runs stages over a table (curate, dedup, ...) plans
`StageStep`s from its config nodes and applies them here, so resource
handling and timing work the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from omegaconf import DictConfig, OmegaConf
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from engine.runtime.timing import timed

log = logging.getLogger(__name__)

# Keys of a stage's config node that are for the engine, not the stage.
ENGINE_KEYS = ("name", "resources", "enabled")


def load_class(path: str) -> type:
    """`"package.module:Name"` -> the class, importing the module only now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def node_dict(cfg: DictConfig, key: str) -> dict[str, Any]:
    """Config node `key` as a plain dict ({} when absent)."""
    node = cfg.get(key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def stage_params(node: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments in a stage's config node."""
    return {k: v for k, v in node.items() if k not in ENGINE_KEYS}


@dataclass
class StageStep:
    """One `map_batches` step: which class, its arguments, its resources."""

    name: str
    cls: type
    params: dict[str, Any]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int | None = 1
    concurrency: int | None = None
    # Stateless stages run as plain Ray tasks: no actor start-up, and they
    # reuse Ray's warm workers. Stages that load models keep an actor pool.
    actors: bool = True
    # Items this stage sees at most in parallel (videos for video-level
    # stages); None when it works on clips, whose count is not known upfront.
    max_parallel: int | None = None
    # Whether Ray Data may fuse the step with its neighbours. A fused step
    # takes the largest batch of the two, so a per-video stage fused with a
    # per-clip stage would get several videos per task.
    fuse: bool = True
    extra_fields: list[pa.Field] = field(default_factory=list)

    @classmethod
    def from_node(cls, name: str, impl: str | type, node: DictConfig | dict, *, params: dict[str, Any] | None = None,
                  extra_fields: list[pa.Field] | None = None, max_parallel: int | None = None) -> StageStep:
        data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        resources = data.get("resources") or {}
        args = stage_params(data)
        if params:
            args.update(params)
        return cls(
            name=name,
            cls=load_class(impl) if isinstance(impl, str) else impl,
            params=args,
            num_cpus=float(resources.get("num_cpus", 1) or 0),
            num_gpus=float(resources.get("num_gpus", 0) or 0),
            batch_size=resources.get("batch_size", 1),
            concurrency=resources.get("concurrency"),
            actors=bool(resources.get("actors", True)),
            max_parallel=max_parallel,
            extra_fields=list(extra_fields or []),
        )


def worker_slots(step: StageStep, cpus: float, gpus: float) -> int:
    """How many of `step`'s workers the cluster holds at once (0 when not one):
    the fewer of its GPU and CPU slots, so a small GPU share (a decode token
    of 0.02) does not count hundreds of workers the CPUs cannot run."""
    by_cpu = int(cpus // step.num_cpus) if step.num_cpus > 0 else int(cpus)
    if step.num_gpus > 0:
        by_gpu = int(gpus // step.num_gpus)
        return min(by_gpu, by_cpu) if step.num_cpus > 0 else by_gpu
    return by_cpu


def actor_pool(step: StageStep, cpus: float, gpus: float) -> ActorPoolStrategy:
    if step.concurrency:
        return ActorPoolStrategy(size=int(step.concurrency))
    limit = worker_slots(step, cpus, gpus)
    upper = max(1, min(limit, step.max_parallel or limit))
    # Autoscaling from one actor lets concurrent stages share the cluster.
    return ActorPoolStrategy(min_size=1, max_size=upper)


def check_gpus(steps: list[StageStep], gpus: float) -> None:
    """A stage configured for GPUs must not silently run on a CPU-only cluster."""
    for step in steps:
        if step.num_gpus > 0 and gpus <= 0:
            raise RuntimeError(f"stage {step.name} asks for {step.num_gpus} GPU per worker but the cluster has none; "
                               f"set {step.name}.resources.num_gpus=0 to run it on CPU")


def fit_to_cluster(steps: list[StageStep], cpus: float, gpus: float) -> list[StageStep]:
    """Scale per-worker CPU/GPU requests so every stage's smallest pool fits
    the cluster at once.

    Streaming stages run concurrently; if their minimum pools ask for more
    than the cluster has, downstream actors can hold the CPUs while upstream
    ones wait for them, and the job deadlocks. Requests are logical, so on a
    small machine this means stages share cores; on a big cluster it is a
    no-op."""
    def need(kind: str) -> float:
        return sum(getattr(s, kind) * (s.concurrency or 1) for s in steps)

    scaled = []
    cpu_factor = min(1.0, 0.95 * cpus / need("num_cpus")) if need("num_cpus") else 1.0
    gpu_factor = min(1.0, gpus / need("num_gpus")) if need("num_gpus") else 1.0
    for step in steps:
        scaled.append(dataclasses.replace(step, num_cpus=step.num_cpus * cpu_factor,
                                          num_gpus=step.num_gpus * gpu_factor))
    if cpu_factor < 1.0 or gpu_factor < 1.0:
        log.info("stage resources scaled to fit the cluster (CPU x%.2f, GPU x%.2f)", cpu_factor, gpu_factor)
    return scaled


def _task_fn(name: str) -> Callable[..., pa.Table]:
    """Task-mode entry point, named after the stage: Ray Data names its
    operator (logs, progress, dashboard) after the function it maps."""

    def call(batch: pa.Table, *, stage: type, params: dict[str, Any]) -> pa.Table:
        # Stateless stages are cheap to build, so one per batch.
        return stage(**params)(batch)

    call.__name__ = call.__qualname__ = name
    return call


def apply_stage(ds: ray.data.Dataset, step: StageStep, clock_name: str, cpus: float,
                gpus: float) -> ray.data.Dataset:
    """`ds` with `step` applied: a task pool for stateless stages, an actor
    pool otherwise; the stage's busy time goes to the clock `clock_name`."""
    common = dict(batch_format="pyarrow", batch_size=step.batch_size, num_cpus=step.num_cpus,
                  num_gpus=step.num_gpus or None)
    stage = timed(step.cls, step.name, clock_name)
    if not step.actors:
        compute = TaskPoolStrategy(size=int(step.concurrency)) if step.concurrency else None
        if not step.fuse:
            # Ray Data fuses only steps whose remote arguments are equal; the
            # default per-worker call limit (0: none), stated explicitly,
            # keeps this one apart. (Actor steps are never fused downstream.)
            common["max_calls"] = 0
        return ds.map_batches(_task_fn(step.name), fn_kwargs={"stage": stage, "params": step.params}, compute=compute,
                              **common)
    return ds.map_batches(stage, fn_constructor_kwargs=step.params, compute=actor_pool(step, cpus, gpus), **common)
