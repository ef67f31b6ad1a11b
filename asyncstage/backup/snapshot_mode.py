"""``snapshot`` mode: a managed server's own EBS data volumes, snapshotted in place at one
crash-consistent instant with EC2's ``CreateSnapshots``.

Nothing is copied: no work volume, no rsync. A run takes the backup's lease, removes the
leftovers of dead runs, runs the server's ``pre`` hook (say ``fsfreeze -f /data``), takes
one snapshot of every data volume of the server in one ``CreateSnapshots`` call (one
instant for all of them), runs ``post`` (always, once ``pre`` has started), waits until
every snapshot is completed and marks the set complete. Each snapshot carries the backup's
name, the run's tags, the volume it was taken from and its name, the set's consistency
and its size (``asyncstage:backup-set-size``).

A set is one backup: retention keeps or removes it whole, a copy to another region copies
it whole (:mod:`asyncstage.backup.keep`), and a restore takes it whole. Its members are
the snapshots of one run (:func:`set_of`); a set with fewer complete members than its
size is not a backup.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from asyncstage import names
from asyncstage.adoption import owner_tags
from asyncstage.backup.copy import DEFAULT_TTL
from asyncstage.backup.hooks import Hook, run_hook
from asyncstage.backup.lease import Lease, with_lease
from asyncstage.backup.manifest import MANIFEST_TAG, NO_MANIFEST, recorded
from asyncstage.backup.runs import RUN_TAG, RunInfo
from asyncstage.backup.snapshots import STATE_TAG, mark_complete
from asyncstage.backup.sweep import sweep
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import InvalidArgument
from asyncstage.manager import Manager
from asyncstage.server import Server

__all__ = ["SET_SIZE_TAG", "SnapshotSetResult", "set_of", "set_size", "snapshot_backup"]

SET_SIZE_TAG = tag("backup-set-size")
_MAX_SET = 128  # more volumes than any instance type can attach


def set_of(snap: dict[str, Any]) -> str | None:
    """The run id of the set a snapshot belongs to, or None (not a ``snapshot``-mode set:
    a ``copy``-mode backup is one snapshot)."""
    run = tags_of(snap).get(RUN_TAG)
    return run if run and recorded(snap)[0] == "none" else None


def set_size(snap: dict[str, Any]) -> int | None:
    """How many snapshots the set was taken with, as recorded (None: not recorded, or a
    value that does not parse; tags are anyone's to write)."""
    text = tags_of(snap).get(SET_SIZE_TAG, "")
    return int(text) if text.isdigit() and 0 < int(text) <= _MAX_SET else None


@dataclass(frozen=True)
class SnapshotSetResult:
    """What one ``snapshot``-mode run did."""

    name: str
    server: str
    snapshots: dict[str, str]
    """Volume id → its new snapshot (completed, marked complete)."""
    consistency: str
    run_id: str
    elapsed: float
    swept: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        found = asdict(self)
        found["swept"] = list(self.swept)
        return found


async def snapshot_backup(
    m: Manager,
    name: str,
    server: Server | str,
    *,
    pre: Hook | None = None,
    post: Hook | None = None,
    wait: float = 0.0,
    ttl: float = DEFAULT_TTL,
) -> SnapshotSetResult:
    """Snapshot every data volume of ``server`` at one instant into backup ``name``.

    ``pre``/``post`` run on the server around the ``CreateSnapshots`` call; the set is
    ``application-consistent`` when ``pre`` succeeded, else ``crash-consistent``. Another
    live run of ``name`` is waited for up to ``wait`` seconds, then refused with
    :class:`~asyncstage.errors.BackupInProgress`.
    """
    names.check_name(name, "backup")
    if isinstance(server, str):
        found = m.find_server_by_name(server)
        if found is None:
            raise InvalidArgument(f"backup {name!r}: no managed server named {server!r}")
        server = found
    run = RunInfo.new(name, ttl)
    host = server

    async def body(lease: Lease) -> SnapshotSetResult:
        return await _run(m, lease, host, pre, post)

    return await with_lease(m, run, body, wait=wait, ttl=ttl)


async def _run(
    m: Manager, lease: Lease, server: Server, pre: Hook | None, post: Hook | None
) -> SnapshotSetResult:
    name, started = lease.run.name, time.monotonic()
    swept = await sweep(m, name, current_run=lease.run.run_id, lease_held=True)
    volumes = {v.volume_id: v for v in m.volumes() if v.server is server}
    if not volumes:
        raise InvalidArgument(f"backup {name!r}: {server.name} has no data volumes to snapshot")
    quiesced = False
    try:
        if pre is not None:
            quiesced = await run_hook("pre", pre, server)
        made = await _create_snapshots(m, lease.run, server)
    finally:
        if post is not None:
            with anyio.CancelScope(shield=True):
                await run_hook("post", post, server)
    snapshots: dict[str, str] = {}
    for snap in made:
        sid, vid = str(snap["SnapshotId"]), str(snap.get("VolumeId", ""))
        snapshots[vid] = sid
        volume = volumes.get(vid)
        if volume is not None:
            await m.ec2.create_tags(
                [sid],
                {tag("volume"): vid, tag("volume-name"): volume.name, tag("fstype"): volume.fstype},
            )
    if snapshots:
        await m.ec2.create_tags(list(snapshots.values()), {SET_SIZE_TAG: str(len(snapshots))})
    for sid in snapshots.values():
        await m.ec2.wait_for_snapshot(sid, timeout=m.timeouts.snapshot)
    await lease.check()  # a run that lost its lease never marks anything complete
    consistency = "application-consistent" if quiesced else "crash-consistent"
    await mark_complete(m, list(snapshots.values()), None, consistency)
    return SnapshotSetResult(
        name=name,
        server=server.name,
        snapshots=snapshots,
        consistency=consistency,
        run_id=lease.run.run_id,
        elapsed=time.monotonic() - started,
        swept=tuple(swept.volumes + swept.snapshots),
    )


async def _create_snapshots(m: Manager, run: RunInfo, server: Server) -> list[dict[str, Any]]:
    """One ``CreateSnapshots`` call for the server's data volumes, tagged as the run's."""
    tags = {
        tag("role"): "snapshot",
        tag("name"): run.name,
        "Name": run.name,
        **run.tags(),
        STATE_TAG: "pending",
        MANIFEST_TAG: NO_MANIFEST,  # the server's own volumes: no manifest (see manifest.py)
        **owner_tags(m.key_pair.name if m.key_pair else None),
    }
    return await m.ec2.create_snapshots(
        server.instance_id,
        description=f"asyncstage backup {run.name} of {server.name}",
        tags=tags,
    )
