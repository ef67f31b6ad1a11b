"""The guard itself: loopback passes, anything else is refused and recorded."""

from __future__ import annotations

import socket

import pytest

from tests import netguard


def test_loopback_connect_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


@pytest.mark.parametrize("address", [("54.12.3.4", 22), ("10.0.0.5", 22), ("192.168.1.1", 80)])
def test_non_loopback_refused(address: tuple[str, int]) -> None:
    before = len(netguard.violations)
    with socket.socket() as s, pytest.raises(netguard.NonLoopbackConnection):
        s.connect(address)
    assert netguard.violations[before:] == [repr(address)]
    del netguard.violations[before:]  # recorded as expected; do not fail this test


def test_asyncio_refused() -> None:
    import asyncio

    async def main() -> None:
        await asyncio.open_connection("10.1.2.3", 22)

    before = len(netguard.violations)
    with pytest.raises(netguard.NonLoopbackConnection):
        asyncio.run(main())
    del netguard.violations[before:]


def test_a_running_clouds_public_range_only() -> None:
    """Judged without connecting: the guard's verdict on an address."""
    import ipaddress

    from asyncstage.localcloud._network import RUNNING_RANGES

    mine = ipaddress.IPv4Network("198.18.250.0/24")
    with socket.socket() as s:
        assert not netguard._allowed(s, ("198.18.250.5", 22))
        RUNNING_RANGES.add(mine)
        try:
            assert netguard._allowed(s, ("198.18.250.5", 22))
            assert not netguard._allowed(s, ("198.18.251.5", 22))  # the rest of the range
            assert not netguard._allowed(s, ("172.31.0.5", 22))  # a private address
        finally:
            RUNNING_RANGES.discard(mine)
        assert not netguard._allowed(s, ("198.18.250.5", 22))
