"""asyncstage: staging servers and volumes on EC2 for asyncio.

Provision named servers and volumes, start, stop and wait for whole fleets at
once, run commands over ssh and move data with rsync and dd.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from asyncstage import _commandline

if _commandline.is_command_line():  # before asyncssh is imported (below)
    _commandline.hide_dependency_warnings()

from asyncstage import errors
from asyncstage.errors import AsyncstageError
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
