"""What the backup tests share: a manager that deletes a test's snapshots afterwards, and
what EC2 still holds of a backup besides its complete snapshots."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asyncstage import Manager
from asyncstage.backup.lease import leases
from asyncstage.backup.snapshots import is_backup
from asyncstage.ec2 import tag, tag_filters
from tests.fixtures.cloud import ManagerFactory

__all__ = ["NOTHING", "leftovers", "manager_dropping"]

NOTHING: dict[str, list[str]] = {"volumes": [], "unfinished": [], "leases": []}


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
