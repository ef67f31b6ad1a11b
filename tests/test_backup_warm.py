"""Kept work volumes (``keep_volume``): a rerun copies only the change into the volume the
previous run kept, and uses it only when it holds the backup's newest complete snapshot;
a stale one is deleted by the run, sweep or forget, and nothing else is left behind."""

from __future__ import annotations

import filecmp
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup.snapshots import usable
from asyncstage.backup.warm import COPYING, KEPT_TAG
from asyncstage.ec2 import tag, tag_filters, tags_of
from asyncstage.localcloud import LocalCloud
from asyncstage.retention import Policy
from tests.backup_support import NOTHING, cli_command, leftovers
from tests.fixtures.cloud import ManagerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

NAMES = ("warm", "warm-stale", "warm-gone")


@pytest.fixture
async def manager(manager_factory: ManagerFactory) -> AsyncIterator[Manager]:
    async with manager_factory() as m:
        try:
            yield m
        finally:
            for name in NAMES:  # kept volumes first (they are the tests'), then snapshots
                vols = await m.ec2.describe_volumes(filters=tag_filters({tag("name"): name}))
                for v in vols:
                    if v.get("State") != "deleted":
                        volume = next(
                            (x for x in m.volumes() if x.volume_id == v["VolumeId"]), None
                        )
                        if volume is not None:
                            await volume.delete()
                snaps = await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name}))
                for snap in snaps:
                    await m.ec2.delete_snapshot(snap["SnapshotId"])


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("warm-host")


def _tree(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(8):
        (root / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * (i * 40 + 1))
    (root / "blob.bin").write_bytes(os.urandom(200_000))
    return root


async def _kept(m: Manager, name: str) -> list[dict[str, str]]:
    """The tags of each volume EC2 still has under the backup's name."""
    found = await m.ec2.describe_volumes(filters=tag_filters({tag("name"): name}))
    return [
        tags_of(v) | {"VolumeId": str(v["VolumeId"])} for v in found if v.get("State") != "deleted"
    ]


async def _mounted(server: Server, name: str) -> bool:
    mounts = await server.scmd("findmnt", "-rn", "-o", "TARGET", check=False)
    return any(line.rstrip("/").endswith(f"/{name}") for line in mounts.splitlines())


async def test_a_rerun_copies_the_change_into_the_kept_volume(
    manager: Manager,
    manager_factory: ManagerFactory,
    server: Server,
    cloud: LocalCloud,
    tmp_path: Path,
) -> None:
    m = manager
    src = _tree(tmp_path / "src")
    first = await backup.backup(m, "warm", [src], server=server, keep_volume=True)
    assert first.volume_kept and not first.volume_reused
    (kept,) = await _kept(m, "warm")
    assert kept["VolumeId"] == first.volume_id and kept[KEPT_TAG] == first.snapshot_id
    assert not await _mounted(server, "warm")  # kept attached, unmounted between runs

    (src / "docs" / "f3.txt").write_text("changed\n")
    made = cloud.api_calls["CreateVolume"]
    second = await backup.backup(m, "warm", [src], server=server, keep_volume=True)
    assert cloud.api_calls["CreateVolume"] == made  # no volume made: the kept one used
    assert second.volume_reused and second.volume_id == first.volume_id
    assert second.previous_snapshot_id == first.snapshot_id
    assert second.files == 1 and second.manifest_reused > 0
    (kept,) = await _kept(m, "warm")
    assert kept[KEPT_TAG] == second.snapshot_id

    # another controller (a new manager: it finds the volume by its tags) uses it too
    (src / "new.txt").write_text("new\n")
    async with manager_factory(scan=True, on_exit="run") as other:
        there = other.find_server_by_name(server.name)
        made = cloud.api_calls["CreateVolume"]
        third = await backup.backup(other, "warm", [src], server=there, keep_volume=True)
        assert cloud.api_calls["CreateVolume"] == made
        assert third.volume_reused and third.volume_id == first.volume_id and third.files == 1

    # the snapshot a kept volume made holds the sources, as one made from scratch would
    restored = await backup.restore(m, "warm", tmp_path / "restored")
    assert restored.snapshot_id == third.snapshot_id
    copy = tmp_path / "restored" / str(src).lstrip("/")
    compare = filecmp.dircmp(src, copy)
    assert not (compare.left_only or compare.right_only or compare.diff_files)
    assert (copy / "docs" / "f3.txt").read_text() == "changed\n"

    # a run without keep_volume drops the kept volume and leaves nothing but snapshots
    fourth = await backup.backup(m, "warm", [src], server=server)
    assert not fourth.volume_reused and not fourth.volume_kept
    assert fourth.previous_snapshot_id == third.snapshot_id
    assert await leftovers(m, "warm") == NOTHING
    assert [x for x in m.volumes() if x.name == "warm"] == []


async def test_a_kept_volume_that_does_not_hold_the_newest_backup_is_not_used(
    manager: Manager, server: Server, cloud: LocalCloud, tmp_path: Path
) -> None:
    m = manager
    src = _tree(tmp_path / "src")
    first = await backup.backup(m, "warm-stale", [src], server=server, keep_volume=True)
    second = await backup.backup(m, "warm-stale", [src], server=server, keep_volume=True)
    assert second.volume_reused
    # someone tags it as holding the older backup (a complete one, not the newest)
    await m.ec2.create_tags([second.volume_id], {KEPT_TAG: first.snapshot_id})

    (src / "docs" / "f1.txt").write_text("changed\n")
    made = cloud.api_calls["CreateVolume"]
    third = await backup.backup(m, "warm-stale", [src], server=server, keep_volume=True)
    assert cloud.api_calls["CreateVolume"] == made + 1  # a volume from the snapshot
    assert not third.volume_reused and third.volume_id != second.volume_id
    assert third.previous_snapshot_id == second.snapshot_id
    (kept,) = await _kept(m, "warm-stale")  # the stale one deleted by the run
    assert kept["VolumeId"] == third.volume_id and kept[KEPT_TAG] == third.snapshot_id

    # a volume tagged with every right tag but that EC2 says did not make the snapshot
    forged = await m.ec2.create_volume(
        availability_zone=server.availability_zone,
        size=1,
        tags={k: v for k, v in kept.items() if k != "VolumeId"},
    )
    await m.find_volume_by_volid(third.volume_id).delete()
    await m.scan_region()  # the forged one adopted: it carries our owner tag
    made = cloud.api_calls["CreateVolume"]
    fourth = await backup.backup(m, "warm-stale", [src], server=server, keep_volume=True)
    assert cloud.api_calls["CreateVolume"] == made + 1
    assert not fourth.volume_reused and fourth.volume_id != forged["VolumeId"]
    assert forged["VolumeId"] in fourth.swept  # removed: it holds no backup of this name
    assert [k["VolumeId"] for k in await _kept(m, "warm-stale")] == [fourth.volume_id]


async def test_sweep_and_forget_keep_the_kept_volume_until_its_backup_is_gone(
    manager: Manager, server: Server, cloud: LocalCloud, cloud_dotdir: Path, tmp_path: Path
) -> None:
    m = manager
    src = _tree(tmp_path / "src")
    first = await backup.backup(m, "warm-gone", [src], server=server, keep_volume=True)
    (src / "more.txt").write_text("more\n")
    second = await backup.backup(m, "warm-gone", [src], server=server, keep_volume=True)

    argv, env = cli_command(cloud, cloud_dotdir, "--json", "backup", "list")
    with anyio.fail_after(120):
        listed = await anyio.run_process(argv, env=env)
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "warm-gone"]
    assert row["kept_volume"] == second.volume_id and row["newest"] == second.snapshot_id

    swept = await backup.sweep(m, "warm-gone")
    assert swept.kept_volumes == [second.volume_id] and swept.volumes == []
    forgot = await backup.forget(m, ["warm-gone"], Policy(last=1))
    assert forgot.removed == {"warm-gone": [first.snapshot_id]} and forgot.volumes == {}
    assert [k["VolumeId"] for k in await _kept(m, "warm-gone")] == [second.volume_id]

    # the backup forgotten altogether (its snapshots deleted): its kept volume goes too
    for snap in await m.snapshots("warm-gone"):
        await m.ec2.delete_snapshot(snap["SnapshotId"])
    swept = await backup.sweep(m, "warm-gone")
    assert swept.volumes == [second.volume_id] and swept.kept_volumes == []
    assert await leftovers(m, "warm-gone") == NOTHING
    assert [x for x in m.volumes() if x.name == "warm-gone"] == []
    assert not await _mounted(server, "warm-gone")


async def test_a_run_that_dies_in_a_kept_volume_leaves_a_work_volume_the_next_run_drops(
    manager: Manager, server: Server, cloud: LocalCloud, tmp_path: Path
) -> None:
    """A run is cancelled mid-copy into the kept volume: the volume is deleted (it is no
    longer what the snapshot holds); a kept volume tagged ``copying`` (a run killed there)
    is a dead run's work volume, never used again."""
    m = manager
    src = _tree(tmp_path / "src")
    first = await backup.backup(m, "warm", [src], server=server, keep_volume=True)
    (src / "docs" / "f2.txt").write_text("changed\n")

    class Stop(Exception):
        pass

    def stop_at_rsync(phase: str) -> None:
        if phase == "rsync":
            raise Stop

    with pytest.raises(Stop):
        await backup.backup(m, "warm", [src], server=server, keep_volume=True, phase=stop_at_rsync)
    assert await _kept(m, "warm") == []  # deleted by the run that failed in it
    assert [s["SnapshotId"] for s in usable(await m.snapshots("warm"))] == [first.snapshot_id]

    again = await backup.backup(m, "warm", [src], server=server, keep_volume=True)
    assert not again.volume_reused and again.previous_snapshot_id == first.snapshot_id
    (kept,) = await _kept(m, "warm")
    assert kept[KEPT_TAG] == again.snapshot_id and kept[KEPT_TAG] != COPYING
