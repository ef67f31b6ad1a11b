"""The local cloud's snapshots and volumes from snapshots, copied out of the API call.

CreateSnapshot answers at once (``pending``) and CreateVolume from a snapshot at once
(``creating``), as EC2 does; the engine copies the images in threads of their own, out
of its lock. These tests hold it to EC2's semantics: the snapshot is the volume at the
instant of the call, whatever the instance writes after it; other calls are answered
while a copy runs; an AttachVolume waits for the copy of the volume; a DeleteVolume or
DeleteSnapshot during a copy corrupts nothing and leaves nothing; a cloud closed during
copies leaves no thread and no image. While an instance is held still for its copies
none of its processes is ever seen stopped (a parent that watches its children, as
``sudo`` does, would stop itself for good), and once the copies are over, however they
overlapped or ended, nothing of it stays held.

The copies must take a while for some of this to be seen: each volume holds 768 MiB of
data (the store here is ext4, copied run by run; on a filesystem with reflinks a copy
is instant and the test that needs a copy under way is skipped).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from botocore.exceptions import ClientError

from asyncstage.localcloud import LocalCloud, _storage
from asyncstage.localcloud._disks import FICLONE
from asyncstage.localcloud._freeze import namespace_pids
from tests.patience import patient_client
from tests.test_localcloud import (
    BY_ID,
    launch,
    node,
    sh,
    ssh,
    wait_snapshot,
    wait_state,
    wait_volume,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

DATA_MIB = 768


def _reflinks(where: Path) -> bool:
    """Whether the filesystem of ``where`` shares blocks between files (FICLONE)."""
    a, b = where / ".reflink-probe-a", where / ".reflink-probe-b"
    try:
        a.write_bytes(b"x" * 4096)
        with open(a, "rb") as src, open(b, "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    return False
                raise
        return True
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def _copies(cloud: LocalCloud) -> set[str]:
    """The ids whose images the engine is copying (white box)."""
    engine = cloud._engine
    with engine.lock:
        return set(engine.copies)


def _images(cloud: LocalCloud) -> set[str]:
    return {p.name for d in ("volumes", "snapshots") for p in (Path(cloud.state_dir) / d).iterdir()}


def _stopped(cloud: LocalCloud, instance_id: str) -> list[str]:
    """The instance's processes in the stopped state (``T``: what their parents see and
    ``sudo`` answers by stopping itself), as "pid name" (white box)."""
    engine = cloud._engine
    with engine.lock:
        pid = engine.machines[instance_id].host.init_pid
    found = []
    for p in namespace_pids(pid) if pid is not None else ():
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if state in "Tt":
            found.append(f"{p} {name}")
    return found


def _held(cloud: LocalCloud, instance_id: str) -> tuple[bool, bool]:
    """(whether the engine holds the instance still, whether its cgroup is frozen)."""
    engine = cloud._engine
    with engine.lock:
        held = instance_id in engine._frozen
        freezer = engine.machines[instance_id].host.freezer
    frozen = freezer is not None and (freezer / "cgroup.freeze").read_text().strip() == "1"
    return held, frozen


async def _answers(ec2: Any, key: asyncssh.SSHKey, instance: dict[str, Any]) -> None:
    """A new ssh session on the instance runs a ``sudo`` command to its end."""
    with anyio.fail_after(60):
        async with ssh(ec2, instance, key) as conn:
            assert await sh(conn, "sudo -n echo up") == "up\n"


async def _drop(ec2: Any, vol: str) -> None:
    """Detach (forced, if it is attached) and delete a volume of a test."""
    with contextlib.suppress(ClientError):
        await ec2.detach_volume(VolumeId=vol, Force=True)
        await wait_volume(ec2, vol, "available")
    with contextlib.suppress(ClientError):
        await ec2.delete_volume(VolumeId=vol)


async def _snapshot_each(ec2: Any, volumes: list[str]) -> list[str]:
    """A CreateSnapshot of each volume, all at once; the snapshots' ids."""
    made: dict[str, str] = {}

    async def one(vol: str) -> None:
        made[vol] = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]

    async with anyio.create_task_group() as tg:
        for vol in volumes:
            tg.start_soon(one, vol)
    return [made[v] for v in volumes]


def _fill(image: Path) -> None:
    """DATA_MIB of data at the start of a detached volume's image, as an instance writes."""
    chunk = os.urandom(16 << 20)
    with open(image, "r+b") as f:
        for _ in range(DATA_MIB >> 4):
            f.write(chunk)


@pytest.fixture(scope="module")
async def pair(cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey) -> list[dict[str, Any]]:
    """Two running instances: one writes, the other reads what the snapshots hold."""
    ids = await launch(cloud, ec2, 2)
    return await wait_state(ec2, ids, "running")


@contextlib.asynccontextmanager
async def data_volume(
    ec2: Any, key: asyncssh.SSHKey, instance: dict[str, Any]
) -> AsyncIterator[tuple[str, asyncssh.SSHClientConnection, str]]:
    """A 2 GiB volume attached to ``instance``, ext4 at /data, holding DATA_MIB of data
    (``/data/big``); (its id, a connection to the instance, the device). Deleted after."""
    zone = instance["Placement"]["AvailabilityZone"]
    vol = (await ec2.create_volume(Size=2, AvailabilityZone=zone))["VolumeId"]
    try:
        await ec2.attach_volume(VolumeId=vol, InstanceId=instance["InstanceId"], Device="/dev/sdf")
        await wait_volume(ec2, vol, "in-use")
        async with ssh(ec2, instance, key) as conn:
            device = await node(conn, BY_ID + vol.replace("-", ""))
            await sh(conn, f"sudo -n mkfs.ext4 -q {device} && sudo -n mkdir -p /data")
            await sh(conn, f"sudo -n mount {device} /data && sudo -n mkdir /data/n")
            await sh(conn, "sudo -n chown admin /data/n")
            await sh(
                conn,
                f"sudo -n dd if=/dev/urandom of=/data/big bs=1M count={DATA_MIB} "
                "conv=fsync status=none",
            )
            yield vol, conn, device
    finally:
        with contextlib.suppress(ClientError):
            await ec2.detach_volume(VolumeId=vol, Force=True)
            await wait_volume(ec2, vol, "available")
        with contextlib.suppress(ClientError):
            await ec2.delete_volume(VolumeId=vol)


async def _unmounted(ec2: Any, conn: asyncssh.SSHClientConnection, vol: str) -> None:
    """Unmount /data and detach the volume (it stays for the test)."""
    await sh(conn, "sudo -n umount /data")
    await ec2.detach_volume(VolumeId=vol)
    await wait_volume(ec2, vol, "available")


@contextlib.asynccontextmanager
async def restored(
    ec2: Any, key: asyncssh.SSHKey, instance: dict[str, Any], snapshot_id: str
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A volume from ``snapshot_id`` mounted at /restored on ``instance``; deleted after."""
    zone = instance["Placement"]["AvailabilityZone"]
    made = await ec2.create_volume(SnapshotId=snapshot_id, AvailabilityZone=zone)
    vol = made["VolumeId"]
    try:
        assert made["State"] == "creating"  # until the engine has copied the image
        await wait_volume(ec2, vol, "available", within=120)
        await ec2.attach_volume(VolumeId=vol, InstanceId=instance["InstanceId"], Device="/dev/sdg")
        await wait_volume(ec2, vol, "in-use")
        async with ssh(ec2, instance, key) as conn:
            device = await node(conn, BY_ID + vol.replace("-", ""))
            await sh(conn, f"sudo -n mkdir -p /restored && sudo -n mount {device} /restored")
            try:
                yield conn
            finally:
                await sh(conn, "sudo -n umount /restored")
        await ec2.detach_volume(VolumeId=vol)
        await wait_volume(ec2, vol, "available")
    finally:
        await _drop(ec2, vol)


async def test_a_snapshot_is_the_volume_at_the_instant_of_the_call(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    writer_host, reader = pair
    async with data_volume(ec2, key, writer_host) as (vol, conn, _):
        # files 1, 2, 3, ... each made whole (written aside, then renamed) and synced, in
        # that order: a snapshot holds 1..k for the k of its instant, and nothing else
        step = "echo $i > /data/n/.t; sync /data/n/.t; mv /data/n/.t /data/n/$i; sync /data/n"
        writer = f"i=0; while :; do i=$((i+1)); {step}; done"
        start = f"setsid sh -c '{writer}' </dev/null >/dev/null 2>&1 & echo $!"
        pid = (await sh(conn, start)).strip()
        count = "ls /data/n | wc -l"
        try:
            with anyio.fail_after(60):
                while int(await sh(conn, count)) < 20:  # noqa: ASYNC110 - counted there
                    await anyio.sleep(0.05)
            # written before the call but never synced: still only in the instance's cache
            await sh(conn, "echo unsynced | sudo -n tee /data/unsynced >/dev/null")
            before = int(await sh(conn, count))
            snap = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
            # written after the call: never in the snapshot
            await sh(conn, "sudo -n touch /data/after && sync /data")
            after = int(await sh(conn, count))
        finally:
            # the writer's whole session (a sync or mv it started may outlive the shell),
            # waited for: its files on /data keep it busy, and it is unmounted next
            gone = f"kill -- -{pid}; n=0; while kill -0 -- -{pid} 2>/dev/null && [ $n -lt 200 ]"
            await sh(conn, f"{gone}; do n=$((n+1)); sleep 0.05; done")
        await wait_snapshot(ec2, snap, within=120)
        await _unmounted(ec2, conn, vol)
    async with restored(ec2, key, reader, snap) as rconn:
        names = (await sh(rconn, "ls /restored/n")).split()
        numbers = sorted(int(n) for n in names if n.isdigit())
        assert numbers == list(range(1, len(numbers) + 1))  # no gap: a prefix of the order
        assert before <= len(numbers) <= after
        assert not (await sh(rconn, "ls /restored")).count("after")
        assert await sh(rconn, "cat /restored/unsynced") == "unsynced\n"
        size = await sh(rconn, "stat -c %s /restored/big")
        assert int(size) == DATA_MIB << 20
    await ec2.delete_snapshot(SnapshotId=snap)


async def test_calls_are_answered_while_a_copy_runs_and_attach_waits_for_it(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    if _reflinks(Path(cloud.state_dir)):
        pytest.skip("the store shares blocks (reflink): a copy is over at once")
    writer_host, reader = pair
    async with data_volume(ec2, key, writer_host) as (vol, conn, _):
        digest = (await sh(conn, "sha256sum < /data/big")).split()[0]
        await _unmounted(ec2, conn, vol)
        made = await ec2.create_snapshot(VolumeId=vol)
        snap = made["SnapshotId"]
        assert made["State"] == "pending"
        # DescribeVolumes answered while the engine copies (seen under way before and after)
        during = 0
        while snap in _copies(cloud):
            await ec2.describe_volumes(VolumeIds=[vol])
            during += snap in _copies(cloud)
        assert during > 0
        # a second snapshot, and the volume attached at once: the attach waits for the copy
        await anyio.sleep(1.0)  # EC2's per-volume CreateSnapshot rate
        second = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
        await ec2.attach_volume(
            VolumeId=vol, InstanceId=writer_host["InstanceId"], Device="/dev/sdf"
        )
        assert second not in _copies(cloud)
        await wait_volume(ec2, vol, "in-use")
        await sh(conn, "true")  # the instance runs on
        await ec2.detach_volume(VolumeId=vol)
        await wait_volume(ec2, vol, "available")
    for s in (snap, second):
        await wait_snapshot(ec2, s, within=120)
        async with restored(ec2, key, reader, s) as rconn:
            assert (await sh(rconn, "sha256sum < /restored/big")).split()[0] == digest
        await ec2.delete_snapshot(SnapshotId=s)


async def test_deletes_during_a_copy(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    writer_host, reader = pair
    zone = writer_host["Placement"]["AvailabilityZone"]
    async with data_volume(ec2, key, writer_host) as (vol, conn, _):
        digest = (await sh(conn, "sha256sum < /data/big")).split()[0]
        await _unmounted(ec2, conn, vol)
        kept = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
        await ec2.delete_volume(VolumeId=vol)  # the source goes: the snapshot is whole
        await wait_snapshot(ec2, kept, within=120)
    # a snapshot deleted while it is copied, and a volume deleted while it is made
    gone = (await ec2.copy_snapshot(SourceSnapshotId=kept, SourceRegion="us-east-1"))["SnapshotId"]
    await ec2.delete_snapshot(SnapshotId=gone)
    made = (await ec2.create_volume(SnapshotId=kept, AvailabilityZone=zone))["VolumeId"]
    with pytest.raises(ClientError, match="IncorrectState"):  # still creating
        await ec2.attach_volume(VolumeId=made, InstanceId=reader["InstanceId"], Device="/dev/sdh")
    await ec2.delete_volume(VolumeId=made)
    with anyio.fail_after(60):
        while _copies(cloud) & {gone, made}:  # noqa: ASYNC110 - the engine's threads
            await anyio.sleep(0.05)
    assert not {f"{gone}.img", f"{made}.img"} & _images(cloud)
    async with restored(ec2, key, reader, kept) as rconn:
        assert (await sh(rconn, "sha256sum < /restored/big")).split()[0] == digest
    await ec2.delete_snapshot(SnapshotId=kept)
    assert f"{kept}.img" not in _images(cloud)


async def test_a_cloud_closed_during_copies_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()  # the cloud's own files go at its close, the directory stays
    cloud = LocalCloud(realism="off", state_dir=state)
    async with cloud, patient_client(**cloud.session_kwargs()) as ec2:
        vol = (await ec2.create_volume(Size=2, AvailabilityZone="us-east-1a"))["VolumeId"]
        await anyio.to_thread.run_sync(_fill, cloud._engine.disks[vol].image)
        snaps = [(await ec2.create_snapshot(VolumeId=vol))["SnapshotId"] for _ in range(3)]
        assert _copies(cloud) & set(snaps)  # closed while they are copied
    assert not [t.name for t in threading.enumerate() if t.name.startswith("localcloud-copy-")]
    assert not list(state.rglob("*.img"))


async def test_overlapping_copies_never_stop_the_instance_and_leave_it_running(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    """CreateSnapshot, CreateSnapshots, a DeleteSnapshot during a copy and a volume made
    from a snapshot, all at once on one instance's volumes, while the instance runs a
    ``sudo`` command: no process of it is seen stopped while it is held still, and after
    the copies it is neither held nor frozen and answers."""
    writer_host, _ = pair
    iid = writer_host["InstanceId"]
    zone = writer_host["Placement"]["AvailabilityZone"]
    small = (await ec2.create_volume(Size=1, AvailabilityZone=zone))["VolumeId"]
    made: list[str] = []
    snaps: list[str] = []
    try:
        async with data_volume(ec2, key, writer_host) as (big, conn, _):
            await ec2.attach_volume(VolumeId=small, InstanceId=iid, Device="/dev/sdg")
            await wait_volume(ec2, small, "in-use")
            device = await node(conn, BY_ID + small.replace("-", ""))
            await sh(conn, f"sudo -n mkfs.ext4 -q {device} && sudo -n mkdir -p /small")
            await sh(conn, f"sudo -n mount {device} /small && echo s | sudo -n tee /small/s")
            # a command under sudo for the whole test (sudo waits for its stops)
            await sh(conn, "setsid sudo -n sleep 600 </dev/null >/dev/null 2>&1 &")
            seen_frozen = False

            async def watch() -> None:  # while copies of the instance's volumes run
                nonlocal seen_frozen
                while _copies(cloud) & set(snaps):
                    assert _stopped(cloud, iid) == []
                    seen_frozen |= _held(cloud, iid)[1]
                    await anyio.sleep(0.01)

            for turn in range(3):
                if turn:
                    await anyio.sleep(1.1)  # EC2's per-volume CreateSnapshot rate
                if turn == 1:
                    spec = {"InstanceId": iid, "ExcludeBootVolume": True}
                    reply = await ec2.create_snapshots(InstanceSpecification=spec)
                    new = [s["SnapshotId"] for s in reply["Snapshots"]]
                    assert len(new) == 2
                else:
                    new = await _snapshot_each(ec2, [big, small])
                snaps.extend(new)
                if turn == 2:  # one deleted while it is copied, a volume from the first
                    await ec2.delete_snapshot(SnapshotId=new[0])
                    snaps.remove(new[0])
                    await wait_snapshot(ec2, snaps[0], within=120)
                    vol = await ec2.create_volume(SnapshotId=snaps[0], AvailabilityZone=zone)
                    made.append(vol["VolumeId"])
                await watch()
            for snap in snaps:
                await wait_snapshot(ec2, snap, within=120)
            for vol in made:
                await wait_volume(ec2, vol, "available", within=120)
            assert _held(cloud, iid) == (False, False)
            assert _stopped(cloud, iid) == []
            if cloud._engine.machines[iid].host.freezer is not None:
                assert seen_frozen  # held still by its cgroup while its volumes were read
            await _answers(ec2, key, writer_host)
            await sh(conn, "sudo -n pkill -x sleep; sudo -n umount /small")
            await ec2.detach_volume(VolumeId=small)
            await wait_volume(ec2, small, "available")
    finally:
        for vol in [small, *made]:
            await _drop(ec2, vol)
        for snap in snaps:
            with contextlib.suppress(ClientError):
                await ec2.delete_snapshot(SnapshotId=snap)


@pytest.mark.parametrize("fault", [OSError(errno.EIO, "I/O error"), RuntimeError("a bug")])
async def test_a_failed_copy_lets_the_instance_go(
    cloud: LocalCloud,
    ec2: Any,
    key: asyncssh.SSHKey,
    pair: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    fault: BaseException,
) -> None:
    """A copy that fails (an I/O error, or any other exception) ends as ``error`` and
    takes its hold on the instance with it."""
    writer_host, _ = pair
    iid = writer_host["InstanceId"]
    zone = writer_host["Placement"]["AvailabilityZone"]
    vol = (await ec2.create_volume(Size=1, AvailabilityZone=zone))["VolumeId"]
    real = _storage.copy_image

    def failing(source: int, dest: int, stop: threading.Event, size: int = 0) -> int:
        time.sleep(0.2)  # under way for a moment, the instance held still
        raise fault

    try:
        await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdh")
        await wait_volume(ec2, vol, "in-use")
        monkeypatch.setattr(_storage, "copy_image", failing)
        snap = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
        try:
            with anyio.fail_after(60):
                while True:
                    found = (await ec2.describe_snapshots(SnapshotIds=[snap]))["Snapshots"]
                    if found[0]["State"] == "error":
                        break
                    await anyio.sleep(0.05)
        finally:
            monkeypatch.setattr(_storage, "copy_image", real)
            await ec2.delete_snapshot(SnapshotId=snap)
        assert _held(cloud, iid) == (False, False)
        assert _stopped(cloud, iid) == []
        await _answers(ec2, key, writer_host)
        await ec2.detach_volume(VolumeId=vol)
        await wait_volume(ec2, vol, "available")
    finally:
        await _drop(ec2, vol)


async def test_an_unmounted_volume_is_copied_without_freezing_its_instance(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    """An attached volume that is not mounted and whose device nobody holds open (a
    backup's work volume at its snapshot): nothing of the instance can write to it, so
    the instance goes on while the image is copied, and the snapshot is whole."""
    if _reflinks(Path(cloud.state_dir)):
        pytest.skip("the store shares blocks (reflink): a copy is over at once")
    writer_host, reader = pair
    iid = writer_host["InstanceId"]
    async with data_volume(ec2, key, writer_host) as (vol, conn, _):
        digest = (await sh(conn, "sha256sum < /data/big")).split()[0]
        await sh(conn, "sudo -n umount /data")
        snap = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
        during = 0
        while snap in _copies(cloud):
            assert _held(cloud, iid) == (False, False)
            during += 1
            await anyio.sleep(0.01)
        assert during > 0
        assert await sh(conn, "sudo -n echo on") == "on\n"
        await wait_snapshot(ec2, snap, within=120)
    async with restored(ec2, key, reader, snap) as rconn:
        assert (await sh(rconn, "sha256sum < /restored/big")).split()[0] == digest
    await ec2.delete_snapshot(SnapshotId=snap)


def _fs_type(path: Path) -> str | None:
    """The type of the filesystem mounted at ``path`` (None: nothing mounted there)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[2]
    return None


def _same_ends(a: Path, b: Path, size: int) -> bool:
    """Whether two images hold the same first and last MiB of their first ``size`` bytes."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for at in (0, size - (1 << 20)):
            fa.seek(at)
            fb.seek(at)
            if fa.read(1 << 20) != fb.read(1 << 20):
                return False
    return True


async def test_the_reflink_store_shares_a_snapshots_blocks() -> None:
    """With ``store="reflink"`` the images live in an XFS of the cloud's own: a snapshot
    and a volume made from it hold the volume's data without a copy of it (the store's
    used space stays), and the volume from the snapshot reads back the same bytes."""
    async with (
        LocalCloud(store="reflink") as cloud,
        patient_client(**cloud.session_kwargs()) as ec2,
    ):
        store = Path(cloud.state_dir) / "store"
        assert cloud.store == "reflink" and _fs_type(store) == "xfs"

        def used() -> int:
            st = os.statvfs(store)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        vol = (await ec2.create_volume(Size=2, AvailabilityZone="us-east-1a"))["VolumeId"]
        image = store / "volumes" / f"{vol}.img"
        _fill(image)
        os.sync()
        before = used()
        snap = (await ec2.create_snapshot(VolumeId=vol))["SnapshotId"]
        await wait_snapshot(ec2, snap, within=60)
        made = await ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a")
        await wait_volume(ec2, made["VolumeId"], "available", within=60)
        os.sync()
        assert used() - before < (DATA_MIB << 20) // 8  # shared, not copied twice
        copy = store / "volumes" / f"{made['VolumeId']}.img"
        assert _same_ends(image, copy, DATA_MIB << 20)
