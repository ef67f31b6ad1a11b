"""Server on the local cloud: info, lifecycle, commands and command forms."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import anyio
import pytest

from asyncstage import Manager, RemotePath, Server, keys
from asyncstage.errors import (
    CommandFailed,
    FleetError,
    HostKeyMismatch,
    ServerUnreachable,
)
from asyncstage.keys import generate_key
from tests.fixtures.cloud import ManagerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("srv")


def _listening(address: str, port: int = 22) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


async def test_info(server: Server, manager: Manager) -> None:
    assert str(server) == server.instance_id and server.instance_id.startswith("i-")
    assert f"{server}:/opt" == f"{server.instance_id}:/opt"
    assert server.name == "srv"
    assert server.manager is manager
    assert server.keyfile == manager.keyfile
    assert server.username == "admin"
    assert server.address is not None
    assert server.address.startswith("127.") or server.address.startswith("198.1")
    assert server.endpoint == server.address
    assert server.instance["InstanceId"] == server.instance_id
    assert server.availability_zone.startswith(manager.region)
    assert server.state == "running"
    assert server.host.address == server.address
    assert "srv" in repr(server)


async def test_commands(server: Server) -> None:
    assert (await server.scmd("whoami")).strip() == "admin"
    assert (await server.scmd("whoami", sudo=True)).strip() == "root"
    # one string is a shell line; several arguments are an argv, each quoted
    assert (await server.scmd("echo a; echo b")).split() == ["a", "b"]
    assert (await server.scmd("echo", "a; echo b")).strip() == "a; echo b"
    assert (await server.scmd("printf", "%s|", "$HOME", "two words", "'q'")) == (
        "$HOME|two words|'q'|"
    )
    result = await server.run("sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert result.exit_status == 3 and result.stdout == "out\n" and result.stderr == "err\n"
    with pytest.raises(CommandFailed) as info:
        await server.scmd("false")
    assert server.name in str(info.value)
    assert await server.ssh("true") is True
    assert await server.ssh("false") is False
    async with server.scmd_write("cat > /tmp/written") as w:
        await w.write("line 1\nline 2\n")
    async with server.scmd_read("cat", "/tmp/written") as r:
        lines = [line async for line in r]
    assert lines == ["line 1\n", "line 2\n"]
    assert (await server.scmd("cat /tmp/written")) == "line 1\nline 2\n"


async def test_ping_stop_start_terminate(manager: Manager, tmp_path: Path) -> None:
    server = await manager.provision_server("cycle")
    assert await server.ping() is True
    address = server.address
    assert address is not None and manager.known_hosts.lookup(address)
    await server.stop()
    assert server.state == "stopped"
    assert await server.ping() is False
    await server.start()
    assert server.state == "running" and await server.ping() is True
    assert (await server.scmd("echo", "back")).strip() == "back"
    # a transfer from a RemotePath on a stopped server starts it first
    await server.stop()
    assert server.state == "stopped"
    got = await manager.rsync(RemotePath(server, "/etc/hostname"), f"{tmp_path}/")
    assert got.files >= 1 and (tmp_path / "hostname").read_text().strip()
    assert server.state == "running"
    address = server.address
    assert address is not None
    await server.terminate()
    assert server.state == "terminated"
    assert server not in manager.servers()
    assert not manager.known_hosts.lookup(address)  # its host key entry went with it
    assert not _listening(address)


async def test_host_key_checked_against_console(server: Server) -> None:
    assert server._pin.expected, "the local cloud prints host key fingerprints"
    assert server.address is not None
    assert server.manager.known_hosts.lookup(server.address)


async def test_unused_block_device_and_names(server: Server) -> None:
    ec2_name, local = await server.unused_block_device()
    assert ec2_name.startswith("/dev/sd") and local == "/dev/xvd" + ec2_name[-1]
    assert (await server.unused_block_device("h"))[0] >= "/dev/sdh"
    assert server.default_mtpt("vol") == "/mnt/Staging/vol"
    assert "vol" in server.volume_description("vol")


async def test_server_that_never_answers_ssh(manager: Manager) -> None:
    with pytest.raises(ServerUnreachable) as info:
        await manager.provision_server("mute", username="nobody", timeout=4)
    assert "mute" in str(info.value)
    assert manager.find_server_by_name("mute") is None  # terminated, not leaked


async def test_a_changed_host_key_is_refused(
    manager: Manager, manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    server = await manager.provision_server("pinned")
    assert server.address is not None
    _, impostor = generate_key("impostor")
    # another manager holding our key (only servers of our keys are adopted) but with a
    # known_hosts file of its own
    theirs = keys.dotdir_for(manager.endpoint_url, tmp_path)
    for kept in manager.dotdir.glob("asyncstage-*.pem*"):
        shutil.copy2(kept, theirs / kept.name)
    async with manager_factory(dotdir=tmp_path, scan=True, on_exit="run") as other:
        other.known_hosts.add(server.address, 22, impostor)  # as if the key had changed
        adopted = other.find_server_by_name("pinned")
        assert adopted is not None
        assert await adopted.ping() is False
        with pytest.raises(HostKeyMismatch):
            await adopted.scmd("true")
        with anyio.fail_after(20):  # refused at once, not retried until a timeout
            with pytest.raises(FleetError) as info:
                await other.wait_for_servers([adopted])
        assert [type(e) for e in info.value.exceptions] == [HostKeyMismatch]
    # with no known_hosts entry, the console's fingerprints are what the key must match
    manager.known_hosts.remove(server.address, 22)
    async with manager_factory(scan=True, on_exit="run") as third:
        adopted = third.find_server_by_name("pinned")
        assert adopted is not None
        assert (await adopted.scmd("whoami")).strip() == "admin"
        assert adopted._pin.expected
