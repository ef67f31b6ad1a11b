"""Which snapshots of a backup count, and how a run marks its own complete.

A snapshot made by a backup run carries the run's tags and ``asyncstage:backup-state``
``pending`` from its create call on. Only once EC2 says ``completed`` does the run tag
it ``complete``, with its parent (the snapshot the work volume was made from, or
``none``) and its consistency. Only such snapshots are backups: one still ``pending``,
or whose run died before marking it, is never restored from nor used as a base.
Snapshots made before run tags existed (no ``asyncstage:backup-run`` tag) count once
completed.
"""

from __future__ import annotations

import re
from typing import Any

from asyncstage.backup.runs import RUN_TAG
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import UnknownSnapshot
from asyncstage.manager import Manager

__all__ = [
    "CONSISTENCY_TAG",
    "PARENT_TAG",
    "STATE_TAG",
    "is_backup",
    "mark_complete",
    "pick_snapshot",
    "usable",
]

STATE_TAG = tag("backup-state")
PARENT_TAG = tag("backup-parent")
CONSISTENCY_TAG = tag("backup-consistency")
CONSISTENCIES = ("crash-consistent", "application-consistent")
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{8,17}$")


def is_backup(snap: dict[str, Any]) -> bool:
    """Whether a snapshot description is a complete backup (see the module's rules)."""
    if snap.get("State") != "completed":
        return False
    tags = tags_of(snap)
    if RUN_TAG not in tags:
        return True  # made before runs were tagged: its run waited for it to complete
    parent = tags.get(PARENT_TAG, "")
    return tags.get(STATE_TAG) == "complete" and (
        parent == "none" or bool(_SNAPSHOT_ID.match(parent))
    )


def usable(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete backups among ``snaps`` (kept in their order, newest first)."""
    return [s for s in snaps if is_backup(s)]


def consistency_of(snap: dict[str, Any]) -> str:
    """``application-consistent``, ``crash-consistent`` or ``-`` (not recorded)."""
    found = tags_of(snap).get(CONSISTENCY_TAG, "")
    return found if found in CONSISTENCIES else "-"


async def mark_complete(
    m: Manager, snapshot_ids: list[str], parent: str | None, consistency: str
) -> None:
    """Mark completed snapshots as complete backups, with their parent and consistency."""
    await m.ec2.create_tags(
        snapshot_ids,
        {STATE_TAG: "complete", PARENT_TAG: parent or "none", CONSISTENCY_TAG: consistency},
    )


async def pick_snapshot(m: Manager, name: str, snapshot_id: str | None) -> dict[str, Any]:
    """The newest complete backup of ``name`` (or that one), else :class:`UnknownSnapshot`."""
    snaps = usable(await m.snapshots(name))
    if snapshot_id is not None:
        snaps = [s for s in snaps if s["SnapshotId"] == snapshot_id]
        if not snaps:
            raise UnknownSnapshot(f"backup {name!r} has no complete snapshot {snapshot_id}")
    if not snaps:
        raise UnknownSnapshot(f"no backup named {name!r} (see `asyncstage snapshots`)")
    return snaps[0]
