"""The package's shape, read from its source: data flows one way, so the import graph of src/tiny_knn (every
import, at module level or inside a function) has no cycle, and only the front ends import the entry points
(api.py) or the command line (cli.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import tiny_knn

PACKAGE = Path(tiny_knn.__file__).parent
# The modules that may import api.py (it holds the entry points), and cli.py.
API_IMPORTERS = {"__init__", "__main__", "cli", "demo"}
CLI_IMPORTERS = {"__main__"}


def sources() -> dict[str, ast.Module]:
    """Every Python module of the package, parsed, by name."""
    parsed = {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}
    assert {"__init__", "api", "cli", "engine", "plan"} <= set(parsed)
    return parsed


def compiled() -> set[str]:
    """The package's compiled modules (the C kernel, as source or built): leaves that import nothing of ours."""
    return {path.name.split(".")[0] for path in PACKAGE.iterdir() if path.suffix in (".c", ".so", ".pyd")}


def bound_names(module: ast.Module) -> set[str]:
    """The names a module binds at its top level (what `from . import name` can take from __init__)."""
    names = set()
    for node in module.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def imports_of(module: ast.Module, modules: set[str], init_names: set[str]) -> set[str]:
    """The package modules one module imports, wherever the import stands (top level, function, branch):
    `from .x import y` and `import tiny_knn.x` name x; `from . import x` names x where x is a module, else
    __init__, which must bind x."""
    found = set()
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("tiny_knn"):
                continue
            assert node.level <= 1, f"an import from above the package: {ast.unparse(node)}"
            parts = (node.module or "").split(".")
            within = parts[1:] if node.level == 0 else [part for part in parts if part]
            if within:
                found.add(within[0])
                continue
            for alias in node.names:
                if alias.name in modules or alias.name in compiled():
                    found.add(alias.name)
                else:
                    assert alias.name in init_names, f"{ast.unparse(node)}: tiny_knn binds no {alias.name}"
                    found.add("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tiny_knn":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - compiled()


def import_graph() -> dict[str, set[str]]:
    parsed = sources()
    init_names = bound_names(parsed["__init__"])
    graph = {name: imports_of(module, set(parsed), init_names) - {name} for name, module in parsed.items()}
    assert all(target in graph for targets in graph.values() for target in targets), graph
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as its modules in import order (the first again at the end), or []."""
    state: dict[str, str] = {}  # "open" while its imports are being followed, then "done"
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[name] = "done"
        return []

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return []


def test_every_import_is_seen() -> None:
    graph = import_graph()
    assert {"plan", "topk", "store"} <= graph["engine"]  # at the top
    assert "demo" in graph["cli"]  # inside a function
    assert graph["demo"] == {"__init__"}  # `from . import compute_topk`, inside a function
    assert "kernel" in graph["topk"] and "_select" not in graph["kernel"]  # the compiled kernel is a leaf


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": set()}
    assert find_cycle(graph) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_only_the_front_ends_import_the_entry_points_and_the_command_line() -> None:
    graph = import_graph()
    assert sorted(name for name, targets in graph.items() if "api" in targets and name not in API_IMPORTERS) == []
    assert sorted(name for name, targets in graph.items() if "cli" in targets and name not in CLI_IMPORTERS) == []
    assert "api" in graph["__init__"] and "cli" in graph["__main__"]
