"""Leftovers of runs that died: found by their run tags, removed only when that run is over.

A run is over when its lease is no longer its own (released, broken, or taken by a newer
run) or its controller is dead or expired (:meth:`RunInfo.dead`). A live run's work
volumes and snapshots are never touched, and neither is anything whose run tags do not
parse (it is reported instead).

A volume a finished run kept (:mod:`asyncstage.backup.warm`) stays while it holds its
backup's newest complete snapshot, and while a live run of that backup holds the lease
(that run decides); otherwise (the backup was forgotten, a newer snapshot came from
elsewhere) it is removed, after its tags are read once more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from asyncstage.adoption import ours
from asyncstage.backup.lease import leases, release
from asyncstage.backup.runs import OF_TAG, RUN_TAG, RunInfo
from asyncstage.backup.snapshots import is_backup, usable
from asyncstage.backup.warm import KEPT_TAG, holds_newest, is_kept
from asyncstage.concurrency import concurrently
from asyncstage.ec2 import tags_of
from asyncstage.errors import AsyncstageError, InvalidArgument, UnknownVolume
from asyncstage.manager import Manager

__all__ = ["SweepResult", "drop_stale_kept", "sweep"]

log = logging.getLogger("asyncstage.backup")


@dataclass
class SweepResult:
    """What a sweep removed, kept (live runs) and left alone (tags that do not parse)."""

    volumes: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    kept_volumes: list[str] = field(default_factory=list)
    """Volumes finished runs kept, left since they hold their backup's newest snapshot."""

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return {
            "volumes": self.volumes,
            "snapshots": self.snapshots,
            "leases": self.leases,
            "kept": self.kept,
            "refused": self.refused,
            "kept_volumes": self.kept_volumes,
        }


def _over(run: RunInfo, holders: dict[str, RunInfo], current: str | None) -> bool:
    if run.run_id == current:
        return False
    holder = holders.get(run.name)
    return holder is None or holder.run_id != run.run_id or run.dead()


async def sweep(
    m: Manager,
    name: str | None = None,
    *,
    current_run: str | None = None,
    lease_held: bool = False,
) -> SweepResult:
    """Remove the work volumes, unfinished snapshots and dead leases of runs that are over
    (of backup ``name``, or of every backup). ``current_run`` is never swept.

    ``lease_held``: the caller holds the lease of ``name`` for ``current_run``. A lease
    is a group of a name unique to the backup, so no other lease of it exists: the
    leases are not listed, and every other run of the name is over."""
    done = SweepResult()
    holders: dict[str, RunInfo] = {}
    if lease_held and (name is None or current_run is None):
        raise InvalidArgument("sweep: lease_held needs the backup's name and current_run")
    for group_id, held in [] if lease_held else await leases(m):
        if not held.dead():
            holders[held.name] = held
        elif name is None or held.name == name:
            await release(m, group_id)
            done.leases.append(group_id)
    filters = [{"Name": "tag-key", "Values": [RUN_TAG]}]
    listed: dict[str, list[dict[str, Any]]] = {}

    async def list_of(kind: Literal["volumes", "snapshots"]) -> None:
        if name is None:
            describe = m.ec2.describe_volumes if kind == "volumes" else m.ec2.describe_snapshots
            listed[kind] = await describe(filters=filters)
        else:  # a fleet's backups list theirs at once: one call for all
            listed[kind] = await m.ec2.describe_tagged_shared(kind, OF_TAG, name, filters=filters)

    # both after the leases, as one listing: a run that was live then is left alone
    await concurrently(partial(list_of, "volumes"), partial(list_of, "snapshots"))
    keys = m.known_key_names()
    volumes = ours("volume", listed["volumes"], keys=keys)
    scanned = False
    for desc in volumes:
        vid = str(desc["VolumeId"])
        if desc.get("State") not in ("available", "in-use", "creating"):
            continue
        found = RunInfo.from_tags(tags_of(desc))
        if found is None:
            done.refused.append(vid)
            continue
        if not _over(found, holders, current_run):
            done.kept.append(vid)
            continue
        if is_kept(desc, found.name):
            holder = holders.get(found.name)
            if holder is not None and holder.run_id != current_run:
                done.kept.append(vid)  # a live run of the backup may be about to use it
                continue
            if await _still_kept(m, desc, found.name):
                done.kept_volumes.append(vid)
                continue
        if not scanned and desc.get("Attachments"):
            await m.scan_region()  # its server and mount, to unmount and detach it cleanly
            scanned = True
        await _delete_volume(m, desc)
        log.info("backup %s: removed work volume %s of run %s", found.name, vid, found.run_id)
        done.volumes.append(vid)
    snaps = ours("snapshot", listed["snapshots"], keys=keys)
    for snap in snaps:
        sid = str(snap["SnapshotId"])
        found = RunInfo.from_tags(tags_of(snap))
        if found is None:
            done.refused.append(sid)
            continue
        if is_backup(snap):
            continue
        if not _over(found, holders, current_run):
            done.kept.append(sid)
            continue
        await m.ec2.delete_snapshot(sid)
        log.info("backup %s: removed snapshot %s of run %s", found.name, sid, found.run_id)
        done.snapshots.append(sid)
    return done


async def drop_stale_kept(m: Manager, name: str) -> list[str]:
    """Remove backup ``name``'s kept volumes that no longer hold its newest complete
    snapshot (none while a live run of it holds the lease); their ids. Nothing else is
    touched: what dead runs left is :func:`sweep`'s."""
    holder = {held.name: held for _, held in await leases(m) if not held.dead()}.get(name)
    if holder is not None:
        return []
    filters = [
        {"Name": "tag-key", "Values": [KEPT_TAG]},
        {"Name": f"tag:{OF_TAG}", "Values": [name]},
    ]
    found = await m.ec2.describe_volumes(filters=filters)
    removed: list[str] = []
    for desc in ours("volume", found, keys=m.known_key_names()):
        if desc.get("State") not in ("available", "in-use") or not is_kept(desc, name):
            continue
        if await _still_kept(m, desc, name):
            continue
        await _delete_volume(m, desc)
        log.info("backup %s: removed kept volume %s (stale)", name, desc["VolumeId"])
        removed.append(str(desc["VolumeId"]))
    return removed


async def _still_kept(m: Manager, desc: dict[str, Any], name: str) -> bool:
    """Whether a kept volume holds its backup's newest complete snapshot, or changed since
    ``desc`` was read (a run took it meanwhile: left to that run)."""
    newest = usable(await m.snapshots(name))
    if holds_newest(desc, name, newest[0] if newest else None):
        return True
    again = await m.ec2.describe_volumes([str(desc["VolumeId"])])
    return not again or tags_of(again[0]) != tags_of(desc)


async def _delete_volume(m: Manager, desc: dict[str, Any]) -> None:
    vid = str(desc["VolumeId"])
    try:
        volume = m.find_volume_by_volid(vid)
    except UnknownVolume:
        volume = None
    if volume is not None:
        await volume.delete()
        return
    for att in desc.get("Attachments", []):  # on a server this manager cannot reach
        try:
            await m.ec2.detach_volume(vid, force=True)
        except AsyncstageError as e:
            log.debug("detaching %s from %s: %s", vid, att.get("InstanceId"), e)
        await m.ec2.wait_for_volume(
            vid,
            lambda v: v.get("State") == "available",
            what=f"{vid} detached",
            timeout=300,
            kind="detached",
        )
        break
    await m.ec2.delete_volume(vid)
