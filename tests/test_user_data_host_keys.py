"""Host keys given in cloud-init user data, replaced at the first contact (real sshd).

``Manager(host_keys="user-data")``: each launch's instances get an ed25519 host key made
by the manager in their user data; the local cloud installs it at their first boot, as
cloud-init does. The manager pins it, reads no console, and replaces it at the first
contact by a key the server makes (the user data is readable by others). A server that
ignores the user data (an image without cloud-init) or presents another key falls back
to its console; a rotation that fails keeps the launch key pinned.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import yaml  # type: ignore[import-untyped]

from asyncstage import Manager, Server, fleet, hostkeys
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]


@pytest.fixture
def console_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every GetConsoleOutput the library sends, by instance id (the real calls, counted)."""
    from asyncstage.ec2 import EC2

    calls: list[str] = []
    real = EC2.console_output

    async def counted(self: EC2, instance_id: str, *args: Any, **kwargs: Any) -> str:
        calls.append(instance_id)
        return await real(self, instance_id, *args, **kwargs)

    monkeypatch.setattr(EC2, "console_output", counted)
    yield calls


async def _user_data_key(ec2: Any, instance_id: str) -> str:
    """The ed25519 public key in the instance's user data (as anyone allowed
    DescribeInstanceAttribute reads it)."""
    reply = await ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    text = base64.b64decode(reply["UserData"]["Value"]).decode()
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert config["ssh_deletekeys"] is True
    return " ".join(str(config["ssh_keys"]["ed25519_public"]).split()[:2])


async def _own_key(server: Server) -> str:
    """The ed25519 host key the server has now (read over a verified connection)."""
    line = await server.scmd("cat /etc/ssh/ssh_host_ed25519_key.pub")
    return " ".join(line.split()[:2])


def _pinned(m: Manager, server: Server) -> list[str]:
    assert server.address is not None
    return m.known_hosts.lookup(server.address, 22)


def _fdinfo() -> str:
    with open("/proc/self/fdinfo/0") as fdinfo:
        return fdinfo.read()


async def _connects_again(server: Server) -> None:
    """A new connection (the old one closed) verifies against the pinned key."""
    server.host.reset()
    assert (await server.scmd("echo again")).strip() == "again"


async def test_fleet_without_console_rotated_keys(
    manager_factory: ManagerFactory, ec2: Any, console_reads: list[str]
) -> None:
    async with manager_factory(host_keys="user-data") as m:
        servers = await m.provision_servers(3)
        assert console_reads == []  # no GetConsoleOutput at all
        launch_keys = {await _user_data_key(ec2, s.instance_id) for s in servers}
        assert len(launch_keys) == 1  # one RunInstances: one user data for all
        for server in servers:
            own = await _own_key(server)
            assert _pinned(m, server) == [own]  # the server's key now, pinned
            assert own not in launch_keys  # replaced: not the one in its user data
            await _connects_again(server)
            listed = (await server.scmd("ls -a /etc/ssh")).split()
            assert not [name for name in listed if "asyncstage" in name]  # no temp file left
            # only the key type the user data gave (ssh_deletekeys): none of the machine's
            assert sorted(k for k in listed if k.startswith("ssh_host_")) == [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
            ]
        assert len({await _own_key(s) for s in servers}) == 3  # each its own now

        # a stop and start keeps the replaced key (moved to the new address)
        one = servers[0]
        rotated = await _own_key(one)
        await one.stop()
        await one.start()
        assert _pinned(m, one) == [rotated]
        assert await _own_key(one) == rotated
        await _connects_again(one)
        assert console_reads == []

        addresses = {s.address for s in servers} | {one.address}
        await m.terminate_all_servers()
        for address in addresses:
            assert address is not None
            assert m.known_hosts.lookup(address, 22) == []  # nothing left pinned


async def test_image_without_cloud_init_falls_back_to_console(
    manager_factory: ManagerFactory, cloud: LocalCloud, ec2: Any, console_reads: list[str]
) -> None:
    with playing(cloud, cloud_init=False):
        async with manager_factory(host_keys="user-data") as m:
            server = await m.provision_server()
            assert console_reads  # its key was verified by its console
            own = await _own_key(server)
            assert own != await _user_data_key(ec2, server.instance_id)
            assert _pinned(m, server) == [own]
            await _connects_again(server)


async def test_malformed_user_data_keys_are_ignored_and_console_decides(
    manager_factory: ManagerFactory,
    ec2: Any,
    console_reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """User data whose private key does not load: the cloud says so on the console and
    makes its own keys; the launch key does not match, the console decides."""
    real = hostkeys.LaunchKey.new()
    broken = real.user_data.replace("-----BEGIN OPENSSH PRIVATE KEY-----", "garbage", 1)
    monkeypatch.setattr(hostkeys.LaunchKey, "new", lambda: hostkeys.LaunchKey(real.public, broken))
    async with manager_factory(host_keys="user-data") as m:
        server = await m.provision_server()
        assert console_reads
        console = await m.ec2.console_output(server.instance_id, latest=True)
        assert "ssh_keys: ed25519_private is not a valid private key: ignored" in console
        assert "ssh_keys: no valid key: generating host keys" in console
        own = await _own_key(server)
        assert own != real.public
        assert _pinned(m, server) == [own]
        await _connects_again(server)


async def test_failed_rotation_keeps_the_launch_key(
    manager_factory: ManagerFactory,
    ec2: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server cannot make a new key (here: the command fails on it): it stays
    usable with the launch key pinned, and a warning says so."""
    monkeypatch.setattr(hostkeys, "_ROTATE", "echo 'no ssh-keygen here' >&2; exit 3")
    with caplog.at_level(logging.WARNING, logger="asyncstage"):
        async with manager_factory(host_keys="user-data") as m:
            server = await m.provision_server()
            launch = await _user_data_key(ec2, server.instance_id)
            assert await _own_key(server) == launch
            assert _pinned(m, server) == [launch]
            await _connects_again(server)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not be replaced" in w and "no ssh-keygen here" in w for w in warned)


async def test_a_rotation_cancelled_once_installed_still_moves_the_pin(
    manager_factory: ManagerFactory, ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation that comes after the server installed its new key (seen over the
    same verified connection) waits for the rotation: the pin follows the new key, and a
    new connection verifies."""
    installed = "trap - EXIT\n"
    assert installed in hostkeys._ROTATE
    # the installed key is left in place a while before sshd is told, for the cancel to land
    monkeypatch.setattr(
        hostkeys, "_ROTATE", hostkeys._ROTATE.replace(installed, installed + "sleep 2\n")
    )
    real = hostkeys.rotate
    cancelled: list[bool] = []  # per rotation: cancelled while it ran

    async def cancelled_once_installed(ctx: Any, server: Any, host: Any, pin: Any) -> bool:
        launch = pin.launch_key
        rotating = True
        done = False
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_installed() -> None:
                    with anyio.fail_after(30):
                        while True:
                            line = await host.run("cat /etc/ssh/ssh_host_ed25519_key.pub")
                            if " ".join(str(line.stdout).split()[:2]) != launch:
                                break
                            await anyio.sleep(0.05)
                    cancelled.append(rotating)
                    scope.cancel()

                tg.start_soon(cancel_once_installed)
                try:
                    done = await real(ctx, server, host, pin)
                finally:
                    rotating = False
        return done

    monkeypatch.setattr(hostkeys, "rotate", cancelled_once_installed)
    async with manager_factory(host_keys="user-data") as m:
        server = await m.provision_server()
        assert cancelled == [True]
        own = await _own_key(server)
        assert own != await _user_data_key(ec2, server.instance_id)
        assert _pinned(m, server) == [own]
        await _connects_again(server)


async def test_the_replacement_is_the_first_contact_s_only_command(
    manager_factory: ManagerFactory, commands: list[str]
) -> None:
    """The first contact is the verified handshake and one command, the replacement:
    no other command before it (each is a session its sshd starts a shell for)."""
    async with manager_factory(host_keys="user-data") as m:
        server = await m.provision_server()
        assert commands == [hostkeys._ROTATE]
        own = await _own_key(server)
        assert _pinned(m, server) == [own]
        await _connects_again(server)


async def test_a_launch_key_replacement_holds_no_ssh_slot(
    manager_factory: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's servers are reached a few at a time (ssh slots); one that replaces its
    launch key has been reached and holds none. With one slot, the first replacement
    waits until the other server was reached: it could not while that slot was held."""
    monkeypatch.setattr(fleet, "_SSH_SLOTS", 1)
    reached: list[str] = []
    both = anyio.Event()
    real_wait = Server._wait_ssh

    async def wait_ssh(self: Server, deadline: float) -> None:
        await real_wait(self, deadline)
        reached.append(self.instance_id)
        if len(reached) == 2:
            both.set()

    real_rotate = hostkeys.rotate
    rotating: list[str] = []
    waited: list[bool] = []  # the first replacement: did the other server get reached?

    async def rotate(ctx: Any, server: Any, host: Any, pin: Any) -> bool:
        rotating.append(server.instance_id)
        if len(rotating) == 1:
            with anyio.move_on_after(30):
                await both.wait()
            waited.append(both.is_set())
        return await real_rotate(ctx, server, host, pin)

    monkeypatch.setattr(Server, "_wait_ssh", wait_ssh)
    monkeypatch.setattr(hostkeys, "rotate", rotate)
    async with manager_factory(host_keys="user-data") as m:
        servers = await m.provision_servers(2)
        assert waited == [True]
        for server in servers:
            own = await _own_key(server)
            assert _pinned(m, server) == [own]
            await _connects_again(server)


async def test_the_replacement_reads_sshd_s_sockets_without_a_process(
    manager_factory: ManagerFactory,
) -> None:
    """The replacement's reads of the sshd listener's sockets (before it is told to
    reload, and while it comes back) start no process: each would be paid by every
    server of a fleet at once. Here ``ls`` and ``rm`` first on root's PATH note each
    start; a replacement starts neither, and the pin still follows the key sshd serves."""
    if "\nino:" not in _fdinfo():
        pytest.skip("this kernel's fdinfo has no inode: the replacement uses ls")
    async with manager_factory(host_keys="user-data") as m:
        server = await m.provision_server()
        await server.run(
            "for tool in ls rm; do"
            " printf '#!/bin/sh\\necho %s >> /run/started\\nexec /bin/%s \"$@\"\\n'"
            ' "$tool" "$tool" > "/usr/local/sbin/$tool"; chmod 755 "/usr/local/sbin/$tool";'
            " done",
            sudo=True,
        )
        assert (await server.scmd("ls -d / && cat /run/started", sudo=True)).split() == ["/", "ls"]
        await server.run("rm -f /run/started", sudo=True)
        before = await _own_key(server)
        assert await hostkeys.rotate(server._ctx, server, server.host, server._pin)
        assert (await server.scmd("cat /run/started || true", sudo=True)).split() == []
        own = await _own_key(server)
        assert own != before
        assert _pinned(m, server) == [own]
        await _connects_again(server)
