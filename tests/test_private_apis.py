"""Each private API reelsift uses, exercised through the one function that
wraps it: an upgrade of Ray, Lance or torch that moves one fails here, by
name, instead of as a stalled stream or a slow exit."""

from __future__ import annotations

import subprocess
import sys

import lance
import pyarrow as pa
import torch

from engine.runtime.private_apis import new_shared_tensor, set_last_step_num_cpus
from udfs.lance_rows import take_rows


def test_take_rows_reads_by_row_id_in_the_order_given_after_deletes(tmp_path):
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"x": list(range(10)), "y": [f"r{i}" for i in range(10)]}), uri,
                        max_rows_per_file=4)
    ds = lance.dataset(uri)
    ids = {row["x"]: row["_rowid"] for row in ds.to_table(with_row_id=True).to_pylist()}
    ds.delete("x < 3")  # offsets shift; row ids do not
    ds = lance.dataset(uri)
    got = take_rows(ds, [ids[7], ids[3], ids[9]], ["y"])
    assert got.column_names == ["y"] and got.column("y").to_pylist() == ["r7", "r3", "r9"]


def test_the_repartition_step_takes_the_cpu_share_given(ray_session):
    import ray

    ds = ray.data.range(4).repartition(target_num_rows_per_block=1)
    set_last_step_num_cpus(ds, 0.25)
    assert ds._logical_plan.dag.ray_remote_args["num_cpus"] == 0.25
    assert sorted(r["id"] for r in ds.take_all()) == [0, 1, 2, 3]


def test_new_shared_tensor_is_in_shared_memory():
    t = new_shared_tensor((2, 3, 4), torch.uint8)
    assert t.shape == (2, 3, 4) and t.dtype == torch.uint8 and t.is_shared()
    t.fill_(7)
    assert int(t.sum()) == 7 * 24


MONITOR_SCRIPT = """
import json
from omegaconf import OmegaConf
from engine.runtime.private_apis import local_monitor_processes
from engine.runtime.ray_session import ensure_ray, stop_local_ray
assert local_monitor_processes() == []  # no Ray started yet
ensure_ray(OmegaConf.create({"num_cpus": 1}))
monitors = local_monitor_processes()
alive = [p.poll() is None for p in monitors]
stop_local_ray()
print(json.dumps({"alive": alive, "stopped": [p.poll() is not None for p in monitors]}))
"""


def test_local_monitor_processes_are_the_started_rays_monitors():
    # A Ray of its own: the shared session's monitor must not be killed.
    out = subprocess.run([sys.executable, "-c", MONITOR_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["alive"] == [True] and got["stopped"] == [True]

