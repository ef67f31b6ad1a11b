"""Devices and detach on the realistic local cloud, and volumes at scale.

The session cloud plays EC2: a volume's device node appears a moment after AttachVolume
(on a Xen type the attachment says ``attaching`` until then, on Nitro ``attached`` comes
first); Nitro types show volumes as NVMe devices named by serial, Xen types as
``/dev/xvdX``; a detach of a volume still mounted stays ``busy``; an instance type takes
only so many attachments.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from asyncstage import Manager, Server, Volume
from asyncstage.devices import is_nitro, nvme_link, volume_slots
from asyncstage.errors import EC2Error, VolumeInUse
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


@pytest.fixture
async def manager(manager_factory: ManagerFactory) -> AsyncIterator[Manager]:
    async with manager_factory() as m:
        yield m


async def _attachment_state(m: Manager, volume_id: str) -> str | None:
    (desc,) = await m.ec2.describe_volumes([volume_id])
    attachments = desc.get("Attachments") or []
    return str(attachments[0]["State"]) if attachments else None


async def test_nitro_node_comes_late_and_is_found_by_serial(
    cloud: LocalCloud, manager: Manager
) -> None:
    server = await manager.get_server("dev-nitro")  # t3.micro
    # a raw attachment: EC2 says attached before the node is there
    raw = await manager.ec2.create_volume(availability_zone=server.availability_zone, size=1)
    vid = str(raw["VolumeId"])
    await manager.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="available", timeout=30
    )
    began = time.monotonic()
    await manager.ec2.attach_volume(vid, server.instance_id, "/dev/sdf")
    early = await server.run("test", "-b", nvme_link(vid), check=False)
    if early.exit_status == 0:  # only ever after the shortest delay the cloud plays
        assert time.monotonic() - began >= cloud.realism.device[0]
    assert await _attachment_state(manager, vid) == "attached"
    await manager.ec2.detach_volume(vid)
    await manager.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="detached", timeout=30
    )
    await manager.ec2.delete_volume(vid)

    # the library waits for it and finds it by its serial, whatever N the kernel chose
    volume = await server.provision_volume("nitro-data", size=1)
    assert volume.mtdev is not None and re.fullmatch(r"/dev/nvme\d+n1", volume.mtdev)
    link = (await server.scmd("readlink", "-f", nvme_link(volume.volume_id))).strip()
    assert link == volume.mtdev
    assert volume.ec2_device == "/dev/sdf"
    await volume.delete()


async def _watch_attach(
    m: Manager, server: Server, device: str, node: Callable[[str], str]
) -> list[str]:
    """Attach a new volume under ``device``; the attachment states seen until ``attached``,
    each as ``state:node`` when ``node(volume id)`` was a block device right after."""
    raw = await m.ec2.create_volume(availability_zone=server.availability_zone, size=1)
    vid = str(raw["VolumeId"])
    await m.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="available", timeout=30
    )
    await m.ec2.attach_volume(vid, server.instance_id, device)
    seen: list[str] = []
    with anyio.move_on_after(60):  # bounded: a missing 'attached' fails on what was seen
        while True:
            state = await _attachment_state(m, vid)
            there = await server.run("test", "-b", node(vid), check=False)
            seen.append(f"{state}:node" if there.exit_status == 0 else str(state))
            if state == "attached":
                break
            await anyio.sleep(0.02)
    if not is_nitro(server.instance["InstanceType"]):  # the Perl module: mkfs right after it
        await server.scmd("mkfs.ext4", "-q", node(vid), sudo=True)
    await m.ec2.detach_volume(vid)
    await m.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="detached", timeout=30
    )
    await m.ec2.delete_volume(vid)
    return seen


async def test_xen_node_is_there_when_attached_nitro_node_may_come_after(
    cloud: LocalCloud, manager: Manager
) -> None:
    # Xen: the attach completes through blkfront before EC2 says 'attached'
    xen = await manager.get_server("att-xen", instance_type="m1.small")
    # a node delay that outlasts the first describe on a loaded machine too (the session
    # cloud's shortest is a twentieth of a second)
    with playing(cloud, device=(2.0, 2.0)):
        seen = await _watch_attach(manager, xen, "/dev/sdf1", lambda _: "/dev/xvdf1")
    assert seen[0] == "attaching", seen
    assert seen[-1] == "attached:node", seen  # 'attached' (read first): the node is there
    # and not long before: the node and the state change at one moment (a look at the
    # node after the state was read may see it one round early)
    assert set(seen[:-2]) <= {"attaching"}, seen
    # Nitro: 'attached' at once (only AttachVolume's answer says 'attaching'), the NVMe
    # node whenever the guest's hotplug scan finds it
    nitro = await manager.get_server("att-nitro")  # t3.micro
    seen = await _watch_attach(manager, nitro, "/dev/sdf", nvme_link)
    assert seen[0] in ("attached", "attached:node"), seen


async def test_xen_names_and_partition_style_names(manager: Manager) -> None:
    server = await manager.get_server("dev-xen", instance_type="t2.micro")
    assert server.instance["InstanceType"] == "t2.micro"
    # a volume attached by someone else under a partition-style name: EC2 takes it, the
    # Xen kernel shows /dev/xvdf1, and the library leaves that disk slot (f) alone
    raw = await manager.ec2.create_volume(availability_zone=server.availability_zone, size=1)
    vid = str(raw["VolumeId"])
    await manager.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="available", timeout=30
    )
    await manager.ec2.attach_volume(vid, server.instance_id, "/dev/sdf1")
    await server.scmd(
        "sh", "-c", "for i in $(seq 50); do [ -b /dev/xvdf1 ] && exit 0; sleep 0.1; done; exit 1"
    )
    assert (await server.unused_block_device())[0] == "/dev/sdg"
    volume = await server.provision_volume("xen-data", size=1)
    assert (volume.ec2_device, volume.mtdev) == ("/dev/sdg", "/dev/xvdg")
    assert "/dev/xvdg " in await server.scmd("cat", "/proc/mounts")
    assert not await server.scmd("sh", "-c", "ls /dev | grep '^nvme' || true")
    await volume.delete()
    await manager.ec2.detach_volume(vid)
    await manager.ec2.wait_for_volume(
        vid, lambda v: v.get("State") == "available", what="detached", timeout=30
    )
    await manager.ec2.delete_volume(vid)


async def test_volumes_up_to_the_type_limit_then_their_turn(manager: Manager) -> None:
    server = await manager.get_server("dev-many")  # t3.micro: 28 shared, 26 data volumes
    slots = volume_slots("t3.micro")
    assert slots == 26
    names = [f"many-{i:02d}" for i in range(slots)]
    volumes: dict[str, Volume] = {}

    async def make(name: str) -> None:
        volumes[name] = await server.provision_volume(name, size=1, fstype="raw")

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(make, name)
    devices = {v.ec2_device for v in volumes.values()}
    nodes = {v.mtdev for v in volumes.values()}
    assert len(devices) == len(nodes) == slots  # more than the 11 names of /dev/sd[f-p]
    assert {"/dev/sdq", "/dev/sdz"} <= devices

    # EC2 refuses one more attachment than the type takes
    raw = await manager.ec2.create_volume(availability_zone=server.availability_zone, size=1)
    extra = str(raw["VolumeId"])
    await manager.ec2.wait_for_volume(
        extra, lambda v: v.get("State") == "available", what="available", timeout=30
    )
    with pytest.raises(EC2Error) as refused:
        await manager.ec2.attach_volume(extra, server.instance_id, "/dev/xvdcz")
    assert refused.value.code == "AttachmentLimitExceeded"
    await manager.ec2.delete_volume(extra)

    # the library waits its turn instead: the next volume attaches once one is gone
    late: list[Volume] = []

    async def one_more() -> None:
        late.append(await server.provision_volume("many-late", size=1, fstype="raw"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one_more)
        await anyio.sleep(1.0)
        assert not late  # waiting for a slot
        await volumes.pop(names[0]).delete()
    assert late[0].server is server and late[0].mtdev is not None

    async def delete(v: Volume) -> None:
        await v.delete()

    async with anyio.create_task_group() as tg:
        for v in [*volumes.values(), *late]:
            tg.start_soon(delete, v)
    assert server.volumes() == []


async def _second_mount(server: Server, volume: Volume, where: str) -> None:
    assert volume.mtdev
    await server.scmd("mkdir", "-p", where, sudo=True)
    await server.scmd("mount", volume.mtdev, where, sudo=True)


async def test_busy_detach_waits_for_the_unmount(manager: Manager) -> None:
    server = await manager.get_server("dev-busy")
    volume = await server.provision_volume("busy-data", size=1)
    await _second_mount(server, volume, "/mnt/second")
    done = anyio.Event()

    async def detach() -> None:
        await volume.detach()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(detach)
        for _ in range(200):
            if await _attachment_state(manager, volume.volume_id) == "busy":
                break
            await anyio.sleep(0.1)
        else:
            pytest.fail("the detach never went busy")
        assert not done.is_set()
        await server.scmd("umount", "/mnt/second", sudo=True)
    assert volume.server is None
    assert await _attachment_state(manager, volume.volume_id) is None
    await volume.delete()


async def test_busy_detach_past_its_bound_names_the_mount_point(
    manager_factory: ManagerFactory,
) -> None:
    async with manager_factory(volume_timeout=3.0) as m:
        server = await m.get_server("dev-stuck")
        volume = await server.provision_volume("stuck-data", size=1)
        await _second_mount(server, volume, "/mnt/elsewhere")
        with pytest.raises(VolumeInUse, match="still mounted at /mnt/elsewhere"):
            await volume.detach()
        assert await _attachment_state(m, volume.volume_id) == "busy"
        # a forced detach takes it from under the mount, as on EC2
        await m.ec2.detach_volume(volume.volume_id, force=True)
        await m.ec2.wait_for_volume(
            volume.volume_id, lambda v: v.get("State") == "available", what="forced", timeout=30
        )
        assert " /mnt/elsewhere " not in await server.scmd("cat", "/proc/mounts")
        await volume.delete()  # EC2 detached it already: the library sees that and goes on
        assert m.volumes() == []


async def test_off_profile_refuses_a_mounted_detach_at_once(tmp_path: Path) -> None:
    async with (
        LocalCloud(realism="off") as off,
        off.manager(dotdir=tmp_path, on_exit="terminate", scan=False, poll_interval=0.2) as m,
    ):
        server = await m.get_server("dev-off")
        volume = await server.provision_volume("off-data", size=1)
        await _second_mount(server, volume, "/mnt/elsewhere")
        began = time.monotonic()
        with pytest.raises(VolumeInUse, match="still mounted at /mnt/elsewhere") as refused:
            await volume.detach()
        assert time.monotonic() - began < m.timeouts.volume  # refused, not waited out
        assert isinstance(refused.value.__cause__, EC2Error)
        assert await _attachment_state(m, volume.volume_id) == "attached"
        await server.scmd("umount", "/mnt/elsewhere", sudo=True)
        await volume.delete()
