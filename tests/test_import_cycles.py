"""No import cycle among wsgate's modules (docs/architecture.md gives the layers).

Every module under ``wsgate/`` is parsed with :mod:`ast`, so every import
statement counts wherever it stands: at module level, inside a function (the
usual way to hide a cycle), and under ``if TYPE_CHECKING:``. Two graphs are
checked, and both must be free of cycles:

* the **design graph**: an edge from a module to each wsgate module it imports,
  type-checking imports included. A type-only cycle is still a knot in the
  layers (two modules that each need the other's types), and mypy has to read
  them together;
* the **runtime graph**: the imports that run (type-checking ones left out),
  with an edge also to each package whose ``__init__`` Python executes on the
  way (``import wsgate.policies.registry`` runs ``wsgate/policies/__init__.py``
  first), unless it is a package of the importing module itself (that one is
  already being imported).

``from pkg import name`` counts as importing ``pkg.name`` when that is a
module, else ``pkg``. Imports by string (``importlib.import_module``) are not
seen; wsgate uses one, for the lazy names of :mod:`wsgate.admin`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import wsgate

ROOT = Path(wsgate.__file__).parent

#: Cycles known and owned by other work, as the set of modules in the cycle's
#: strongly connected component. An entry that no longer matches a real cycle
#: fails the test, so it is deleted as soon as the cycle is gone.
KNOWN_CYCLES: dict[frozenset[str], str] = {}

Graph = dict[str, set[str]]


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (packages by their name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement in ``tree`` and whether it is type-checking only."""

    def walk(
        node: ast.AST, typing_only: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, typing_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from walk(child, True)
            for child in node.orelse:
                yield from walk(child, typing_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, typing_only)

    yield from walk(tree, False)


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: Mapping[str, Path]
) -> list[str]:
    """The modules ``node`` imports, as dotted names (foreign ones included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
    ]


def import_graphs(root: Path) -> tuple[Graph, Graph]:
    """The design graph and the runtime graph (see the module docstring) of ``root``."""
    modules = module_names(root)
    design: Graph = {name: set() for name in modules}
    runtime: Graph = {name: set() for name in modules}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        own_packages = {importer.rsplit(".", n)[0] for n in range(1, importer.count(".") + 1)}
        if is_package:
            own_packages.add(importer)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, typing_only in imports(tree):
            for target in _targets(node, importer, is_package, modules):
                while target and target not in modules:  # ``import a.b.name``: the module a.b
                    target = target.rpartition(".")[0]
                if not target or target == importer:
                    continue
                design[importer].add(target)
                if typing_only:
                    continue
                runtime[importer].add(target)
                parts = target.split(".")
                for n in range(1, len(parts)):
                    package = ".".join(parts[:n])
                    if package not in own_packages and package != importer:
                        runtime[importer].add(package)
    return design, runtime


def cycles(graph: Graph) -> list[tuple[frozenset[str], list[str]]]:
    """Each strongly connected component of ``graph`` with one cycle through it.

    A cycle reads ``[a, b, ..., a]``; the component is every module on some cycle
    with it (they all import each other, directly or not).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(frozenset(component), _cycle_in(graph, component)) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside it."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return [*paths[node], start]
            if succ not in paths:
                paths[succ] = [*paths[node], succ]
                queue.append(succ)
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_no_import_cycles() -> None:
    design, runtime = import_graphs(ROOT)
    found = [
        (kind, component, cycle)
        for kind, graph in (("design", design), ("runtime", runtime))
        for component, cycle in cycles(graph)
    ]
    unexpected = [
        f"{kind} import cycle: {' -> '.join(cycle)}"
        + (
            f" (and all of {', '.join(sorted(component))})"
            if len(component) > len(cycle) - 1
            else ""
        )
        for kind, component, cycle in found
        if component not in KNOWN_CYCLES
    ]
    stale = [
        f"KNOWN_CYCLES lists {sorted(members)} ({why}), which is no cycle any more: delete it"
        for members, why in KNOWN_CYCLES.items()
        if all(component != members for _, component, _ in found)
    ]
    assert not unexpected + stale, "\n".join(unexpected + stale)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("files", "kind", "expected"),
    [
        pytest.param(
            {
                "__init__.py": "",
                "a.py": "from pkg import b\n",
                "b.py": "def late():\n    from . import a\n",
            },
            "design",
            ["pkg.a", "pkg.b", "pkg.a"],
            id="function-level import",
        ),
        pytest.param(
            {
                "__init__.py": "",
                "a.py": "import typing\nif typing.TYPE_CHECKING:\n    from .b import B\n",
                "b.py": "import pkg.a\n",
            },
            "design",
            ["pkg.a", "pkg.b", "pkg.a"],
            id="type-checking import",
        ),
        pytest.param(
            {
                "__init__.py": "",
                "config.py": "from pkg.sub.registry import NAMES\n",
                "sub/__init__.py": "from . import impl\n",
                "sub/registry.py": "NAMES = {}\n",
                "sub/impl.py": "from pkg.config import X\n",
            },
            "runtime",
            ["pkg.config", "pkg.sub", "pkg.sub.impl", "pkg.config"],
            id="through a package __init__",
        ),
    ],
)
def test_cycles_are_found(
    tmp_path: Path, files: dict[str, str], kind: str, expected: list[str]
) -> None:
    design, runtime = import_graphs(_package(tmp_path, files))
    assert cycles(design if kind == "design" else runtime) == [(frozenset(expected), expected)]


def test_a_layered_package_has_no_cycle(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .top import run\n",
            "top.py": "from .sub import impl\nfrom . import low\n",
            "sub/__init__.py": "from . import impl\n",
            "sub/impl.py": "from pkg.low import X\nfrom .. import low\n",
            "low.py": "X = 1\n",
        },
    )
    design, runtime = import_graphs(root)
    assert cycles(design) == [] and cycles(runtime) == []
    assert runtime["pkg.top"] == {"pkg.sub", "pkg.sub.impl", "pkg.low"}
