"""Dependencies run one way: no import circles in rlprox/ (counting imports inside
functions too, which only hide a circle), every module imports alone in a fresh
interpreter, and the recipe layer loads no trainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = Path(ROOT) / "rlprox"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    for path in sorted((Path(ROOT) / "envs").glob("*.py")):  # installed as rlprox.envs
        name = "rlprox.envs" if path.stem == "__init__" else f"rlprox.envs.{path.stem}"
        files[name] = path
    return files


def _type_checking_block(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circles():
    files = module_files()
    modules = set(files)
    graph = {name: imports_of(name, path, modules) for name, path in files.items()}
    # a package's __init__ re-exporting its own submodules is not a dependency back up
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and files[t].name == "__init__.py")}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_recipe_layer_loads_no_trainer():
    code = (
        "import sys, rlprox.recipe, rlprox.registry, rlprox.errors, rlprox.algos; "
        "print(sorted(m for m in sys.modules if m.startswith('rlprox.algos.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow  # ~50-100 s on 2 cores (an interpreter per module): .ci/run runs it after make test
def test_each_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(m for m in module_files() if m != "rlprox.__main__")
    failed = {}
    for start in range(0, len(names), 4):  # four interpreters at a time
        procs = {
            n: subprocess.Popen(
                [sys.executable, "-c", f"import {n}"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in names[start : start + 4]
        }
        for n, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            if proc.returncode:
                failed[n] = err.strip().splitlines()[-1]
    assert not failed, failed


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
