"""The package layout's rules: every module imports cleanly; stages in `udfs`
import nothing of `engine` (nor Hydra, OmegaConf or Ray), so data and imports
flow one way; and a task uses another task only through its package's public
names, never its private modules."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The plumbing every stage uses (column schemas, opening a URI): leaves that
# import nothing else of the project.
LEAF_PLUMBING = ("udfs.schema", "udfs.uris", "udfs.lance_rows")
TASKS = ("curate", "compact", "dedup", "export", "filter", "index", "search", "serve")
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
        "udfs.analysis", "udfs.dedup", "udfs.media", "udfs.models", "udfs.quality", "udfs.split", "udfs.registry",
        "udfs.spec",
        "udfs.schema", "udfs.uris", "udfs.lance_rows"}


def test_engine_is_laid_out_by_role():
    top = {m for m in modules("engine") if m.count(".") == 1}
    assert top == {"engine.__main__", "engine.cli", "engine.tasks", "engine.sample", "engine.runtime",
                   "engine.store", "engine.training", *(f"engine.{task}" for task in TASKS)}


def test_reading_the_registry_loads_no_stage():
    # Specs are data: the engine reads them for every run (plans, resume),
    # so they must not import PyAV, torch or a stage module.
    code = ("import sys, udfs.registry; heavy = [m for m in ('av', 'torch', 'transformers', 'udfs.media.transcode', "
            "'udfs.models.embed', 'udfs.split.scenes') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", modules("udfs"))
def test_udfs_import_nothing_of_engine(module):
    project = {name for name in imports_of(module) if name.split(".")[0] == "engine"}
    assert not project, f"{module} imports {sorted(project)}; stages import nothing of engine"
    frameworks = {name for name in imports_of(module) if name.split(".")[0] in FORBIDDEN_IN_UDFS}
    assert not frameworks, f"{module} imports {sorted(frameworks)}: stages know nothing of Hydra or Ray"


@pytest.mark.parametrize("module", LEAF_PLUMBING)
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
                or m.split('.')[0] == 'engine')
for name in engine:
    if name != 'engine.__main__':
        importlib.import_module(name)
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def package_imports(module: str) -> set[str]:
    """The project modules `module` imports, as written: `from engine.search
    import open` gives engine.search (a package's public names), `from
    engine.search.searcher import open` gives engine.search.searcher."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "engine"}


@pytest.mark.parametrize("task", TASKS)
def test_a_task_uses_other_tasks_only_through_their_package(task):
    private = {}
    for module in modules(f"engine.{task}"):
        for name in package_imports(module):
            parts = name.split(".")
            if len(parts) > 2 and parts[1] in TASKS and parts[1] != task:
                private.setdefault(module, []).append(name)
    assert not private, f"engine.{task} reaches into other tasks' private modules: {private}"


def test_every_task_module_has_run():
    from engine.tasks import TASKS, task_runner

    for name in TASKS:
        assert callable(task_runner(name))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_runner("nope")
