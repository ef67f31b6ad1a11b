"""asyncstage: staging servers and volumes on EC2 for asyncio.

Provision named servers and volumes, start, stop and wait for whole fleets at
once, run commands over ssh and move data with rsync and dd.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from asyncstage import _commandline

if _commandline.is_command_line():  # before asyncssh is imported (by the Manager's modules)
    _commandline.hide_dependency_warnings()

from asyncstage import errors
from asyncstage._lazy import lazy_names
from asyncstage.errors import AsyncstageError

if TYPE_CHECKING:
    from asyncstage.manager import Manager
    from asyncstage.paths import RemotePath
    from asyncstage.server import Server
    from asyncstage.transfer import Progress, TransferStats
    from asyncstage.volume import Volume

try:  # one place: the version in pyproject.toml, through the installed metadata
    __version__ = version("asyncstage")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncstageError",
    "Manager",
    "Progress",
    "RemotePath",
    "Server",
    "TransferStats",
    "Volume",
    "__version__",
    "errors",
]

# The Manager and the handles import aioboto3 and asyncssh (most of a second of CPU): they
# are imported when first named, so that a module of the package (the command line's
# parser, the local cloud's errors) can be imported without them. So are the modules
# that importing the package used to load (``asyncstage.transfer.rsync`` after a bare
# ``import asyncstage``).
_LAZY = {
    "Manager": "asyncstage.manager",
    "Progress": "asyncstage.transfer",
    "RemotePath": "asyncstage.paths",
    "Server": "asyncstage.server",
    "TransferStats": "asyncstage.transfer",
    "Volume": "asyncstage.volume",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY, submodules=True)
