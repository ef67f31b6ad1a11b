"""``snapshot``-mode sets under retention and copies, on plain moto (records only): a set
is decided as one backup, kept when an image uses any member, never counted while a
member is missing or unfinished, removed whole (a removal cut short leaves no partial
set counted as a backup, and the next ``forget`` finishes it), and copied whole.

The local cloud's side (a plan's sets copied, kept there, and restored from there alone)
is in ``tests/test_backup_keep_regions.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncstage import Manager, backup
from asyncstage.backup import CopyTarget, PlannedBackup
from asyncstage.backup.keep import COPY_OF_TAG, FORGETTING, copy_backup, copy_of, copy_set
from asyncstage.backup.manifest import MANIFEST_TAG, NO_MANIFEST
from asyncstage.backup.runs import RunInfo
from asyncstage.backup.snapshot_mode import SET_SIZE_TAG, set_of
from asyncstage.backup.snapshots import STATE_TAG, usable
from asyncstage.ec2 import tags_of
from asyncstage.errors import InvalidArgument, UnknownSnapshot
from asyncstage.retention import Policy
from tests.backup_support import run_snapshot_tags
from tests.fixtures.moto import moto_manager
from tests.test_backup_keep import image_uses

pytestmark = pytest.mark.anyio

ZONE = "us-east-1a"


@pytest.fixture
async def home(moto_url: str, tmp_path: Path) -> AsyncIterator[Manager]:
    async with moto_manager(moto_url, tmp_path / "dot") as m:
        yield m


async def set_history(m: Manager, name: str, count: int, size: int = 2) -> list[list[str]]:
    """``count`` complete sets of ``size`` snapshots of backup ``name`` (oldest first),
    tagged as a ``snapshot``-mode run tags its own, an hour apart."""
    volumes = [
        str((await m.ec2.create_volume(availability_zone=ZONE, size=1))["VolumeId"])
        for _ in range(size)
    ]
    sets: list[list[str]] = []
    try:
        for _ in range(count):
            run = RunInfo.new(name, 3600)
            made = []
            for volume in volumes:
                as_set = {MANIFEST_TAG: NO_MANIFEST, SET_SIZE_TAG: str(size)}
                tags = run_snapshot_tags(m, run, "complete") | as_set
                snap = await m.ec2.create_snapshot(volume, tags=tags)
                made.append(str(snap["SnapshotId"]))
            sets.append(sorted(made))
    finally:
        for volume in volumes:
            await m.ec2.delete_volume(volume)
    _hours_apart(sets, m.region)
    return sets


def _hours_apart(sets: list[list[str]], region: str) -> None:
    """Each set an hour older than the next (this process's moto: its records)."""
    from moto.ec2.models import ec2_backends

    backend = ec2_backends["123456789012"][region]
    now = datetime.now(UTC).replace(tzinfo=None)
    for n, members in enumerate(reversed(sets)):
        for snapshot_id in members:
            backend.snapshots[snapshot_id].start_time = now - timedelta(hours=n)


_copies = [{"Name": "tag-key", "Values": [COPY_OF_TAG]}]


async def _ids(m: Manager, name: str) -> set[str]:
    return {str(s["SnapshotId"]) for s in await m.snapshots(name)}


def test_a_snapshot_mode_backup_takes_retention_and_copies() -> None:
    planned = PlannedBackup(
        "disks", mode="snapshot", server="db1", retention=Policy(last=1), copy_to=("eu-west-1",)
    )
    assert planned.retention == Policy(last=1) and planned.copy_to == (CopyTarget("eu-west-1"),)


async def test_a_set_is_decided_as_one_and_removed_whole(home: Manager) -> None:
    m = home
    sets = await set_history(m, "kept-sets", 4)
    lines: list[str] = []
    dry = await backup.forget(m, ["kept-sets"], Policy(last=2), dry_run=True, report=lines.append)
    decisions = dry.decisions["kept-sets"]
    assert [d.members for d in decisions] == [tuple(s) for s in reversed(sets)]
    assert [d.keep for d in decisions] == [True, True, False, False]
    assert decisions[0].reasons == ("newest completed snapshot", "last snapshot")
    assert len(lines) == 4 and "(set of 2: " in lines[0]
    assert await _ids(m, "kept-sets") == {i for s in sets for i in s}

    done = await backup.forget(m, ["kept-sets"], Policy(last=2), report=lines.append)
    assert sorted(done.removed["kept-sets"]) == sorted(sets[0] + sets[1])
    assert await _ids(m, "kept-sets") == set(sets[2] + sets[3])
    as_dict = done.as_dict()["backups"]["kept-sets"]
    assert [d["members"] for d in as_dict] == [s for s in reversed(sets)]


async def test_a_set_in_use_or_not_whole_is_never_removed(home: Manager) -> None:
    m = home
    sets = await set_history(m, "kept-partial", 5)
    # an image uses one member of the oldest set: the whole set is kept
    image = await m.ec2.call(
        "RegisterImage",
        Name="kept-partial-image",
        RootDeviceName="/dev/sda1",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": sets[0][1]}}],
    )
    image_uses(image["ImageId"], sets[0][1])
    # the second set lost a member (deleted by hand): not a backup any more, never removed
    await m.ec2.delete_snapshot(sets[1][0])
    # the newest set has a member its run never marked complete: a backup in the making
    await m.ec2.create_tags([sets[4][0]], {STATE_TAG: "pending"})
    try:
        done = await backup.forget(m, ["kept-partial"], Policy(last=1), report=lambda _: None)
        by_set = {d.members: d for d in done.decisions["kept-partial"]}
        assert f"used by image {image['ImageId']}" in by_set[tuple(sets[0])].reasons
        assert by_set[(sets[1][1],)].reasons == ("unfinished: not completed yet",)
        assert by_set[tuple(sets[4])].reasons == ("unfinished: not completed yet",)
        # the newest complete set is the fourth: kept; the third goes
        assert by_set[tuple(sets[3])].reasons[0] == "newest completed snapshot"
        assert sorted(done.removed["kept-partial"]) == sets[2]
        assert await _ids(m, "kept-partial") == set(sets[0] + sets[1][1:] + sets[3] + sets[4])
        # a restore never takes a set in part
        await m.ec2.create_tags([sets[4][0]], {STATE_TAG: "complete"})
        await m.ec2.delete_snapshot(sets[4][1])
        with pytest.raises(UnknownSnapshot, match="1 complete snapshots of 2"):
            await backup.pick_set(m, "kept-partial")
    finally:
        await m.ec2.call("DeregisterImage", ImageId=image["ImageId"])


async def test_a_set_removal_cut_short_counts_no_part_and_is_finished_later(
    home: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = home
    sets = await set_history(m, "kept-cut-set", 4, size=3)
    deleted: list[str] = []
    delete = m.ec2.delete_snapshot

    async def delete_then_stop(snapshot_id: str) -> None:
        await delete(snapshot_id)
        deleted.append(snapshot_id)
        if len(deleted) == 2:  # the controller is stopped inside the oldest set's removal
            scope.cancel()
            await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(m.ec2, "delete_snapshot", delete_then_stop)
    with anyio.CancelScope() as scope:
        await backup.forget(m, ["kept-cut-set"], Policy(last=2), report=lambda _: None)
    assert scope.cancelled_caught and deleted == sets[0][:2]
    monkeypatch.undo()

    left = await m.snapshots("kept-cut-set")
    (rest,) = [s for s in left if s["SnapshotId"] == sets[0][2]]
    assert tags_of(rest)[STATE_TAG] == FORGETTING  # no part of the set counts as a backup
    assert {str(s["SnapshotId"]) for s in usable(left)} == {i for s in sets[1:] for i in s}
    assert {str(s["SnapshotId"]) for s in await backup.pick_set(m, "kept-cut-set")} == set(sets[3])

    lines: list[str] = []
    again = await backup.forget(m, ["kept-cut-set"], Policy(last=2), report=lines.append)
    assert sorted(again.removed["kept-cut-set"]) == sorted([sets[0][2], *sets[1]])
    assert any(sets[0][2] in line and "earlier forget" in line for line in lines)
    assert await _ids(m, "kept-cut-set") == set(sets[2] + sets[3])


async def test_a_set_is_copied_whole_or_not_at_all(
    home: Manager, moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with moto_manager(moto_url, tmp_path / "dot", "eu-west-1") as away:
        (first, second) = await set_history(home, "kept-copied", 2)
        with pytest.raises(InvalidArgument, match="copied whole"):
            await copy_backup(home, away, first[0], CopyTarget("eu-west-1"))
        with pytest.raises(InvalidArgument, match="copied whole"):
            await copy_set(home, away, [first[0], second[0]], CopyTarget("eu-west-1"))
        assert await away.snapshots("kept-copied") == []

        # the controller is stopped after the set's first copy started: that copy goes too
        started: list[str] = []
        copy = away.ec2.copy_snapshot

        async def copy_then_stop(*args: Any, **kwargs: Any) -> str:
            started.append(await copy(*args, **kwargs))
            scope.cancel()
            return started[-1]

        monkeypatch.setattr(away.ec2, "copy_snapshot", copy_then_stop)
        with anyio.CancelScope() as scope:
            await copy_set(home, away, first, CopyTarget("eu-west-1"))
        monkeypatch.undo()
        assert scope.cancelled_caught and len(started) == 1
        left = await away.ec2.describe_snapshots(filters=_copies)
        assert [s for s in left if (copy_of(s) or ("", ""))[1] in first] == []

        copies = await copy_set(home, away, second, CopyTarget("eu-west-1"))
        found = {str(s["SnapshotId"]): s for s in await away.snapshots("kept-copied")}
        assert set(found) == set(copies) and len(usable(list(found.values()))) == 2
        assert [copy_of(found[c]) for c in copies] == [("us-east-1", s) for s in second]
        (source_run,) = {set_of(s) for s in await home.snapshots("kept-copied")} - {
            set_of(s) for s in await home.ec2.describe_snapshots(first)
        }
        assert {set_of(s) for s in found.values()} == {source_run}  # the copies are one set
        picked = await backup.pick_set(away, "kept-copied")
        assert sorted(str(s["SnapshotId"]) for s in picked) == sorted(copies)
