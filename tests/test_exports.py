"""The public surface is pinned: nothing leaks into it or vanishes from it by accident."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import asyncstage
import asyncstage.blocking
import asyncstage.errors
import asyncstage.localcloud
import asyncstage.localcloud.errors

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
        "LocalCloudOptions",
        "Manager",
        "ManagerOptions",
        "Server",
        "Volume",
        "call",
    ],
    asyncstage.localcloud: ["LocalCloud", "Realism"],
    asyncstage.localcloud.errors: [
        "LocalCloudError",
        "NeedsRoot",
        "NoDeviceIsolation",
        "StateDirInUse",
    ],
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


def test_local_cloud_errors_form_a_tree_of_their_own() -> None:
    """The local cloud's errors root at LocalCloudError, outside the library's tree, are
    documented in their module's tree, and still import under their old names."""
    module = asyncstage.localcloud.errors
    doc = module.__doc__ or ""
    for name in module.__all__:
        cls = getattr(module, name)
        assert issubclass(cls, module.LocalCloudError), name
        assert not issubclass(cls, asyncstage.AsyncstageError), name
        assert name in doc, f"{name} missing from the hierarchy in the module docstring"
        assert getattr(asyncstage.errors, name) is cls, f"asyncstage.errors.{name} is gone"
    from asyncstage.errors import NeedsRoot

    assert NeedsRoot is module.NeedsRoot
    assert asyncstage.localcloud.StateDirInUse is module.StateDirInUse
    with pytest.raises(AttributeError):
        _ = asyncstage.errors.NoSuchError  # type: ignore[attr-defined]


def test_errors_sit_where_their_callers_need_them() -> None:
    e = asyncstage.errors
    # transfers raise MissingDependency on AWS too: it is not a local cloud error
    assert issubclass(e.MissingDependency, e.AsyncstageError)
    assert not issubclass(e.MissingDependency, asyncstage.localcloud.errors.LocalCloudError)
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


def test_a_local_cloud_error_reaches_the_command_line_as_one_line(tmp_path: Path) -> None:
    """Out of the library's tree, a local cloud error still ends a command with one line
    and its hint, not a traceback (`local up` without root, in a child that drops root)."""
    tmp_path.chmod(0o777)
    code = (
        "import os, sys\n"
        "from asyncstage.cli import main\n"
        "if os.geteuid() == 0:\n"
        "    os.setgid(65534); os.setuid(65534)\n"
        f"sys.exit(main(['local', 'up', '--dir', {str(tmp_path / 'cloud')!r}]))\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 1, done.stderr
    assert "asyncstage: error: the local cloud needs root" in done.stderr
    assert "run it as root (sudo)" in done.stderr and "Traceback" not in done.stderr
