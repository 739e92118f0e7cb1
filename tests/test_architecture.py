"""The floors of the package, checked over its import graph (see docs/architecture.md).

``config → core → model → io · data → train / eval / compare / hf / peft → cli``: a module imports only modules
of its own floor or of the floors below, never the package root ``moslora`` (its ``__init__`` is the
public face, for users), and no chain of imports comes back to where it started. Imports inside
functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moslora"
FLOORS = {"version": 0, "config": 0, "core": 1, "model": 2, "io": 3, "data": 3, "train": 4, "eval": 4, "compare": 4, "hf": 4, "peft": 4,
          "cli": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def floor(module: str) -> int:
    part = module.split(".")[1]
    if part not in FLOORS:
        raise AssertionError(f"{module}: its folder {part!r} has no floor; add it to FLOORS and to docs/architecture.md")
    return FLOORS[part]


def imports_of(module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of a moslora module in ``module``, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "moslora"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "moslora":
                continue
            for alias in node.names:  # `from moslora.io import native` imports the module moslora.io.native
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A chain of imports that comes back to where it started, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in edges.get(module, []):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def upward(module: str, deps: list[tuple[int, str]]) -> list[str]:
    return [f"line {line}: {dep}" for line, dep in deps if dep != "moslora" and floor(dep) > floor(module)]


def test_the_package_root_is_imported_by_nothing_inside_the_package():
    offenders = [f"{m}:{line}" for m, deps in GRAPH.items() if m != "moslora" for line, dep in deps if dep == "moslora"]
    assert not offenders, f"import the defining module instead of the package root: {offenders}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "moslora"))
def test_a_module_imports_only_its_own_floor_or_below(module):
    found = upward(module, GRAPH[module])
    assert not found, f"{module} (floor {floor(module)}) imports from a higher floor: {found}"


def test_there_is_no_import_circle():
    edges = {m: sorted({dep for _, dep in deps if dep in MODULES and dep != m}) for m, deps in GRAPH.items()}
    # A package's __init__ runs before its submodules; `moslora.x.y` importing `moslora.x` is no circle.
    edges = {m: [d for d in deps if not m.startswith(d + ".")] for m, deps in edges.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " → ".join(cycle or [])


def test_the_checks_can_fail():
    assert upward("moslora.model.inject", [(3, "moslora.io.native")]) == ["line 3: moslora.io.native"]
    assert upward("moslora.io.native", [(3, "moslora.model.inject")]) == []
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    # the graph really holds imports made inside functions (a lazy import is still a dependency)
    assert ("moslora.train.model" in {dep for _, dep in GRAPH["moslora.eval.evaluate"]})
