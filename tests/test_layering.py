"""The package's imports go one way: no import circle between modules of ``use_search/``, and nothing
below the factory imports it (only the shells on top of it, the CLI, the API and ``__main__``, may).

The graph is read from the source with ``ast``, so nothing is imported. What counts as an edge A → B:
- every ``import``/``from ... import`` in A, at module level and inside functions alike: an import
  deferred into a function still makes A need B to work, it only hides the circle from Python's import
  order;
- except those under ``if TYPE_CHECKING:``, which never run (annotations only);
- B is the deepest module the statement names (``from use_search.model import clip`` is
  ``use_search.model.clip``), not the packages around it: Python runs those ``__init__`` files too, but
  counting them would make every package that re-exports its own submodules a circle with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "use_search"
FACTORY = "use_search.factory"
# The shells sit on top of the factory and may import it; every other module is below it.
ABOVE_FACTORY = ("use_search.__main__", "use_search.cli", "use_search.api")

# Imports that close a circle today, each with the redesign step that removes it. The test takes these
# edges out and asks for a graph without circles, so a new circle fails even where it runs through the
# same modules; an entry that no longer closes a circle fails too (delete it then).
KNOWN_CIRCLE_EDGES: dict[tuple[str, str], str] = {}
# Modules below the factory that import it today (none: voting is handed its models by factory.load_ensemble).
KNOWN_FACTORY_IMPORTERS: set[str] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement in ``tree`` names (``from a import b`` gives ``a.b``,
    which resolves to module ``a`` when ``b`` is not a module), skipping ``if TYPE_CHECKING:`` blocks."""
    names: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                stack.extend(child.orelse)  # the else branch does run
                continue
            if isinstance(child, ast.Import):
                names += [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package, one level up per extra dot
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join([*package, base] if base else package)
                names += [f"{base}.{alias.name}" for alias in child.names]
            stack.append(child)
    return names


def import_graph(root: Path, package: str = PACKAGE) -> nx.DiGraph:
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in imported_names(tree, module, path.name == "__init__.py"):
            while name and name not in modules:  # the deepest module the name is in
                name = name.rpartition(".")[0]
            if name and name != module:
                graph.add_edge(module, name)
    return graph


def circles(graph: nx.DiGraph) -> set[frozenset[str]]:
    """The modules of each circle (each strongly connected set of two or more modules)."""
    return {frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1}


def factory_importers(graph: nx.DiGraph) -> set[str]:
    above = {m for m in graph if any(m == a or m.startswith(a + ".") for a in ABOVE_FACTORY)}
    return set(graph.predecessors(FACTORY)) - above if FACTORY in graph else set()


def test_no_new_import_circles():
    graph = import_graph(ROOT)
    stale = [e for e in KNOWN_CIRCLE_EDGES if not graph.has_edge(*e) or not nx.has_path(graph, e[1], e[0])]
    graph.remove_edges_from(KNOWN_CIRCLE_EDGES)
    cycles = [nx.find_cycle(graph.subgraph(c)) for c in circles(graph)]
    new = [" -> ".join([*(a for a, _ in cycle), cycle[0][0]]) for cycle in cycles]
    assert not new, f"import circle(s) between modules of {PACKAGE}/: " + " | ".join(sorted(new))
    assert not stale, f"these imports no longer close a circle: delete them from KNOWN_CIRCLE_EDGES: {stale}"


def test_nothing_below_the_factory_imports_it():
    importers = factory_importers(import_graph(ROOT))
    assert not importers - KNOWN_FACTORY_IMPORTERS, (
        f"modules below {FACTORY} import it (only {', '.join(ABOVE_FACTORY)} may): "
        f"{sorted(importers - KNOWN_FACTORY_IMPORTERS)}"
    )
    assert not KNOWN_FACTORY_IMPORTERS - importers, (
        "these no longer import the factory: delete them from KNOWN_FACTORY_IMPORTERS: "
        f"{sorted(KNOWN_FACTORY_IMPORTERS - importers)}"
    )


# The walker itself, on small packages written here: each kind of import it must see, and the ones it
# must not count.
@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # module-level absolute import, both ways
        ({"a.py": "import pkg.b", "b.py": "from pkg.a import x"}, {frozenset({"pkg.a", "pkg.b"})}),
        # function-level import closes the circle
        ({"a.py": "def f():\n    from pkg import b", "b.py": "import pkg.a"}, {frozenset({"pkg.a", "pkg.b"})}),
        # relative imports, from a subpackage module and from a package __init__
        ({"sub/__init__.py": "from . import c", "sub/c.py": "from ..a import y", "a.py": "from .sub import z"},
         {frozenset({"pkg.sub", "pkg.sub.c", "pkg.a"})}),
        # a three-module ring
        ({"a.py": "import pkg.b", "b.py": "import pkg.c", "c.py": "import pkg.a"},
         {frozenset({"pkg.a", "pkg.b", "pkg.c"})}),
        # TYPE_CHECKING imports never run: no circle
        ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B",
          "b.py": "import pkg.a"}, set()),
        # a package whose __init__ re-exports a submodule is no circle with that submodule
        ({"__init__.py": "from pkg.a import x", "a.py": "from pkg.b import y", "b.py": "z = 1"}, set()),
        # one way only
        ({"a.py": "import pkg.b\nimport os", "b.py": "import json"}, set()),
    ],
)
def test_the_walker_finds_exactly_the_circles(tmp_path, files, expected):
    pkg = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
        (pkg / name).parent.joinpath("__init__.py").touch()
    assert circles(import_graph(tmp_path, "pkg")) == expected


def test_the_walker_sees_a_factory_importer_below_it(tmp_path):
    pkg = tmp_path / "use_search"
    for name, text in {"factory.py": "", "cli/__init__.py": "from use_search.factory import R",
                       "query/search.py": "def f():\n    from use_search import factory"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    (pkg / "__init__.py").touch()
    (pkg / "query" / "__init__.py").touch()
    assert factory_importers(import_graph(tmp_path)) == {"use_search.query.search"}
