"""A manager and one server shared by a module's tests (one launch instead of one a test).

For modules whose tests each leave the server as they found it (volumes deleted, mounts
and files put back): ``manager, server = shared_server("name")`` at module level gives
module-scoped ``manager`` and ``server`` fixtures, the manager with the test defaults of
``manager_factory``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager, Server
from asyncstage.localcloud import LocalCloud

__all__ = ["shared_server"]


def shared_server(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Module-scoped ``manager`` and ``server`` (named ``name``) fixtures."""

    @pytest.fixture(scope="module", name="manager")
    async def manager(cloud: LocalCloud, cloud_dotdir: Path) -> AsyncIterator[Manager]:
        async with cloud.manager(
            dotdir=cloud_dotdir, on_exit="terminate", scan=False, poll_interval=0.2
        ) as m:
            yield m

    @pytest.fixture(scope="module", name="server")
    async def server(manager: Manager) -> Server:
        return await manager.get_server(name)

    return manager, server
