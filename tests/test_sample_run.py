"""`make sample` as a newcomer meets it: one run of the built-in sample with
its log going to a file, then every public entry point called with its
defaults on that output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import lance
import pytest

REPO = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": REPO}
# Ray Data's progress dump, as it printed into a log before: per-operator
# bars and its resource lines.
RAY_PROGRESS = re.compile(r"MapBatches\([^)]*\): +\d+/\d+|Tasks: \d+; Actors: \d+|Queued blocks: \d+|Running: \d+/")


def engine(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, env=ENV, timeout=600, text=True,
                          **kwargs)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> tuple[Path, str]:
    """(output, log) of `python -m engine task=curate +experiment=sample`, stdout and stderr to a file."""
    work = tmp_path_factory.mktemp("sample")
    out = work / "out"
    with open(work / "run.log", "w") as log:
        done = engine("task=curate", "+experiment=sample", f"output={out}", "log.progress_every_s=2",
                      cwd=work, stdout=log, stderr=subprocess.STDOUT)
    text = (work / "run.log").read_text()
    assert done.returncode == 0, text[-3000:]
    return out, text


@pytest.mark.slow
def test_the_log_is_reelsift_progress_with_every_stage_and_no_ray_dump(sample_run):
    out, text = sample_run
    assert not RAY_PROGRESS.search(text), RAY_PROGRESS.search(text).group(0)
    assert "DeprecationWarning" not in text and "Progress bars disabled" not in text
    lines = [line for line in text.splitlines() if "progress: " in line]
    assert lines, text[-3000:]
    last = lines[-1]
    assert re.search(r"progress: 3/3 videos, 0 in flight; clips 6 kept, 0 filtered", last), last
    assert re.search(r"\d+\.\d videos/min", last) and "ETA 0m00s" in last, last
    assert all("ETA" in line for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder"] == {"requested": "libx264", "encoder": "libx264", "why": "asked for"}
    stages = set(summary["stages"])
    assert {"probe", "split_fixed_stride", "transcode", "write"} <= stages
    for stage in stages:  # in the operators Ray Data names and in reelsift's own lines
        assert f"MapBatches({stage})" in text or f"({stage})" in text, stage
    assert all(stage in text.split("stage busy seconds:")[1] for stage in stages)
    assert f"output: {out}" in text


@pytest.mark.slow
def test_every_public_entry_point_works_with_its_defaults(sample_run, ray_session):
    from engine.search import open as open_search
    from engine.serve.app import BackgroundServer, make_app
    from engine.training import ClipDataset, ray_dataset

    out, _ = sample_run
    clips = lance.dataset(out / "clips.lance").count_rows()
    # The first call a newcomer makes: no captions on a default run, so none asked for.
    samples = list(ClipDataset(str(out), num_frames=8, size=(64, 64)))
    assert len(samples) == clips and samples[0]["frames"].shape == (8, 3, 64, 64) and "caption" not in samples[0]
    rows = ray_dataset(str(out), num_frames=8, size=(64, 64)).take_all()
    assert len(rows) == clips and rows[0]["frames"].shape == (8, 3, 64, 64)
    searcher = open_search(str(out))
    assert searcher.count() == clips and searcher.browse(limit=2).num_rows == 2
    with pytest.raises(Exception, match="embedding|vector"):  # no embed stage ran: said so, not a crash
        searcher.search(text="a dog")
    with BackgroundServer(make_app(str(out))) as url:
        with urllib.request.urlopen(f"{url}/", timeout=60) as page:
            assert page.status == 200 and b"clip" in page.read()
    for task in ("export", "index"):
        done = engine(f"task={task}", f"output={out}", cwd=out.parent, capture_output=True)
        assert done.returncode == 0, f"task={task}: {done.stderr[-3000:]}"
    shards = list((out / "exports" / "webdataset").rglob("*.tar"))
    assert shards, "task=export with its defaults wrote no webdataset shards"
    missing = engine("task=export", f"output={out.parent / 'none'}", "export.parquet=true", cwd=out.parent,
                     capture_output=True)
    assert missing.returncode != 0 and "run task=curate on this output first" in missing.stderr
