"""The scripts that run on servers, as shipped: what a server's python3 must parse."""

from __future__ import annotations

import ast

import pytest

from asyncstage import remote


@pytest.mark.parametrize("name", remote.SCRIPTS)
def test_a_script_parses_on_the_oldest_server_python(name: str) -> None:
    # The grammar only (an assignment expression needs 3.8, a match statement 3.10 ...):
    # a newer library call would still pass here.
    ast.parse(remote.program(name), name, feature_version=remote.SERVER_PYTHON)
