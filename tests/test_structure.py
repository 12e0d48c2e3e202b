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
            names.update(alias.name for alias in node.names
                         if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir())
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("normbench.") for a in node.names if a.name.startswith("normbench."))
    return names


def module_name(path: Path) -> str:
    """report/figures.py -> report.figures; a package's __init__.py is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_import_graph_has_no_cycle():
    graph = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"}
    assert graph["config"] == set() and "cells" in graph["cli"]  # the graph is read, not empty
    assert "report.figures" in graph["report.studies"]  # subpackages too
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
