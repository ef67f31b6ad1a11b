"""The shared fixtures are registered once (tests/conftest.py) and imported by no test module.

A fixture imported into a test module is a new fixture of that module: a session-scoped one
(the local cloud, the shared sshd) would start again for every module that imports it.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures import cloud, moto, sshd

PLUGINS = (cloud, sshd, moto)
TESTS = Path(__file__).parent


def _fixtures(module: ModuleType) -> dict[str, object]:
    """The fixtures a module defines (pytest >= 8.4 wraps each in a FixtureFunctionDefinition)."""
    return {
        name: value
        for name, value in vars(module).items()
        if type(value).__name__ == "FixtureFunctionDefinition"
    }


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda m: m.__name__)
def test_plugins_are_registered(plugin: ModuleType, pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.is_registered(plugin)
    assert _fixtures(plugin), f"{plugin.__name__} defines no fixture"


def test_no_test_module_imports_a_shared_fixture() -> None:
    shared = {id(f): f"{p.__name__}.{n}" for p in PLUGINS for n, f in _fixtures(p).items()}
    imported = []
    for path in sorted(TESTS.glob("test_*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        for name, value in inspect.getmembers(module):
            if id(value) in shared:
                imported.append(f"{path.name}: {name} is {shared[id(value)]}")
    assert not imported, "import the helpers only; name fixtures as arguments: " + str(imported)
