"""The wheel works on its own: built from the tracked files, installed
without `-e` into a folder of its own (on top of this venv's dependencies),
and run from an unrelated folder, it finds its config and runs a task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    return [name for name in listed if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy, so setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True, timeout=300)
    (built,) = dist.glob("reelsift-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    return target


def run_installed(installed: Path, cwd: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # The target folder comes first on the path, ahead of the checkout's
    # editable install, so what runs is the wheel's copy.
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_module_the_config_and_the_ui(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {name for name in tracked_files() if name.endswith(".py") and name.split("/")[0] in ("engine", "udfs")}
    assert not modules - names, f"missing from the wheel (add the package to pyproject.toml): {sorted(modules - names)}"
    conf = {name.replace("conf/", "reelsift_conf/", 1) for name in tracked_files()
            if name.startswith("conf/") and name.endswith(".yaml")}
    assert conf and not conf - names, sorted(conf - names)
    assert any(name.startswith("engine/serve/ui/templates/") for name in names)


def test_installed_cli_prints_its_config_from_an_unrelated_folder(installed, tmp_path):
    where = run_installed(installed, tmp_path, sys.executable, "-c", "import engine, reelsift_conf; "
                          "print(engine.__file__); print(reelsift_conf.DIR)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(installed)) for line in where.stdout.split()), where.stdout
    shown = run_installed(installed, tmp_path, str(installed / "bin" / "reelsift"), "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "task:" in shown.stdout and "transcode:" in shown.stdout and "split:" in shown.stdout


@pytest.mark.slow
def test_installed_engine_runs_the_sample_from_an_unrelated_folder(installed, tmp_path):
    done = run_installed(installed, tmp_path, sys.executable, "-m", "engine", "+experiment=sample")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "output" / "sample" / "summary.json").read_text())
    assert summary["videos_ok"] == summary["videos"] > 0 and summary["clips"] > 0
    assert any((tmp_path / "sample_data" / "videos").iterdir())
