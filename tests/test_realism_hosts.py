"""Consoles, addresses, host keys and diagnosis on the realistic local cloud.

EC2 shows a console late (``Latest=True`` is current on Nitro types only), gives an
instance a new public address at every start, and a server that never answers ssh
must say why. The library waits for the console's fingerprints alongside sshd, lets
its host key policy decide when they never come, moves a pinned key with a moved
server, and links two servers over the addresses they really see each other at.

Some tests slow the session cloud's console down for their own duration (white box:
``cloud._engine.realism``), always restoring it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from asyncstage import Manager, shell
from asyncstage.errors import HostKeyMismatch, HostKeyUnverified, ServerUnreachable
from asyncstage.localcloud import LocalCloud
from asyncstage.remote import rsynchelper
from asyncstage.transfer.link import direct_link, route
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]


@contextlib.contextmanager
def _console_delays(cloud: LocalCloud, console: float, latest: float) -> Iterator[None]:
    """The session cloud's console delays, for a while (white box: the engine's realism)."""
    with playing(cloud, console=(console, console), console_latest=(latest, latest)):
        yield


@pytest.fixture
def slow_console(cloud: LocalCloud) -> Iterator[None]:
    """The console 3 s late, 0.3 s with Latest=True on Nitro."""
    with _console_delays(cloud, 3.0, 0.3):
        yield


@pytest.fixture
def silent_console(cloud: LocalCloud) -> Iterator[None]:
    """The console shows nothing for a minute (longer than the tests)."""
    with _console_delays(cloud, 60.0, 60.0):
        yield


async def _console(ec2: Any, instance_id: str, latest: bool) -> str:
    reply = await ec2.get_console_output(InstanceId=instance_id, Latest=latest)
    return str(reply.get("Output") or "")


async def _fingerprints_shown(ec2: Any, instance_id: str, latest: bool, within: float) -> None:
    with anyio.fail_after(within):
        while True:
            if "SSH HOST KEY FINGERPRINTS" in await _console(ec2, instance_id, latest):
                return
            await anyio.sleep(0.05)


async def _launch_running(cloud: LocalCloud, ec2: Any, *kinds: str) -> dict[str, str]:
    """One instance of each type, once all are running: type -> instance id."""
    ids = {}
    for kind in kinds:
        reply = await ec2.run_instances(
            ImageId=cloud.image_id, MinCount=1, MaxCount=1, InstanceType=kind
        )
        ids[kind] = reply["Instances"][0]["InstanceId"]
    with anyio.fail_after(60):
        while True:
            reply = await ec2.describe_instances(InstanceIds=list(ids.values()))
            states = {i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}
            if states == {"running"}:
                return ids
            await anyio.sleep(0.05)


async def test_console_is_empty_then_present(cloud: LocalCloud, ec2: Any) -> None:
    # Whether a console is still empty is asked while its delay is far from over (ten
    # minutes), so a slow machine cannot make the answer late; what must come is waited for.
    kinds = ("t3.micro", "t2.micro")  # Nitro, Xen
    ids: dict[str, str] = {}
    try:
        with _console_delays(cloud, 600.0, 0.3):
            ids = await _launch_running(cloud, ec2, *kinds)
        nitro, xen = ids["t3.micro"], ids["t2.micro"]
        assert await _console(ec2, nitro, latest=False) == ""  # no Output yet
        await _no_latest_on_xen(ec2, xen)
        await _fingerprints_shown(ec2, nitro, True, 10)  # Latest on Nitro: current
        assert await _console(ec2, xen, latest=False) == ""
        assert await _console(ec2, nitro, latest=False) == ""
        with _console_delays(cloud, 1.0, 1.0):
            later = await _launch_running(cloud, ec2, *kinds)
        ids |= {f"later {kind}": i for kind, i in later.items()}
        for instance_id in later.values():  # then for every type, as it comes
            await _fingerprints_shown(ec2, instance_id, False, 30)
    finally:
        if ids:
            await ec2.terminate_instances(InstanceIds=list(ids.values()))


async def test_a_terminated_instance_is_listed_for_a_while_then_gone(
    cloud: LocalCloud, ec2: Any
) -> None:
    # EC2 lists a terminated instance for about an hour (here realism.terminated_visible):
    # looked for while the window is far from over (a slow look cannot miss it), then
    # shortened, which the cloud reads at each listing
    ids = await _launch_running(cloud, ec2, "t3.micro")
    (instance_id,) = ids.values()
    with playing(cloud, terminated_visible=600.0):
        await ec2.terminate_instances(InstanceIds=[instance_id])
        with anyio.fail_after(60):
            await _until_listed_as(ec2, instance_id, "terminated")
    with playing(cloud, terminated_visible=1.0):
        with anyio.fail_after(60):
            await _until_listed_as(ec2, instance_id, None)
        with pytest.raises(ClientError) as gone:
            await ec2.describe_instances(InstanceIds=[instance_id])
        assert gone.value.response["Error"]["Code"] == "InvalidInstanceID.NotFound"
        tags = await ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
        assert tags["Tags"] == []


async def _until_listed_as(ec2: Any, instance_id: str, state: str | None) -> None:
    """Until the whole listing shows the instance in ``state`` (None: not listed)."""
    while True:
        reply = await ec2.describe_instances()
        found = [i for r in reply["Reservations"] for i in r["Instances"]]
        states = [i["State"]["Name"] for i in found if i["InstanceId"] == instance_id]
        if states == ([] if state is None else [state]):
            return
        await anyio.sleep(0.1)


async def _no_latest_on_xen(ec2: Any, instance_id: str) -> None:
    """EC2 refuses ``Latest=true`` on a Xen type (Nitro only): UnsupportedOperation."""
    with pytest.raises(ClientError) as refused:
        await _console(ec2, instance_id, latest=True)
    assert refused.value.response["Error"]["Code"] == "UnsupportedOperation"
    assert "Nitro" in refused.value.response["Error"]["Message"]


async def test_library_waits_for_a_late_console(manager: Manager, slow_console: None) -> None:
    # a Xen type: Latest does not help, the console comes 3 s after the boot
    server = await manager.provision_server("patient", instance_type="t2.micro")
    assert server._pin.expected  # verified against the console, not trusted
    assert manager.ec2.calls["GetConsoleOutput"] > 1  # polled until it showed them
    assert (await server.scmd("whoami")).strip() == "admin"


async def test_library_reads_a_nitro_console_with_latest(
    manager: Manager, slow_console: None
) -> None:
    # a Nitro type: Latest shows the console within 0.3 s, long before the 3 s it takes
    server = await manager.provision_server("current", instance_type="t3.micro")
    assert server._pin.expected
    assert (await server.scmd("whoami")).strip() == "admin"
    await server.terminate()


async def test_a_clock_ahead_of_ec2s_still_waits_for_the_console(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    # This machine's clock a minute ahead of EC2's (botocore signs anyway): a new server's
    # LaunchTime looks a minute old, longer than console_timeout, unless the library reads
    # EC2's clock from its answers. Xen: the console comes 3 s after the boot.
    with playing(cloud, clock_offset=-60.0, console=(3.0, 3.0)):
        async with manager_factory(console_timeout=20) as m:
            server = await m.provision_server("skewed", instance_type="t2.micro")
            assert m.ec2.clock_offset is not None and abs(m.ec2.clock_offset + 60) < 2
            assert server._pin.expected  # waited for them: verified, not trusted
            assert m.ec2.calls["GetConsoleOutput"] > 1
            await server.terminate()


async def test_unverified_host_key_fails_by_default(
    manager_factory: ManagerFactory, silent_console: None
) -> None:
    async with manager_factory(console_timeout=1.0) as m:
        with anyio.fail_after(60), pytest.raises(HostKeyUnverified) as info:
            await m.provision_server("unverified")
        assert info.value.waited == 1.0
        assert "accept-new" in str(info.value) and "unverified" in str(info.value)
        assert m.find_server_by_name("unverified") is None  # terminated, not leaked


async def test_accept_new_pins_and_warns(
    manager_factory: ManagerFactory, silent_console: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with manager_factory(console_timeout=1.0, host_key_policy="accept-new") as m:
        with caplog.at_level(logging.WARNING, logger="asyncstage"):
            server = await m.provision_server("trusting")
        assert any(
            "accept-new" in r.getMessage() and "unverified" in r.getMessage()
            for r in caplog.records
        )
        assert server.address is not None
        assert m.known_hosts.lookup(server.address)  # pinned on first contact
        assert (await server.scmd("whoami")).strip() == "admin"
    with pytest.raises(ValueError, match="host_key_policy"):
        manager_factory(host_key_policy="yolo")


async def test_stop_start_moves_address_and_key(manager: Manager) -> None:
    server = await manager.provision_server("mover")
    first, private = server.address, server.instance["PrivateIpAddress"]
    assert first is not None and first != private
    keys = manager.known_hosts.lookup(first)
    assert keys
    await server.stop()
    consoles = manager.ec2.calls["GetConsoleOutput"]
    await server.start()
    assert server.address not in (None, first)
    assert server.instance["PrivateIpAddress"] == private  # the private address stays
    assert manager.known_hosts.lookup(server.address) == keys  # the key moved ...
    assert not manager.known_hosts.lookup(first)
    assert manager.ec2.calls["GetConsoleOutput"] == consoles  # ... not trusted anew
    assert (await server.scmd("hostname")).strip() == "ip-" + private.replace(".", "-")


def _new_host_keys(cloud: LocalCloud, instance_id: str) -> None:
    """Replace a stopped instance's host keys (white box: its overlay's upper dir)."""
    ssh_dir = Path(cloud.state_dir) / "roots" / instance_id / "upper" / "etc" / "ssh"
    for kind in ("ed25519", "ecdsa"):
        key = ssh_dir / f"ssh_host_{kind}_key"
        key.unlink()
        key.with_name(key.name + ".pub").unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)


async def test_tampered_host_key_after_a_move_is_refused(
    cloud: LocalCloud, manager: Manager
) -> None:
    server = await manager.provision_server("tampered")
    first = server.address
    await server.stop()
    _new_host_keys(cloud, server.instance_id)  # what answers at the new address is not it
    with anyio.fail_after(60), pytest.raises(HostKeyMismatch):
        await server.start()
    assert server.address != first


async def test_server_to_server_after_a_move(manager: Manager, tmp_path: Path) -> None:
    a, b = await manager.provision_servers(["near", "far"])
    await b.stop()
    await b.start()  # b has a new public address, its private one stays
    a_private, b_private = a.instance["PrivateIpAddress"], b.instance["PrivateIpAddress"]
    assert route(a.host, b.host) == (a_private, b_private)
    # what b's sshd really sees a come from is what the temporary key allows
    async with direct_link(a.host, True, b.host, False, None) as link:
        assert link.address == b_private
        allowed = await b.scmd("cat", ".ssh/authorized_keys")
        assert f'from="{a_private}"' in allowed
        seen = await a.scmd(*link.argv("sh", "-c", "echo $SSH_CONNECTION"), sudo=True)
        assert seen.split()[0] == a_private
        # a's own ssh (OpenSSH 9: sntrup761x25519 first, ~70 ms) told to prefer ours
        ssh, *options = link.argv("true")
        verbose = shell.command_line(ssh, "-v", *options) + " 2>&1"
        chosen = re.search(r"kex: algorithm: (\S+)", await a.scmd(verbose, sudo=True))
        assert chosen is not None and chosen[1] in rsynchelper.FAST_KEX, chosen
    (tmp_path / "data").write_text("moved along\n")
    await a.put(str(tmp_path / "data"), "/tmp/data")
    await manager.rsync(f"{a}:/tmp/data", f"{b}:/tmp/copied")
    assert await b.scmd("cat", "/tmp/copied") == "moved along\n"


async def test_unreachable_server_says_why(cloud: LocalCloud, manager: Manager) -> None:
    with pytest.raises(ServerUnreachable) as info:
        await manager.provision_server("refused", username="nobody", timeout=4)
    error = info.value
    assert error.state == "running" and error.port_open is True
    assert error.console_tail and "cloud-init" in error.console_tail
    assert "port 22 answered" in str(error) and "state running" in str(error)

    server = await manager.provision_server("gone")
    engine: Any = cloud._engine  # white box: its sshd dies, EC2 still says running
    await anyio.to_thread.run_sync(engine.machines[server.instance_id].host.kill)
    server.host.reset()
    with anyio.fail_after(30), pytest.raises(ServerUnreachable) as info:
        await server.start(timeout=3)
    error = info.value
    assert error.state == "running" and error.port_open is False
    assert "nothing answered on port 22" in str(error)


async def test_concurrent_steps_raise_the_first_failure_as_itself() -> None:
    """The console watch and the ssh attempts run side by side: whichever fails first
    (an OSError as much as a HostKeyMismatch) cancels the other and comes out bare."""
    from asyncstage.concurrency import concurrently

    cancelled = anyio.Event()

    async def slow() -> None:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()

    async def fails() -> None:
        await anyio.sleep(0.01)
        raise OSError("no route")

    with anyio.fail_after(5), pytest.raises(OSError, match="no route"):
        await concurrently(slow, fails)
    assert cancelled.is_set()
    with pytest.raises(HostKeyMismatch):
        await concurrently(slow, _mismatch)
    # cleanups: the failure still comes out bare, but only once the others have finished
    finished: list[str] = []

    async def short() -> None:
        await anyio.sleep(0.2)
        finished.append("short")

    with anyio.fail_after(5), pytest.raises(OSError, match="no route"):
        await concurrently(short, fails, cancel_others=False)
    assert finished == ["short"]


async def _mismatch() -> None:
    raise HostKeyMismatch("changed", host="h")
