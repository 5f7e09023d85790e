"""Packaging: the import graph has no cycle and keeps its layers, the console script finds the studio from
any folder, and the wheel holds every module and the embedded demo model.

The full check (the wheel installed into a fresh virtual environment, ``share-diffusers app`` answering HTTP
and ``share-diffusers generate`` writing an image from a folder outside the repository) is
``scripts/check_wheel.sh``, which CI (``.ci/run``) runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("share_diffusers", "app")
# Who may import whom (module-level or inside a function): the library never reaches up into its front ends.
FRONT_ENDS = ("share_diffusers.cli", "share_diffusers.studio", "app")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, module_level_only: bool) -> set[str]:
    """The project's modules that ``name`` imports (the deepest module each import statement names)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:
                    module = ".".join(package[: len(package) - child.level + 1] + ([module] if module else []))
                targets = [module, *(f"{module}.{alias.name}" for alias in child.names)]
            else:
                visit(child)
                continue
            for target in targets:
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_at_module_level():
    graph = {name: _imports(name, path, module_level_only=True) for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_front_ends_sit_on_the_library_not_on_each_other():
    """cli and studio share ``share_diffusers.runtime``; nothing below them imports them, even lazily, and the
    studio never imports the cli (so no cycle can run through them)."""
    graph = {name: _imports(name, path, module_level_only=False) for name, path in MODULES.items()}

    def front_end(module: str) -> str | None:
        return next((top for top in FRONT_ENDS if module == top or module.startswith(top + ".")), None)

    wrong = []
    for module, targets in graph.items():
        for target in targets:
            target_end = front_end(target)
            if target_end and target_end != front_end(module):
                allowed = front_end(module) == "app" and target_end == "share_diffusers.studio"
                allowed |= module == "share_diffusers.cli" and target == "share_diffusers.studio.ui"
                if not allowed:
                    wrong.append(f"{module} imports {target}")
    assert not wrong, wrong
    assert "share_diffusers.runtime" in graph["share_diffusers.cli"]
    assert "share_diffusers.runtime" in graph["share_diffusers.studio.ui"]


def _console_script() -> Path:
    script = Path(sys.executable).with_name("share-diffusers")
    if not script.exists():
        pytest.skip("the share-diffusers console script is not installed (pip install -e .)")
    return script


def test_the_studio_starts_from_any_folder(tmp_path):
    """``share-diffusers app`` (from a folder outside the repository), ``python -m app`` and the Space entry
    ``app/space.py`` (from the repository) all reach the studio's options."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PYTHONPATH", None)
    runs = {
        "share-diffusers app": ([str(_console_script()), "app", "--help"], tmp_path),
        "python -m app": ([sys.executable, "-m", "app", "--help"], ROOT),
        "app/space.py": ([sys.executable, str(ROOT / "app" / "space.py"), "--help"], tmp_path),
    }
    processes = {
        name: subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (command, cwd) in runs.items()
    }
    for name, process in processes.items():
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith("usage: share-diffusers app") and "--factors" in out, f"{name}: {out}"
        assert "Traceback" not in err and "FutureWarning" not in err, f"{name}: {err}"


def test_wheel_holds_the_package_the_studio_and_the_demo_model(tmp_path):
    """Built from a copy of the sources (the repository stays untouched): every module, the studio, the
    embedded demo model's assets, the console script; no tests, no top-level ``app``."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    package_files = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "share_diffusers").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    for name in package_files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
        + [str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("share_diffusers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    expected = {name for name in package_files if name.endswith(".py") or "/fashion/assets/" in name}
    assert expected - names == set()
    assert "share_diffusers/studio/ui.py" in names and "share_diffusers/runtime.py" in names
    assert "share_diffusers/fashion/assets/fashion-flux/model_index.json" in names
    assert {name.split("/")[0] for name in names} == {"share_diffusers", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "share-diffusers = share_diffusers.cli:main" in entry_points
