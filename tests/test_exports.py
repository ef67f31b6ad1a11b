"""The public surface is pinned: nothing leaks into it or vanishes from it by accident."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import asyncstage
import asyncstage.blocking
import asyncstage.errors
import asyncstage.localcloud

PUBLIC = {
    asyncstage: [
        "AsyncstageError",
        "Manager",
        "Progress",
        "RemotePath",
        "Server",
        "TransferStats",
        "Volume",
        "__version__",
        "errors",
    ],
    asyncstage.blocking: [
        "CommandReader",
        "CommandWriter",
        "LocalCloud",
        "Manager",
        "ManagerOptions",
        "Server",
        "Volume",
        "call",
    ],
    asyncstage.localcloud: ["LocalCloud"],
}


@pytest.mark.parametrize("module", list(PUBLIC), ids=lambda m: m.__name__)
def test_public_names_are_pinned(module: ModuleType) -> None:
    assert sorted(module.__all__) == sorted(PUBLIC[module])
    for name in module.__all__:
        assert hasattr(module, name), name


def test_every_error_is_exported_and_rooted() -> None:
    """Every exception class in asyncstage.errors is in __all__, derives from
    AsyncstageError, and appears in the module's documented tree."""
    module = asyncstage.errors
    classes = {
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == module.__name__
    }
    assert classes == set(module.__all__)
    doc = module.__doc__ or ""
    for name in classes:
        assert issubclass(getattr(module, name), asyncstage.AsyncstageError), name
        assert name in doc, f"{name} missing from the hierarchy in the errors docstring"


def test_public_api_is_documented() -> None:
    """Public methods of the three domain types carry a docstring."""
    for cls in (asyncstage.Manager, asyncstage.Server, asyncstage.Volume):
        for name, member in vars(cls).items():
            if name.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"
