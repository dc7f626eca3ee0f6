"""A real multi-node Ray cluster on this machine: a head node (no CPUs: it
holds the driver and the run's bookkeeping) and two worker nodes with their
own resources. The run joins it through `ray.address`; the worker node
running its work is killed mid-run; the run completes with the clips of a
clean run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import lance
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.curate.task import run
from engine.sample import write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Enough videos that the run is still going when a node dies, few enough to be quick.
VIDEOS = 6
SETTINGS = ["transcode.preset=ultrafast", "preview.enabled=false", "motion.mode=disable", "split.clip_len_s=2",
            "split.min_clip_s=1", "write.commit_every_rows=1", "write.resources.batch_size=2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clip_set(output) -> list[tuple]:
    table = lance.dataset(os.path.join(output, "clips.lance")).to_table(
        columns=["clip_id", "start_frame", "end_frame", "num_frames", "num_bytes", "error"])
    return sorted((r["clip_id"], r["start_frame"], r["end_frame"], r["num_frames"], r["num_bytes"] > 0, r["error"])
                  for r in table.to_pylist())


def committed_videos(output) -> int:
    try:
        return lance.dataset(os.path.join(output, "videos.lance")).count_rows()
    except (ValueError, OSError):
        return 0


def node_work(node) -> list[str]:
    """The run's stage tasks and actors alive on `node`."""
    import psutil

    names = []
    for kind, popen in node.live_processes():
        if kind != "raylet":  # the node's workers are its raylet's children
            continue
        try:
            for child in psutil.Process(popen.pid).children(recursive=True):
                name = " ".join(child.cmdline())[:80]
                # Stage tasks, not the input reads (which only wait for admission).
                if name.startswith("ray::") and "MapBatches" in name:
                    names.append(name)
        except psutil.Error:
            continue
    return names


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_inputs")
    for i in range(VIDEOS):
        write_video(root / f"c{i}.mp4", width=128, height=72, fps=15, seconds=4 + i % 3)
    return root


@pytest.mark.slow
def test_worker_node_killed_mid_run(ray_session, inputs, tmp_path):
    from ray.cluster_utils import Cluster

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        clean_cfg = compose(config_name="config", overrides=[f"input={inputs}", f"output={tmp_path / 'clean'}",
                                                             *SETTINGS])
    run(clean_cfg)
    expected = clip_set(tmp_path / "clean")

    port = free_port()
    # An explicit port, never the default: other Ray clusters share this machine.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "gcs_server_port": port, "num_cpus": 0, "include_dashboard": False, "object_store_memory": 200 * 2**20})
    try:
        workers = [cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20) for _ in range(2)]
        cluster.wait_for_nodes()
        assert cluster.address.endswith(f":{port}")
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": REPO}
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", f"input={inputs}", f"output={out}", *SETTINGS,
             f"ray.address={cluster.address}"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        # Once the run has work on a worker node, that node is killed.
        doomed, busy = None, []
        while not busy and proc.poll() is None and time.monotonic() < deadline:
            for node in workers:
                busy = node_work(node)
                if busy:
                    doomed = node
                    break
            else:
                time.sleep(0.05)
        print("work on the killed node:", busy)
        assert doomed is not None, f"no worker node ran the run's work: {proc.poll()=}"
        cluster.remove_node(doomed, allow_graceful=False)  # kill -9 of the node's processes
        killed_at = committed_videos(out)
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, stderr[-4000:]
        if os.environ.get("REELSIFT_CLUSTER_LOG"):
            with open(os.environ["REELSIFT_CLUSTER_LOG"], "w") as fh:
                fh.write(stderr)
    finally:
        cluster.shutdown()
    assert killed_at < VIDEOS, "the run finished before the node was killed"
    assert busy, "the killed node was running none of the run's work"
    assert clip_set(out) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"] == VIDEOS == summary["run"]["videos_committed"] and not summary["run"]["resumed"]
