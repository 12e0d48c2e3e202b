"""The package's imports flow one way: no module imports, even lazily, one that imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src/normbench"


def imports_of(path: Path) -> set[str]:
    """The normbench modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("normbench."):
            names.add(node.module.removeprefix("normbench."))
        elif isinstance(node, ast.ImportFrom) and node.module == "normbench":
            names.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("normbench.") for a in node.names if a.name.startswith("normbench."))
    return names


def test_the_import_graph_has_no_cycle():
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    assert graph["config"] == set() and "cells" in graph["cli"]  # the graph is read, not empty
    visiting, done = [], set()

    def visit(module):
        assert module not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(module):], module])
        if module in done:
            return
        visiting.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)
