"""The package layout's rules: every module imports cleanly, and stages in
`udfs` depend only on the leaf plumbing of `engine` (never a task, the CLI,
Hydra or OmegaConf), so data and imports flow one way."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The only engine modules a stage may import: declarations and URI helpers
# that themselves import nothing else of the project.
UDFS_MAY_IMPORT = {"engine.schema", "engine.uris"}
FORBIDDEN_IN_UDFS = ("hydra", "omegaconf", "ray")


def modules(package: str) -> list[str]:
    root = REPO / package
    found = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
        found.append(info.name)
    return sorted(found)


def imports_of(module: str) -> set[str]:
    """Every module `module`'s source imports, at top level or inside a
    function (lazy imports count: they run in the same worker)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_every_package_has_its_families():
    # The families, plus what every stage declares itself with (spec) and
    # where those declarations are collected (registry).
    assert {m for m in modules("udfs") if m.count(".") == 1} == {
        "udfs.analysis", "udfs.dedup", "udfs.media", "udfs.models", "udfs.split", "udfs.registry", "udfs.spec"}


def test_reading_the_registry_loads_no_stage():
    # Specs are data: the engine reads them for every run (plans, resume),
    # so they must not import PyAV, torch or a stage module.
    code = ("import sys, udfs.registry; heavy = [m for m in ('av', 'torch', 'transformers', 'udfs.media.transcode', "
            "'udfs.models.embed', 'udfs.split.scenes') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", modules("udfs"))
def test_udfs_import_only_leaf_plumbing(module):
    project = {name for name in imports_of(module) if name.split(".")[0] == "engine"}
    # `from engine.schema import X` also records engine.schema.X: judge the module part.
    bad = {name for name in project if not any(name == ok or name.startswith(ok + ".") for ok in UDFS_MAY_IMPORT)}
    assert not bad, f"{module} imports {sorted(bad)}; stages may import only {sorted(UDFS_MAY_IMPORT)}"
    frameworks = {name for name in imports_of(module) if name.split(".")[0] in FORBIDDEN_IN_UDFS}
    assert not frameworks, f"{module} imports {sorted(frameworks)}: stages know nothing of Hydra or Ray"


@pytest.mark.parametrize("module", sorted(UDFS_MAY_IMPORT))
def test_leaf_plumbing_imports_nothing_of_the_project(module):
    project = {name for name in imports_of(module) if name.split(".")[0] in ("engine", "udfs")}
    assert not project, f"{module} is leaf plumbing but imports {sorted(project)}"


def test_all_modules_import_in_a_fresh_interpreter():
    """Import every udfs module first, check that no task, CLI or Hydra came
    with them, then import every engine module."""
    script = f"""
import importlib, json, sys
sys.path.insert(0, {str(REPO)!r})
udfs, engine = {modules('udfs')!r}, {modules('engine')!r}
for name in udfs:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')
                or (m.startswith('engine.') and m not in {sorted(UDFS_MAY_IMPORT)!r}))
for name in engine:
    if name != 'engine.__main__':
        importlib.import_module(name)
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_every_task_module_has_run():
    from engine.tasks import TASKS, task_runner

    for name in TASKS:
        assert callable(task_runner(name))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_runner("nope")
