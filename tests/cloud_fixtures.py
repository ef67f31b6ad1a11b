"""Shared local-cloud fixtures: one LocalCloud for the whole test session.

Import what you need into a test module::

    from tests.cloud_fixtures import *  # noqa: F403 - cloud, manager_factory ...

- ``cloud``: a running :class:`~asyncstage.localcloud.LocalCloud` (session scope; it
  runs on its own event loop in a background thread, so that tests of any scope and
  any anyio backend fixture can use it).
- ``manager_factory(**options)``: a :class:`~asyncstage.Manager` for that cloud, not
  yet entered (use ``async with``). Defaults for tests: ``on_exit="terminate"``,
  ``scan=False``, fast polling, and one dot directory for the session (so that a
  second manager can adopt what a first one made).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from asyncstage import Manager
from asyncstage.errors import NeedsRoot
from asyncstage.localcloud import LocalCloud

__all__ = ["cloud", "cloud_dotdir", "manager_factory"]

ManagerFactory = Callable[..., Manager]


@pytest.fixture(scope="session")
def cloud() -> Iterator[LocalCloud]:
    """A running local cloud shared by the whole session (boot_delay 0)."""
    if os.geteuid() != 0:
        pytest.skip("the local cloud needs root")
    with start_blocking_portal("asyncio") as portal:
        try:
            cm = portal.wrap_async_context_manager(LocalCloud(boot_delay=0.0))
            running = cm.__enter__()
        except NeedsRoot as e:  # pragma: no cover - we run as root
            pytest.skip(str(e))
        try:
            yield running
        finally:
            cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def cloud_dotdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dot directory every test manager shares (key pair, known_hosts)."""
    return tmp_path_factory.mktemp("asyncstage-dotdir")


@pytest.fixture
def manager_factory(cloud: LocalCloud, cloud_dotdir: Path) -> ManagerFactory:
    """``manager_factory(**options)``: a Manager for the shared cloud, not entered yet."""

    def make(**options: Any) -> Manager:
        defaults: dict[str, Any] = {
            "dotdir": cloud_dotdir,
            "on_exit": "terminate",
            "scan": False,
            "poll_interval": 0.2,
            "launch_window": 0.05,
        }
        return cloud.manager(**(defaults | options))

    return make
