"""Volumes on the local cloud: filesystems, mounts, snapshots and reuse, file commands, errors."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from asyncstage import Manager, Server, Volume
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import (
    BadFstype,
    BadSize,
    MountPointRefused,
    NameTaken,
    PathError,
    UnknownSnapshot,
    UnknownVolume,
    VolumeInUse,
    VolumeNotMounted,
    ZoneMismatch,
)
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("vol-host")


async def _mounted_fs(server: Server, volume: Volume) -> str:
    assert volume.mtpt
    return (await server.scmd("findmnt", "-n", "-o", "FSTYPE", volume.mtpt)).strip()


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return fstype in f.read().split()


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"])
async def test_filesystems(server: Server, fstype: str) -> None:
    label = "L" + fstype.upper()
    if not _kernel_has(fstype):  # local cloud servers share this kernel: a clear error
        with pytest.raises(BadFstype, match="kernel"):
            await server.provision_volume(f"fs-{fstype}", fstype=fstype, size=1)
        assert server.volumes() == [] and server.manager.volumes() == []
        return
    vol = await server.provision_volume(f"fs-{fstype}", fstype=fstype, size=1, label=label)
    assert vol.fstype == fstype and await vol.get_fstype() == fstype
    assert vol.mounted and vol.mtpt == f"/mnt/Staging/fs-{fstype}"
    assert await _mounted_fs(server, vol) == fstype
    assert vol.mtdev is not None
    got = await server.scmd("blkid", "-o", "value", "-s", "LABEL", vol.mtdev, sudo=True)
    assert got.strip() == label
    # the login user can write to a fresh volume
    await server.scmd("touch", f"{vol.mtpt}/mine")
    await vol.delete()
    assert vol not in server.volumes()


async def test_raw_volume_and_uuid(server: Server) -> None:
    raw = await server.add_volume("raw-one", fstype="raw", size=1)
    assert raw.fstype == "raw" and not raw.mounted and raw.mtdev is not None
    assert await raw.get_fstype() == ""
    uuid = "0b5c7d42-8a8e-4d0e-9a61-2f1f3b7c9e11"
    vol = await server.provision_volume("with-uuid", fstype="ext4", uuid=uuid, mtpt="/opt/data")
    assert vol.mtpt == "/opt/data"
    assert vol.mtdev is not None
    got = await server.scmd("blkid", "-o", "value", "-s", "UUID", vol.mtdev, sudo=True)
    assert got.strip() == uuid
    assert set(server.volumes()) == {raw, vol}


async def test_info_and_mount_lifecycle(manager: Manager, server: Server) -> None:
    vol = await server.provision_volume("life", size=1, mount="/srv/life")
    assert str(vol) == vol.volume_id and f"{vol}/sub" == f"{vol.volume_id}/sub"
    assert vol.name == "life" and vol.size == 1 and vol.manager is manager
    assert vol.server is server and vol.availability_zone == server.availability_zone
    assert manager.find_volume_by_volid(vol.volume_id) is vol
    assert manager.find_volume_by_name("life") is vol
    assert vol.fstab_line().split() == [
        vol.mtdev,
        "/srv/life",
        "ext4",
        "nosuid,nodev,nofail",
        "0",
        "2",
    ]
    await vol.mkdir("keep")
    await vol.unmount()
    assert not vol.mounted and vol.server is server
    assert "/srv/life" not in await server.scmd("cat", "/proc/mounts")
    await vol.remount()
    assert vol.mounted and "keep" in await vol.ls()
    await server.unmount_volume(vol)
    await server.remount_volume(vol)
    await server.mount_volume(vol, "/srv/elsewhere")
    assert vol.mtpt == "/srv/elsewhere" and "keep" in await vol.ls()
    snap = await server.create_snapshot(vol, "via the server")
    assert vol.mounted and snap.startswith("snap-")
    await vol.detach()
    assert vol.server is None and vol.mtdev is None and not vol.mounted
    # mount() with no server picks one in the volume's zone
    await vol.mount()
    assert vol.server is server and vol.mounted and "keep" in await vol.ls()
    other = await manager.provision_server("vol-other", availability_zone=server.availability_zone)
    await server.detach_volume(vol)
    await other.mount_volume(vol)
    assert vol.server is other and "keep" in await vol.ls()
    await vol.mount(server)  # moves it back: detached from the other first
    assert vol.server is server and "keep" in await vol.ls()
    await other.delete_volume(vol)
    assert manager.find_volume_by_name("life") is None
    with pytest.raises(UnknownVolume):
        manager.find_volume_by_volid(vol.volume_id)


async def test_a_mount_is_two_commands_and_reads_the_mount_table_once(
    server: Server, commands: list[str]
) -> None:
    """Each ssh command is a round trip (and a process) on the server: a mount is one
    command that resolves the mount point and reads the table, and one that makes the
    directory and mounts; the table is read again only after an unmount from elsewhere."""
    vol = await server.provision_volume("tables", size=1)
    try:
        await vol.unmount()

        def reads() -> int:
            return sum("/proc/mounts" in c for c in commands)

        commands.clear()
        await vol.remount()
        assert len(commands) == 2 and reads() == 1 and vol.mounted
        await server.mount_volume(vol, "/srv/tables-moved")  # unmounted first: read again
        assert reads() == 3 and vol.mtpt == "/srv/tables-moved"
        assert "/srv/tables-moved" in await server.scmd("cat", "/proc/mounts")
    finally:
        await server.delete_volume(vol)


async def test_an_unmount_is_one_command_where_the_volume_was_mounted(
    server: Server, commands: list[str]
) -> None:
    """Unmounting a volume that is still where it was mounted is one command; one that
    was moved by hand is found in the mount table and unmounted there."""
    vol = await server.provision_volume("unmounts", size=1)
    moved = "/srv/unmounts-by-hand"
    try:
        # busy (a process works inside): refused, and it stays mounted
        assert vol.mtpt
        busy = f"cd {vol.mtpt} && exec sleep 60 >/dev/null 2>&1 </dev/null"
        pid = (await server.scmd("sh", "-c", f"({busy}) & echo $!", sudo=True)).strip()
        try:
            with pytest.raises(VolumeInUse, match="cannot unmount"):
                await vol.unmount()
            assert vol.mounted and vol.mtpt in await server.scmd("cat", "/proc/mounts")
        finally:  # it ended (and its directory let go) before the next unmount
            gone = f"kill {pid}; n=0; while kill -0 {pid} 2>/dev/null && [ $n -lt 200 ]; do"
            await server.scmd("sh", "-c", f"{gone} n=$((n+1)); sleep 0.05; done", sudo=True)
        commands.clear()
        await vol.unmount()
        assert len(commands) == 1 and not vol.mounted
        assert vol.mtpt not in await server.scmd("cat", "/proc/mounts")
        await vol.remount()
        assert vol.mtdev and vol.mtpt
        await server.scmd("umount", vol.mtpt, sudo=True)  # someone moves it
        await server.scmd("mkdir", "-p", moved, sudo=True)
        await server.scmd("mount", vol.mtdev, moved, sudo=True)
        commands.clear()
        await vol.unmount()
        assert len(commands) == 3 and not vol.mounted  # tried, the table, the unmount
        assert moved not in await server.scmd("cat", "/proc/mounts")
    finally:
        await server.delete_volume(vol)
        await server.run("rmdir", moved, sudo=True, check=False)  # if the test made it


async def test_a_mount_where_the_tag_says_makes_no_call(manager: Manager, server: Server) -> None:
    """The mount point is a tag of the volume (for whoever adopts it): mounting it again
    where the tag says makes no CreateTags call; mounting it elsewhere makes one, and
    EC2 then says the new place."""
    vol = await server.provision_volume("tagged", size=1, mount="/srv/tagged")
    try:
        assert tags_of(vol.volume)[tag("mtpt")] == "/srv/tagged"
        before = manager.ec2.calls["CreateTags"]
        await vol.unmount()
        await vol.remount()
        await server.unmount_volume(vol)
        await server.mount_volume(vol, "/srv/tagged")
        assert manager.ec2.calls["CreateTags"] == before
        await server.mount_volume(vol, "/srv/tagged-moved")
        assert manager.ec2.calls["CreateTags"] == before + 1
        (found,) = await manager.ec2.describe_volumes([vol.volume_id])
        assert tags_of(found)[tag("mtpt")] == "/srv/tagged-moved"
    finally:
        await server.delete_volume(vol)


async def test_volumes_come_back_after_stop_and_start(server: Server) -> None:
    vol = await server.provision_volume("survivor", size=1)
    await vol.mkdir("still-here")
    await server.stop()
    assert not vol.mounted
    await server.start()
    assert vol.mounted and "still-here" in await vol.ls()


async def test_manager_provision_volume_finds_or_makes_a_server(
    manager_factory: ManagerFactory,
) -> None:
    async with manager_factory() as m:
        vol = await m.provision_volume("lonely", size=1, availability_zone="us-east-1b")
        assert vol.server is not None and vol.server.availability_zone == "us-east-1b"
        assert vol.mounted
        assert await m.get_volume("lonely") is vol
        again = await m.provision_volume("lonely")
        assert again is vol
        with pytest.raises(NameTaken):
            await m.provision_volume("lonely", reuse=False)
        made = await m.get_volume("made-by-get", size=1, availability_zone="us-east-1b")
        assert made.mounted and made.server is vol.server


async def test_file_commands(server: Server) -> None:
    vol = await server.provision_volume("files", size=1)
    odd = "it's a $dir; rm -rf x"
    assert await vol.mkdir("-p", f"{odd}/sub") == ""
    assert odd in (await vol.ls()).splitlines()
    await vol.cmd("sh", "-c", 'echo hi > "$1"', "sh", f"{odd}/f")
    assert (await vol.cmd("cat", f"{odd}/f")) == "hi\n"
    await vol.cp(f"/{odd}/f", "copy")
    await vol.mv("copy", "moved")
    await vol.chmod("600", "moved")
    await vol.chown("nobody", "moved")
    await vol.chgrp("nogroup", "moved")
    listing = await vol.ls("-l", "moved")
    assert listing.startswith("-rw-------") and "nobody nogroup" in listing
    assert "moved" in await vol.ls()
    await vol.rm("moved")
    await vol.rm("-r", f"{odd}/sub")
    await vol.rm(f"{odd}/f")
    await vol.rmdir(odd)
    assert (await vol.ls()).split() == ["lost+found"]
    assert "/mnt/Staging/files" in await vol.df()
    assert "/mnt/Staging/files" in await vol.df("-h")
    assert (await vol.cmd("pwd")).strip() == "/mnt/Staging/files"
    assert (await vol.cmd("whoami")).strip() == "root"
    assert await vol.ssh("test", "-d", "lost+found") is True
    assert await vol.ssh("test -d nothing-here") is False
    with pytest.raises(PathError):  # resolved on the server: outside the volume
        await vol.ls("../..")
    await vol.unmount()
    with pytest.raises(VolumeNotMounted):
        await vol.ls()


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
async def test_snapshot_reuse_and_growth(
    server: Server, manager: Manager, fstype: str, cloud: LocalCloud
) -> None:
    name = f"backup-{fstype}"
    vol = await server.provision_volume(name, fstype=fstype, size=1)
    await vol.mkdir("data")
    await vol.cmd("sh", "-c", "echo v1 > data/file")
    snap = await vol.create_snapshot("first")
    assert vol.mounted, "remounted after a clean snapshot"
    snaps = await manager.ec2.describe_snapshots([snap])
    tags = {t["Key"]: t["Value"] for t in snaps[0]["Tags"]}
    assert tags[tag("name")] == name and tags[tag("fstype")] == fstype
    await vol.cmd("sh", "-c", "echo v2 > data/file")
    snap2 = await vol.snapshot()
    assert snap2 != snap
    await vol.delete()
    # reuse: made again from the newest snapshot of that name, and grown
    again = await server.provision_volume(name, size=2, reuse=True)
    assert again.volume_id != vol.volume_id and again.size == 2 and again.fstype == fstype
    assert (await again.cmd("cat", "data/file")) == "v2\n"
    df = (await again.df("--block-size=1M", "--output=size")).split()
    assert int(df[-1]) > 1500, df
    # from an explicit snapshot, at its own size
    tagged = cloud.api_calls["CreateTags"]
    old = await server.provision_volume(f"{name}-old", snapshot_id=snap)
    assert old.size == 1 and (await old.cmd("cat", "data/file")) == "v1\n"
    # the snapshot's fstype and the mount point went on with the volume's creation
    assert cloud.api_calls["CreateTags"] == tagged
    assert old.fstype == fstype
    described = await manager.ec2.describe_volumes([old.volume_id])
    found_tags = {t["Key"]: t["Value"] for t in described[0]["Tags"]}
    assert found_tags[tag("fstype")] == fstype and found_tags[tag("mtpt")] == old.mtpt
    big = await again.create_snapshot()
    with pytest.raises(BadSize):  # smaller than the snapshot
        await server.provision_volume(f"{name}-small", snapshot_id=big, size=1)
    await again.delete()
    await old.delete()


async def test_attach_existing_volume_by_id(server: Server, manager: Manager) -> None:
    desc = await manager.ec2.create_volume(availability_zone=server.availability_zone, size=1)
    await manager.ec2.wait_for_volume(
        desc["VolumeId"], lambda v: v["State"] == "available", what="new volume", timeout=30
    )
    vol = await server.provision_volume("by-id", volume_id=desc["VolumeId"])
    assert vol.volume_id == desc["VolumeId"] and vol.fstype == "raw" and not vol.mounted
    await vol.delete()


async def test_errors(server: Server, manager: Manager) -> None:
    for size in (0, -1, 1.5, "1", True, 100000):
        with pytest.raises(BadSize):
            await server.provision_volume(size=size)  # type: ignore[arg-type]
    with pytest.raises(BadFstype):
        await server.provision_volume(fstype="reiserfs")
    for where in ("/", "/usr", "/var", "/etc", "/lib", "/lib64", "/proc/x", "/boot", "/sys"):
        with pytest.raises(MountPointRefused):
            await server.provision_volume(mtpt=where)
    with pytest.raises(MountPointRefused):
        await manager.provision_volume(mount="/bin")
    with pytest.raises(ZoneMismatch):
        await server.provision_volume(availability_zone="us-east-1c")
    other_zone = "us-east-1c" if server.availability_zone != "us-east-1c" else "us-east-1d"
    desc = await manager.ec2.create_volume(availability_zone=other_zone, size=1)
    with pytest.raises(ZoneMismatch):
        await server.provision_volume(volume_id=desc["VolumeId"])
    await manager.ec2.delete_volume(desc["VolumeId"])
    with pytest.raises(UnknownVolume):
        await server.provision_volume(volume_id="vol-0123456789abcdef0")
    with pytest.raises(UnknownSnapshot):
        await server.provision_volume(snapshot_id="snap-0123456789abcdef0")
    await server.provision_volume("taken", size=1)
    with pytest.raises(NameTaken):
        await server.provision_volume("taken", reuse=False)
    assert [v.name for v in server.volumes()] == ["taken"]  # nothing half-made left


async def test_mkfs_is_looked_up_once_and_one_gone_since_is_bad_fstype(
    server: Server, commands: list[str]
) -> None:
    """A server's mkfs program is looked up with its first new volume only; one removed
    since (in the instance's own root, a copy-on-write overlay) fails that volume's mkfs,
    which is then told as BadFstype, the half-made volume gone, and looked up again."""

    def lookups() -> int:
        return sum(c == "which mkfs.ext4" for c in commands)

    made = [await server.provision_volume("mkfs-once", size=1)]
    made.append(await server.provision_volume("mkfs-twice", size=1))
    assert lookups() == 1
    program = (await server.scmd("which", "mkfs.ext4", sudo=True)).strip()
    await server.scmd("mv", "--", program, f"{program}.gone", sudo=True)
    assert await anyio.Path(program).exists()  # the machine's own is untouched
    commands.clear()
    try:
        with pytest.raises(BadFstype, match=r"cannot make ext4 filesystems \(mkfs.ext4 missing"):
            await server.provision_volume("mkfs-gone", size=1)
        assert lookups() == 1  # asked again once its mkfs failed
        assert sorted(v.name for v in server.volumes()) == ["mkfs-once", "mkfs-twice"]
        assert not [
            v
            for v in await server.manager.ec2.describe_volumes()
            if tags_of(v).get("Name") == "mkfs-gone"
        ]
    finally:
        await server.scmd("mv", "--", f"{program}.gone", program, sudo=True)
    made.append(await server.provision_volume("mkfs-back", size=1))
    assert lookups() == 2 and made[-1].mounted  # found again: the cache was dropped
    for vol in made:
        await vol.delete()


async def test_copy_snapshot_and_image(manager_factory: ManagerFactory, server: Server) -> None:
    manager = server.manager
    vol = await server.provision_volume("to-copy", size=1)
    await vol.mkdir("copied-dir")
    snap = await vol.create_snapshot(wait=True)
    copy = await manager.copy_snapshot(snap, manager.region)
    assert copy != snap
    restored = await server.provision_volume("restored", snapshot_id=copy)
    assert "copied-dir" in await restored.ls()
    async with manager_factory(on_exit="terminate") as other:
        copy2 = await manager.copy_snapshot(snap, other)
        assert await other.ec2.describe_snapshots([copy2])
        image = server.instance["ImageId"]
        new_image = await manager.copy_image(image, other, name="copied-image")
        images = await other.ec2.describe_images([new_image])
        assert images[0]["State"] == "available" and images[0]["Name"] == "copied-image"


async def test_describes_of_many_snapshots_keep_to_ec2s_filter_limit(manager: Manager) -> None:
    """EC2 refuses a filter of more than 200 values (so does the local cloud): a
    describe of 251 snapshot ids, and a shared round while 251 are watched, ask in
    calls of 200 at most, and find the one that exists."""
    ec2 = manager.ec2
    (zone, *_) = await ec2.availability_zones()
    vol = await ec2.create_volume(availability_zone=zone, size=1)
    snap = str((await ec2.create_snapshot(vol["VolumeId"]))["SnapshotId"])
    unknown = [f"snap-{n:017x}" for n in range(250)]
    try:
        found = await ec2.describe_snapshots([*unknown, snap])
        assert [s["SnapshotId"] for s in found] == [snap]
        with contextlib.ExitStack() as watching:
            for sid in unknown:
                watching.enter_context(ec2.watching_snapshot(sid))
            assert list(await ec2.describe_snapshots_shared([snap])) == [snap]
    finally:
        await ec2.delete_snapshot(snap)
        await ec2.delete_volume(vol["VolumeId"])
