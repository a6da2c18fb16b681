"""The project's import graph: no cycles between its modules, and the library never imports
the experiments.

The graph is read from the source with ``ast`` (nothing is imported): every ``import x``
and ``from x import y`` anywhere in a module, function-local and ``TYPE_CHECKING`` imports
included, relative ones resolved. ``from package import name`` is an edge to the submodule
``package.name`` when one exists, else to the package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("orthorecall", "experiments")


def module_files(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute name a ``from ... import`` statement imports from."""
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else [])) or None


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in (None: not the project's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its source)."""
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node)
                if source is None:
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                found = _project_module(target, modules)
                if found is not None and found != module:
                    edges.add(found)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each
    as a closed path ``[a, b, ..., a]``."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_graph_reader_sees_every_import_form(tmp_path):
    package = tmp_path / "orthorecall"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from orthorecall import b\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import orthorecall.sub.d as d\n")
    (package / "sub" / "__init__.py").write_text("from .d import x\n")
    (package / "sub" / "d.py").write_text("from ..a import y\nimport numpy\n")
    (tmp_path / "experiments").mkdir()
    modules = module_files(tmp_path)
    graph = import_graph(modules)
    assert graph["orthorecall.a"] == {"orthorecall.b"}
    assert graph["orthorecall.b"] == {"orthorecall.c"}
    assert graph["orthorecall.c"] == {"orthorecall.sub.d"}
    assert graph["orthorecall.sub"] == {"orthorecall.sub.d"}
    assert graph["orthorecall.sub.d"] == {"orthorecall.a"}
    cycles = find_cycles(graph)
    assert cycles == [
        ["orthorecall.a", "orthorecall.b", "orthorecall.c", "orthorecall.sub.d", "orthorecall.a"]
    ]


def test_no_import_cycles():
    graph = import_graph(module_files())
    assert len(graph) > 20
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between project modules:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_library_does_not_import_experiments():
    graph = import_graph(module_files())
    offending = {
        module: sorted(t for t in targets if t.split(".")[0] == "experiments")
        for module, targets in graph.items()
        if module.split(".")[0] == "orthorecall"
    }
    offending = {m: t for m, t in offending.items() if t}
    assert not offending, f"orthorecall modules importing experiments: {offending}"
