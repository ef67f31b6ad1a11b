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
    asyncstage.localcloud: ["LocalCloud", "Realism"],
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


def test_errors_sit_where_their_callers_need_them() -> None:
    e = asyncstage.errors
    # transfers raise MissingDependency on AWS too: it is not a local cloud error
    assert issubclass(e.MissingDependency, e.AsyncstageError)
    assert not issubclass(e.MissingDependency, e.LocalCloudError)
    assert issubclass(e.NeedsRoot, e.LocalCloudError)
    assert issubclass(e.StateDirInUse, e.LocalCloudError)
    # a missing image is a lookup failure, and still the EC2Error it used to be
    assert issubclass(e.UnknownImage, e.NotFound) and issubclass(e.UnknownImage, e.EC2Error)
    assert e.UnknownImage("gone", code="InvalidAMIID.NotFound").code == "InvalidAMIID.NotFound"
    # a server without an address is not a volume problem
    assert not issubclass(e.ServerNotRunning, e.VolumeError)


@pytest.mark.parametrize("name", ["Server", "Volume"])
def test_an_underscore_is_the_only_privacy_marker(name: str) -> None:
    """Every name of a handle without an underscore is for users: it has a blocking twin or
    a stated reason in NOT_TWINNED, and no docstring calls it internal."""
    cls, twin = getattr(asyncstage, name), getattr(asyncstage.blocking, name)
    reasons = asyncstage.blocking.NOT_TWINNED[name]
    public = {n for n in dir(cls) if not n.startswith("_")}
    assert not hasattr(cls, "INTERNAL_METHODS")
    assert set(reasons) <= public, "NOT_TWINNED names a member the class does not have"
    for member in sorted(public):
        assert hasattr(twin, member) or reasons.get(member), f"{name}.{member}: no twin"
        doc = inspect.getdoc(inspect.getattr_static(cls, member)) or ""
        assert not doc.startswith("Internal:"), f"{name}.{member} is private: rename it _{member}"
