"""Kept work volumes: a ``copy``-mode backup that keeps its volume between runs.

With ``keep_volume`` a run does not delete its work volume at the end: it unmounts it,
leaves it attached, and tags it ``asyncstage:backup-kept`` = the id of the snapshot it
just made, once that snapshot is completed and marked complete. The next run uses the
volume again, and rsync copies only the change into it, instead of making a new volume
from the snapshot (on EC2 such a volume loads its blocks lazily from S3, so rsync's full
scan of it reads every block over the network at first).

A kept volume is used again only when all of this holds (else the run falls back to a
volume made from the snapshot, and the kept one is deleted by the run):

- it is ours (its owner tag), named like the backup, with the backup's run tags;
- its ``backup-kept`` tag names the backup's newest complete snapshot, and EC2 says that
  snapshot was taken of this very volume (the snapshot's ``VolumeId``, which no tag can
  forge);
- it is ``available`` or ``in-use``, in the zone the run wants, big enough, and not
  attached to another server than the one the run copies on.

A run that reuses a kept volume first tags it as its own (run tags, ``backup-kept`` =
``copying``): killed mid-copy, it leaves an ordinary work volume of a dead run, which
the next run or ``sweep`` removes. A run that fails or is cancelled deletes the volume.
``sweep`` leaves a kept volume alone while it holds the newest complete snapshot of its
backup (or a live run of that backup holds the lease), and removes it once it does not:
the backup was forgotten, or a newer snapshot came from elsewhere.

What it costs: a kept volume is an EBS volume that exists between runs (billed per GiB
provisioned, per month, as any volume), besides the snapshots; it also holds one
attachment slot of its server. Keeping is off unless asked for (``keep_volume=True``,
``keep_volume = true`` in a plan, ``--keep-volume``).
"""

from __future__ import annotations

import re
from typing import Any

from asyncstage.backup._common import delete_own, log
from asyncstage.backup.runs import OF_TAG, RunInfo
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import AsyncstageError
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.volume import Volume

__all__ = [
    "COPYING",
    "KEPT_TAG",
    "claim",
    "holds_newest",
    "is_kept",
    "kept_snapshot",
    "mark_kept",
    "reuse",
]

KEPT_TAG = tag("backup-kept")
"""On a kept work volume: the id of the complete snapshot it was taken for (or
:data:`COPYING` while a run writes to it)."""
COPYING = "copying"
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{8,17}$")


def kept_snapshot(desc: dict[str, Any]) -> str | None:
    """The snapshot id a volume description's kept tag names (None: no tag, ``copying``,
    or a value that is not a snapshot id)."""
    value = tags_of(desc).get(KEPT_TAG, "")
    return value if _SNAPSHOT_ID.match(value) else None


def is_kept(desc: dict[str, Any], name: str) -> bool:
    """Whether a volume description is one a run of backup ``name`` kept or is copying
    into (the kept tag, whatever its value, and run tags of that backup): its owner may
    use or delete it."""
    tags = tags_of(desc)
    run = RunInfo.from_tags(tags)
    return KEPT_TAG in tags and run is not None and run.name == name and tags.get(OF_TAG) == name


def holds_newest(desc: dict[str, Any], name: str, newest: dict[str, Any] | None) -> bool:
    """Whether volume ``desc`` is backup ``name``'s kept volume holding ``newest`` (the
    backup's newest complete snapshot): tags and EC2's own record agree."""
    return (
        newest is not None
        and is_kept(desc, name)
        and tags_of(desc).get(tag("name")) == name
        and (held := kept_snapshot(desc)) is not None
        and held == newest.get("SnapshotId")
        and newest.get("VolumeId") == desc.get("VolumeId")
        and desc.get("State") in ("available", "in-use")
    )


async def claim(m: Manager, volume: Volume, run: RunInfo) -> None:
    """Make a kept volume this run's work volume (in one call): a crash from here on leaves
    a work volume of a dead run, never one that looks kept."""
    await m.ec2.create_tags([volume.volume_id], {**run.tags(), KEPT_TAG: COPYING})


async def mark_kept(m: Manager, volume: Volume, snapshot_id: str) -> None:
    """Tag the volume (unmounted: nothing writes to it between runs) as kept for
    ``snapshot_id`` (complete already)."""
    if volume.mounted:
        await volume.unmount()
    await m.ec2.create_tags([volume.volume_id], {KEPT_TAG: snapshot_id})


async def reuse(
    volume: Volume,
    desc: dict[str, Any],
    name: str,
    newest: dict[str, Any] | None,
    *,
    needed: int,
    server: Server | None,
    zone: str | None,
) -> bool:
    """Whether the run may copy into ``volume`` (a volume of this manager named like the
    backup, kept by an earlier run: :func:`is_kept` of its description ``desc``), mounted
    now; else it is deleted (stale, or of no use here) and the run makes a new one.
    Errors while mounting count as of no use."""
    why = ""
    if not holds_newest(desc, name, newest):
        why = "it does not hold the backup's newest complete snapshot"
    elif volume.size < needed:
        why = f"it is {volume.size} GiB, the data needs {needed}"
    elif zone is not None and volume.availability_zone != zone:
        why = f"it is in {volume.availability_zone}, the run wants {zone}"
    elif server is not None and volume.availability_zone != server.availability_zone:
        why = f"it is in {volume.availability_zone}, {server.name} in {server.availability_zone}"
    elif server is not None and volume.server is not None and volume.server is not server:
        why = f"it is attached to {volume.server.name}, the run copies on {server.name}"
    if not why:
        try:
            if not volume.mounted:
                await volume.mount(server)
            return True
        except AsyncstageError as e:
            why = f"it could not be mounted: {e}"
    log.info("backup %s: not using kept volume %s (%s): deleting it", name, volume.volume_id, why)
    await delete_own(volume)
    return False
