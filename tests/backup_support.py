"""What the backup tests share: a manager that deletes a test's snapshots afterwards,
what EC2 still holds of a backup besides its complete snapshots, and the command line
for the session's cloud."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager
from asyncstage.adoption import owner_tags
from asyncstage.backup.lease import leases
from asyncstage.backup.runs import RunInfo
from asyncstage.backup.snapshots import CONSISTENCY_TAG, PARENT_TAG, STATE_TAG, is_backup
from asyncstage.ec2 import tag, tag_filters
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory

__all__ = [
    "NOTHING",
    "backup_history",
    "cli_command",
    "leftovers",
    "manager_dropping",
    "run_snapshot_tags",
]

NOTHING: dict[str, list[str]] = {"volumes": [], "unfinished": [], "leases": []}

EXE = Path(sys.executable).parent / "asyncstage"
ROOT = Path(__file__).resolve().parent.parent


def manager_dropping(*names: str) -> Callable[..., Any]:
    """A ``manager`` fixture that deletes every snapshot of these backups afterwards."""

    @pytest.fixture
    async def manager(manager_factory: ManagerFactory) -> AsyncIterator[Manager]:
        async with manager_factory() as m:
            yield m
            for name in names:
                found = await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name}))
                for snap in found:
                    await m.ec2.delete_snapshot(snap["SnapshotId"])

    return manager


async def leftovers(m: Manager, name: str) -> dict[str, list[str]]:
    """What EC2 still has of backup ``name`` besides its complete snapshots."""
    vols = await m.ec2.describe_volumes(filters=tag_filters({tag("name"): name}))
    snaps = await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name}))
    return {
        "volumes": [v["VolumeId"] for v in vols if v.get("State") != "deleted"],
        "unfinished": [s["SnapshotId"] for s in snaps if not is_backup(s)],
        "leases": [g for g, run in await leases(m) if run.name == name],
    }


def run_snapshot_tags(m: Manager, run: RunInfo, state: str) -> dict[str, str]:
    """The tags a backup run gives its snapshot (``state``: ``complete`` or ``pending``)."""
    return {
        tag("role"): "snapshot",
        tag("name"): run.name,
        tag("fstype"): "ext4",
        **owner_tags(m.key_pair.name),
        **run.tags(),
        STATE_TAG: state,
        PARENT_TAG: "none",
        CONSISTENCY_TAG: "crash-consistent",
    }


async def backup_history(
    m: Manager, name: str, count: int, zone: str, *, unfinished: int = 0
) -> list[str]:
    """``count`` complete backups of ``name`` (oldest first), then ``unfinished`` ones that
    a live run has not marked complete: snapshots of a volume made for them in ``zone``
    (deleted once they are completed), tagged as a run tags its own."""
    volume = str((await m.ec2.create_volume(availability_zone=zone, size=1))["VolumeId"])
    run = RunInfo.new(name, 3600)
    made: list[str] = []
    try:
        for n in range(count + unfinished):
            snap = await m.ec2.create_snapshot(
                volume,
                tags=run_snapshot_tags(m, run, "complete" if n < count else "pending")
                | {tag("created"): f"{n:020.6f}"},
            )
            made.append(str(snap["SnapshotId"]))
        for snapshot_id in made:
            await m.ec2.wait_for_snapshot(snapshot_id, timeout=120)
    finally:
        await m.ec2.delete_volume(volume)
    return made


def cli_command(
    cloud: LocalCloud, dotdir: Path, *args: str, region: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``asyncstage`` command line for the session's cloud (in ``region``, default the
    cloud's), and its environment."""
    session = cloud.session_kwargs()
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "AWS_ACCESS_KEY_ID": session["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": session["aws_secret_access_key"],
    }
    env.pop("ASYNCSTAGE_ENDPOINT_URL", None)
    argv = [str(EXE), "--endpoint-url", cloud.endpoint_url, "--region", region or cloud.region]
    return [*argv, "--dotdir", str(dotdir), *args], env
