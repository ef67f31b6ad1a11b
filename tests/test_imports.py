"""Imports flow one way: no module of the package reaches, by any chain, back to itself.

The graph is read from the source, not from a running interpreter, so it holds every
import: at the top, inside functions and under ``if TYPE_CHECKING:`` (a circle of type
names is a circle a reader has to hold in mind all the same). The layers it keeps:
config and errors, then ec2 and ssh, then the parts (registry, fleet, disks ...) that
name servers and volumes through :mod:`asyncstage.refs`, then the handles, the Manager,
the transfer API, the blocking facade and the command line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asyncstage"

ONE_MODULE = {"asyncstage._blocking_runtime": "asyncstage.blocking"}
"""Files that are one module: the generated blocking facade and the hand-written runtime
its classes derive from (which names the generated Manager it hands out)."""


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, wherever the import statement stands.

    ``from pkg import sub`` is an import of the module ``pkg.sub`` when ``sub`` is one;
    anything else imported from a package is an import of the package itself.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            deps |= subs if len(subs) == len(node.names) else {base, *subs}
    return {d for d in deps if d in modules and d != name}


def import_graph(root: Path = PACKAGE, merged: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports; the files of
    ``merged`` count as the module they name."""
    merged = merged or {}
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {merged.get(d, d) for d in _imported(name, path, modules)}
        node = merged.get(name, name)
        graph[node] = (graph.get(node, set()) | deps) - {node}
    return graph


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> Iterator[list[str]]:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                yield from visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                yield sorted(group)

    for v in sorted(graph):
        if v not in index:
            yield from visit(v)


def test_no_module_imports_itself_back() -> None:
    graph = import_graph(merged=ONE_MODULE)
    found = list(cycles(graph))
    described = [
        "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group)
        for group in found
    ]
    assert not found, "import circles:\n" + "\n".join(described)


def test_the_parts_never_name_the_handles_or_the_manager() -> None:
    """The parts take a Context and name servers and volumes through protocols; the
    handles never name the Manager; the Manager never needs the command line."""
    graph = import_graph()
    parts = ["attachments", "capacity", "closing", "disks", "fleet", "hostkeys", "registry"]
    parts += ["context", "refs", "transfer"]
    for part in parts:
        assert not graph[f"asyncstage.{part}"] & {
            "asyncstage.manager",
            "asyncstage.server",
            "asyncstage.volume",
        }, part
    for handle in ("server", "volume"):
        assert "asyncstage.manager" not in graph[f"asyncstage.{handle}"], handle
    assert not {m for m in graph["asyncstage.manager"] if m.startswith("asyncstage.cli")}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}, [["c", "d"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_cycle_finder_finds_circles_and_only_them(
    source: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert list(cycles(source)) == expected


def test_the_graph_sees_type_checking_and_function_level_imports(tmp_path: Path) -> None:
    """An import under ``if TYPE_CHECKING:`` or inside a function is an edge too, and
    ``from pkg import sub`` points at the module ``pkg.sub``."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n"
    )
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert list(cycles(graph)) == [["pkg.a", "pkg.b", "pkg.c"]]
