"""A local-cloud server reached through another as its jump host.

On the cloud's network of today every instance's private address is reachable from
the machine too; what is tested is that the library takes the path it is given
(through the jump host, to the private address) for commands, streams and rsync, and
goes back to the direct path when the jump host is unset.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asyncstage.localcloud import LocalCloud
from asyncstage.server import Server

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud, pytest.mark.slow]


@pytest.fixture(scope="module")
async def pair(
    cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Server, Server]]:
    async with cloud.manager(
        dotdir=tmp_path_factory.mktemp("jump-dotdir"),
        on_exit="terminate",
        scan=False,
        poll_interval=0.1,
    ) as m:
        bastion, target = await m.provision_servers(["jump-bastion", "jump-target"])
        yield bastion, target


async def test_a_server_through_another_as_its_jump_host(
    pair: tuple[Server, Server], tmp_path: Path
) -> None:
    bastion, target = pair
    target.jump_host = "jump-bastion"
    try:
        assert target.jump_host == "jump-bastion"
        assert target.host.jump is bastion.host
        assert target.host.address == target.instance["PrivateIpAddress"]
        assert (await target.scmd("echo", "through")).strip() == "through"
        async with target.host.scmd_read("seq 1 3") as out:
            assert [line.strip() async for line in out] == ["1", "2", "3"]
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "data").write_bytes(os.urandom(200_000))
        await target.put(f"{tmp_path}/up/", "/tmp/jump-up")
        await target.get("/tmp/jump-up/", f"{tmp_path}/down")
        assert (tmp_path / "down" / "data").read_bytes() == (tmp_path / "up" / "data").read_bytes()
    finally:
        target.jump_host = None
    assert target.host.jump is None
    assert target.host.address == target.instance["PublicIpAddress"]
    assert (await target.scmd("echo", "direct")).strip() == "direct"
