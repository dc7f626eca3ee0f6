"""The private Ray Data, Ray and torch APIs the engine leans on, each behind
one function.

Each exists because the public API lacks what a run needs (named in its
docstring), and each has a test in tests/test_private_apis.py that fails
when an upgrade moves it, so the change shows up there instead of as a
stalled stream or a slower exit. Callers that can do without degrade with a
warning on `PrivateApiChanged`.
"""

from __future__ import annotations

import math
import subprocess
from typing import TYPE_CHECKING

from udfs.lance_rows import PrivateApiChanged

if TYPE_CHECKING:
    import ray.data
    import torch

__all__ = ["PrivateApiChanged", "local_monitor_processes", "new_shared_tensor", "set_last_step_num_cpus"]


def set_last_step_num_cpus(ds: ray.data.Dataset, num_cpus: float) -> None:
    """Set the CPU share of the last logical step of `ds` (a repartition,
    which takes no `num_cpus` argument and asks for a whole CPU)."""
    dag = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    remote_args = getattr(dag, "ray_remote_args", None)
    if not isinstance(remote_args, dict):
        raise PrivateApiChanged("Ray Data's Dataset._logical_plan.dag.ray_remote_args is gone")
    remote_args["num_cpus"] = num_cpus


def local_monitor_processes() -> list[subprocess.Popen]:
    """The autoscaler monitor processes of the Ray this process started
    ([] when it joined a cluster); Ray exposes its processes only privately."""
    try:
        from ray._private import worker
        from ray._private.ray_constants import PROCESS_TYPE_MONITOR
    except ImportError as exc:
        raise PrivateApiChanged(f"ray._private moved: {exc}") from exc
    node = getattr(worker, "_global_node", None)
    if node is None:
        return []
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict):
        raise PrivateApiChanged("ray._private.worker._global_node.all_processes is gone")
    return [info.process for info in processes.get(PROCESS_TYPE_MONITOR, []) if getattr(info, "process", None)]


def new_shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, allocated there (the public
    `share_memory_()` allocates, then copies); torch's own `default_collate`
    does the same inside DataLoader workers."""
    import torch

    elem = torch.empty(0, dtype=dtype)
    typed = getattr(elem, "_typed_storage", None)
    if typed is None or not hasattr(typed(), "_new_shared"):
        raise PrivateApiChanged(f"torch {torch.__version__} has no Tensor._typed_storage()._new_shared")
    storage = typed()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)
