"""Manager on the local cloud: servers, fleets, adoption, on_exit and what is left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server, Volume
from asyncstage.ec2 import tag, tag_filters
from asyncstage.errors import (
    FleetError,
    NameTaken,
    UnknownServer,
    UnknownVolume,
    WaitTimeout,
)
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.fleet import calls_since, fleet_cycle

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


def _listening(address: str, port: int = 22) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


async def _live_instances(m: Manager, ids: list[str]) -> list[dict[str, Any]]:
    found = await m.ec2.describe_instances(ids)
    return [i for i in found if i["State"]["Name"] != "terminated"]


async def test_names_lookups_and_options(manager_factory: ManagerFactory) -> None:
    class MyServer(Server):
        pass

    class MyVolume(Volume):
        pass

    async with manager_factory(
        image="asyncstage-local-*", server_class=MyServer, volume_class=MyVolume
    ) as m:
        assert m.new_server_name().startswith("server-") and len(m.new_server_name()) == 15
        assert m.new_volume_name().startswith("volume-") and len(m.new_volume_name()) == 15
        s1 = await m.get_server("by-position")
        assert isinstance(s1, MyServer)
        assert await m.get_server(name="by-position") is s1
        assert await m.get_server("by-position") is s1
        assert m.find_server_by_instance(s1.instance_id) is s1
        assert m.find_server_by_instance(str(s1)) is s1
        assert m.servers() == [s1]
        with pytest.raises(UnknownServer):
            m.find_server_by_instance("i-0123456789abcdef0")
        with pytest.raises(UnknownVolume):
            m.find_volume_by_volid("vol-0123456789abcdef0")
        assert m.find_volume_by_name("nothing") is None
        with pytest.raises(NameTaken):
            await m.provision_server("by-position")
        assert await m.get_server_in_zone(s1.availability_zone) is s1
        s2 = await m.provision_server()  # always new, with a generated name
        assert s2.name.startswith("server-") and s2 is not s1
        vol = await m.provision_volume("opts-vol", size=1)
        assert isinstance(vol, MyVolume) and m.volumes() == [vol]
        assert m.keyfile.stat().st_mode & 0o777 == 0o600
        assert m.dotdir.stat().st_mode & 0o777 == 0o700


async def test_concurrent_provisions_coalesce(
    manager_factory: ManagerFactory, cloud: LocalCloud
) -> None:
    async with manager_factory(launch_window=0.3) as m:
        before = Counter(cloud.api_calls)
        servers: list[Server] = []

        async def one(name: str) -> None:
            servers.append(await m.provision_server(name))

        async with anyio.create_task_group() as tg:
            for n in ("co-1", "co-2", "co-3"):
                tg.start_soon(one, n)
        calls = calls_since(cloud, before)
        assert calls["RunInstances"] == 1
        assert {s.name for s in servers} == {"co-1", "co-2", "co-3"}
        outs = [await s.scmd("hostname") for s in servers]
        assert len(set(outs)) == 3


@pytest.mark.slow
async def test_fleet_calls_do_not_grow_with_fleet_size(
    manager_factory: ManagerFactory, cloud: LocalCloud
) -> None:
    async with manager_factory() as m:
        small = await fleet_cycle(m, cloud, 2, ask=True)
        big = await fleet_cycle(m, cloud, 20, ask=True)
    for phase, action in (
        ("provision", "RunInstances"),
        ("stop", "StopInstances"),
        ("start", "StartInstances"),
        ("terminate", "TerminateInstances"),
    ):
        assert big[phase][action] == small[phase][action] == 1, (phase, big, small)
        # one DescribeInstances per poll round, naming every instance still on its way:
        # none polled alone, whatever the fleet size (how many rounds a wait takes follows
        # the machine's load, so their number is no measure of it)
        for fleet in (small, big):
            assert fleet["polls"][phase] >= 1, (phase, fleet)
            assert fleet["partial polls"][phase] == 0, (phase, fleet)
            assert fleet["polls"][phase] <= fleet[phase]["DescribeInstances"], (phase, fleet)


async def test_wait_timeout_and_partial_fleet_failure(manager_factory: ManagerFactory) -> None:
    async with manager_factory() as m:
        up, down = await m.provision_servers(["wt-up", "wt-down"])
        await down.stop()
        with pytest.raises(FleetError) as info:
            await m.wait_for_servers([up, down], timeout=1)
        group = info.value
        assert group.succeeded == [up]
        assert len(group.exceptions) == 1
        err = group.exceptions[0]
        assert isinstance(err, WaitTimeout)
        assert "wt-down" in str(err) and down.instance_id in str(err)
        assert err.last_state == "stopped"
        assert "wt-down" in str(group)
        assert await m.wait_for_servers([up]) == [up]


async def test_second_manager_adopts_servers_and_volumes(manager_factory: ManagerFactory) -> None:
    async with manager_factory(on_exit="run") as first:
        server = await first.get_server("adoptee")
        vol = await server.provision_volume("adopted-vol", size=1, fstype="ext4")
        await vol.mkdir("marker")
        loose = await server.provision_volume("loose-vol", size=1)
        await loose.detach()
    async with manager_factory(scan=True) as second:
        s2 = second.find_server_by_name("adoptee")
        assert s2 is not None and s2.instance_id == server.instance_id
        assert s2.username == "admin" and s2.keyfile == first.keyfile
        v2 = second.find_volume_by_name("adopted-vol")
        assert v2 is not None and v2.volume_id == vol.volume_id
        assert v2.server is s2 and v2.mounted and v2.mtpt == vol.mtpt
        assert v2.mtdev == vol.mtdev and v2.fstype == "ext4"
        assert "marker" in await v2.ls()
        l2 = second.find_volume_by_name("loose-vol")
        assert l2 is not None and l2.server is None and not l2.mounted
        # servers made later by someone else are found by scan_region()
        async with manager_factory(on_exit="run") as third:
            later = await third.provision_server("later")
        assert second.find_server_by_name("later") is None
        await second.scan_region()
        found = second.find_server_by_name("later")
        assert found is not None and found.instance_id == later.instance_id
        # adopted things are not "ours": clean them up by hand
        await v2.delete()
        await l2.delete()
        await second.terminate_all_servers()
        assert second.servers() == []


@pytest.mark.parametrize("mode", ["stop", "run", "terminate"])
async def test_on_exit_when_the_block_raises(
    manager_factory: ManagerFactory, mode: str, tmp_path: Path
) -> None:
    server: Server | None = None
    with pytest.raises(RuntimeError):
        async with manager_factory(on_exit=mode, dotdir=tmp_path) as m:
            server = await m.provision_server(f"exit-{mode}")
            raise RuntimeError("boom")
    assert server is not None
    async with manager_factory(dotdir=tmp_path, scan=True) as check:
        found = await check.ec2.describe_instances([server.instance_id])
        state = found[0]["State"]["Name"]
        assert state == {"stop": "stopped", "run": "running", "terminate": "terminated"}[mode]
        await check.terminate_all_servers()


async def test_on_exit_when_cancelled(manager_factory: ManagerFactory, tmp_path: Path) -> None:
    ids: list[str] = []
    with anyio.move_on_after(60) as scope:
        async with manager_factory(on_exit="stop", dotdir=tmp_path) as m:
            ids = [(await m.provision_server("cancelled")).instance_id]
            scope.cancel()
            await anyio.sleep(30)
    assert scope.cancelled_caught and ids
    async with manager_factory(dotdir=tmp_path, scan=True) as check:
        found = await check.ec2.describe_instances(ids)
        assert found[0]["State"]["Name"] == "stopped"
        await check.terminate_all_servers()


async def test_nothing_left_behind_after_terminate(
    manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    async with manager_factory(on_exit="terminate", dotdir=tmp_path) as m:
        fleet = await m.provision_servers(["left-1", "left-2"])
        vol = await fleet[0].provision_volume("left-vol", size=1)
        snap = await vol.create_snapshot()
        detached = await fleet[1].provision_volume("left-detached", size=1)
        await detached.detach()
        key = m.key_pair
        addresses = [s.address for s in fleet]
        ids = [s.instance_id for s in fleet]
        vol_ids = [vol.volume_id, detached.volume_id]
    assert key is not None
    async with manager_factory(dotdir=tmp_path / "other") as check:
        assert not await _live_instances(check, ids)
        vols = await check.ec2.describe_volumes(vol_ids)
        assert [v for v in vols if v["State"] != "deleted"] == []
        assert not await check.ec2.key_pair_exists(key.name)
        tagged = await check.ec2.describe_volumes(filters=tag_filters({tag("name"): "left-vol"}))
        assert tagged == []
        # the snapshot is the backup: it stays
        assert await check.ec2.describe_snapshots([snap])
    for address in addresses:
        assert address is not None and not _listening(address)
    assert m.servers() == [] and m.volumes() == []


async def test_force_terminate_and_a_key_of_its_own(
    manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    async with manager_factory(dotdir=tmp_path, on_exit="run") as shared:
        shared_key = shared.key_pair
    async with manager_factory(dotdir=tmp_path, reuse_key=False, verbosity=0) as m:
        assert m.key_pair is not None and shared_key is not None
        assert m.key_pair.name != shared_key.name and m.keyfile != shared_key.private_key
        fleet = await m.provision_servers(count=2)
        assert {(await s.scmd("whoami")).strip() for s in fleet} == {"admin"}
        await m.force_terminate_all_servers()
        assert m.servers() == []
        found = await m.ec2.describe_instances([s.instance_id for s in fleet])
        assert {i["State"]["Name"] for i in found} <= {"shutting-down", "terminated"}


README_EXAMPLE_TIMEOUT = 300


def test_readme_example_runs(cloud: LocalCloud, tmp_path: Path) -> None:
    """The guide's async API example (docs/guide/servers.md) runs as printed (own cloud)."""
    page = (Path(__file__).parent.parent / "docs" / "guide" / "servers.md").read_text()
    section = page[page.index("# Servers and fleets") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```\n", start)]
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {"HOME": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=README_EXAMPLE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "admin" in done.stdout and "/mnt/Staging/Backup" in done.stdout
