"""The scripts that run on servers, as shipped: what a server's python3 must parse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from asyncstage import remote


@pytest.mark.parametrize("name", remote.SCRIPTS)
def test_a_script_parses_on_the_oldest_server_python(name: str) -> None:
    # The grammar only (an assignment expression needs 3.8, a match statement 3.10 ...):
    # a newer library call or operator passes here; vermin (below) sees those.
    ast.parse(remote.program(name), name, feature_version=remote.SERVER_PYTHON)


@pytest.mark.parametrize("name", remote.SCRIPTS)
def test_a_script_uses_nothing_newer_than_the_oldest_server_python(
    name: str, tmp_path: Path
) -> None:
    """The standard library's functions, methods and operators the script uses, as
    vermin knows them (``dict | dict`` and ``str.removeprefix`` need 3.9, ...)."""
    script = tmp_path / f"{name}.py"
    script.write_text(remote.program(name), encoding="utf-8")
    oldest = ".".join(map(str, remote.SERVER_PYTHON))
    vermin = "import sys; from vermin import main; sys.exit(main())"
    argv = [sys.executable, "-c", vermin, f"-t={oldest}-", "--violations", "--no-tips"]
    found = subprocess.run([*argv, str(script)], capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stdout
    # and it sees what the oldest one lacks
    newer = tmp_path / "newer.py"
    newer.write_text("d = {}\nd |= {'a': 1}\n", encoding="utf-8")
    caught = subprocess.run([*argv, str(newer)], capture_output=True, text=True, check=False)
    assert caught.returncode != 0 and "dict union" in caught.stdout


class _RunTimeGenerics(ast.NodeVisitor):
    """Subscripts of builtin types in code a server's python3 runs (not annotations, which
    ``from __future__ import annotations`` leaves unevaluated, nor ``if TYPE_CHECKING``
    blocks): 3.8 raises TypeError on ``dict[str, Any]`` there."""

    BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "type"})

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        pass  # its annotation

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        parts: list[ast.AST] = [*node.decorator_list, *node.args.defaults, *node.body]
        parts += [d for d in node.args.kw_defaults if d is not None]
        for part in parts:
            self.visit(part)

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.BUILTINS:
            self.found.append(f"line {node.lineno}: {ast.unparse(node)}")
        self.generic_visit(node)


@pytest.mark.parametrize("name", remote.SCRIPTS)
def test_a_script_subscripts_no_builtin_type_where_the_oldest_server_python_runs_it(
    name: str,
) -> None:
    tree = ast.parse(remote.program(name), name)
    seen = _RunTimeGenerics()
    seen.visit(tree)
    assert seen.found == []
    # the check itself sees the alias the oldest python3 fails on at import
    caught = _RunTimeGenerics()
    caught.visit(ast.parse("Entry = dict[str, Any]\nx: list[int] = []\n"))
    assert caught.found == ["line 1: dict[str, Any]"]
