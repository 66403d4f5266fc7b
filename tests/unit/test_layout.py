"""The code's shape: no import cycles between project modules, small signatures, every module mapped."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("distrib", "datasets")
MAX_PARAMS = 6


def project_modules() -> dict[str, Path]:
    """{dotted name: file} for launch.py and every module of the project's packages."""
    mods = {"launch": REPO / "launch.py"}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_between_project_modules() -> None:
    mods = project_modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    # a package's __init__ is imported by its modules implicitly; only real module edges count
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = [m for m in project_modules() if m != "launch"]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    res = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_function_takes_more_than_six_parameters(pkg: str) -> None:
    wide = []
    for path in sorted((REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                params = [
                    p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")
                ]
                if len(params) > MAX_PARAMS:
                    wide.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}({', '.join(params)})")
    assert wide == []


def test_readme_layout_lists_every_module() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    missing = [
        str(p.relative_to(REPO))
        for p in [REPO / "launch.py", *(q for pkg in PACKAGES for q in sorted((REPO / pkg).rglob("*.py")))]
        if p.name != "__init__.py" and str(p.relative_to(REPO)) not in layout
    ]
    assert missing == []


def test_no_module_grows_past_450_lines() -> None:
    """A module this long has grown a second concern: split it where that concern starts."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    long = {name: n for name, n in sizes.items() if n > 450}
    assert long == {}, long
