"""Incremental backups into named snapshots, and restores from them.

A backup named ``NAME`` is a series of EBS snapshots tagged with that name, newest
first (``Manager.snapshots(NAME)``). One backup run:

1. makes a **new** volume called ``NAME``: from the newest snapshot of the name (grown
   when the data needs more room), or empty for the first backup;
2. brings it up to date with ``rsync --delete`` from the sources;
3. snapshots it and waits until the snapshot is ``completed``;
4. deletes that volume.

Safety rules (see ``docs/backup.md``):

- a backup writes only into the volume it has just created. A live volume that has the
  backup's name is never written, adopted nor deleted: the backup is **refused** with
  :class:`~asyncstage.errors.NameTaken` (snapshots carry the name of the volume they were
  taken from, so a backup cannot work beside a volume of its name without mixing the
  volume's snapshots with its own);
- its volume is deleted only once the snapshot is completed, or after a failure or a
  cancellation (the earlier snapshots are kept, always);
- a restore reads only from a snapshot (through a temporary volume made from it, deleted
  afterwards); its destination must be empty unless ``overwrite=True``, and ``/`` and the
  home directory itself are refused.

The newest snapshot of a backup may still be ``pending`` (EC2 takes minutes to hours;
another run may have just made it). A backup or restore then **waits for it** to complete
(up to ``Timeouts.snapshot``) and uses it: never an older snapshot in its place, which
would silently miss the newest data. A snapshot already in ``error`` is left out; one that
fails while it is waited for fails the backup or restore (``EC2Error``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from asyncstage import names
from asyncstage.errors import (
    DestinationNotEmpty,
    EC2Error,
    InvalidArgument,
    NameTaken,
    UnknownSnapshot,
)
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.transfer import Progress, TransferStats
from asyncstage.volume import Volume

__all__ = [
    "BackupResult",
    "RestoreResult",
    "backup",
    "check_destination",
    "data_size",
    "restore",
    "size_for",
    "snapshot_volume",
]

log = logging.getLogger("asyncstage.backup")

GiB = 1 << 30
RSYNC_OPTIONS = ("--hard-links", "--numeric-ids", "--exclude", "/lost+found")
"""rsync options of every backup and restore; a volume's own ``lost+found`` never moves."""

Source = str | os.PathLike[str] | Volume | Server
"""A backup source: a local path, or a managed volume (its whole contents) or server."""
Phase = Callable[[str], object]
"""Told each phase as it starts: ``volume``, ``rsync``, ``snapshot``, ``cleanup``."""
ProgressCallback = Callable[[Progress], object]


@dataclass(frozen=True)
class BackupResult:
    """What one backup run did."""

    name: str
    snapshot_id: str
    """The new snapshot (completed)."""
    previous_snapshot_id: str | None
    """The snapshot the volume was made from (None for a first backup)."""
    volume_id: str
    """The temporary volume (deleted)."""
    size_gib: int
    bytes: int
    """Size of the files transferred (rsync)."""
    files: int
    wire_bytes: int
    route: str
    volume_s: float
    rsync_s: float
    snapshot_s: float
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return asdict(self)


@dataclass(frozen=True)
class RestoreResult:
    """What one restore did."""

    name: str
    snapshot_id: str
    dest: str
    bytes: int
    files: int
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return asdict(self)


def data_size(paths: Sequence[str | os.PathLike[str]]) -> int:
    """Bytes the files under local ``paths`` take (apparent sizes, 4 KiB at least each)."""
    total = 0
    for top in paths:
        for root, dirs, files in os.walk(top):
            for name in [*files, *dirs]:
                with contextlib.suppress(OSError):
                    total += max(4096, os.lstat(os.path.join(root, name)).st_size)
        with contextlib.suppress(OSError):
            if not os.path.isdir(top):
                total += max(4096, os.lstat(top).st_size)
    return total


def size_for(nbytes: int, headroom: float = 1.5) -> int:
    """GiB for a volume holding ``nbytes`` with headroom for growth and filesystem overhead."""
    return max(1, math.ceil(nbytes * headroom / GiB + 0.1))


def _usable(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed or pending (made from, a pending snapshot is waited for), never failed."""
    return [s for s in snaps if s.get("State") in ("completed", "pending")]


def _rsync_sources(sources: Sequence[Source]) -> list[Any]:
    """``sources`` for rsync: local paths made absolute (each must exist)."""
    paths: list[Any] = []
    for source in sources:
        if isinstance(source, str | os.PathLike):
            path = os.path.abspath(os.fspath(source))
            if not os.path.lexists(path):
                raise InvalidArgument(f"backup: {source} does not exist")
            source = path
        paths.append(source)
    return paths


def _default_size(paths: list[Any]) -> int:
    """GiB for the data: local files measured, volumes by their size."""
    local = [p for p in paths if isinstance(p, str)]
    sizes = [size_for(data_size(local))] if local else []
    sizes += [p.size for p in paths if isinstance(p, Volume)]
    return max(sizes, default=1)


async def _delete_own(volume: Volume) -> None:
    """Delete the backup's own volume; a failure here is logged, never raised over the
    error or cancellation already in flight."""
    with anyio.CancelScope(shield=True):
        try:
            await volume.delete()
        except Exception as e:
            log.warning("backup: could not delete its volume %s: %s", volume.volume_id, e)


async def backup(
    m: Manager,
    name: str,
    sources: Sequence[Source],
    *,
    server: Server | None = None,
    size: int | None = None,
    zone: str | None = None,
    description: str | None = None,
    progress: ProgressCallback | None = None,
    phase: Phase | None = None,
) -> BackupResult:
    """Back ``sources`` up into a new snapshot named ``name`` (incremental).

    Local paths are copied with ``rsync --relative`` (the snapshot holds their absolute
    paths); a :class:`Volume` source is copied whole (its root is the snapshot's root).
    The work volume is made on ``server`` (default: any server in ``zone``). ``size`` is
    in GiB (default: room for the data, never less than the previous snapshot).

    Raises :class:`NameTaken` when a volume called ``name`` exists: a backup never writes
    into a volume it did not create. On failure or cancellation its own volume is deleted
    and the earlier snapshots are kept.
    """
    names.check_name(name, "backup")
    if not sources:
        raise InvalidArgument("backup: nothing to back up")
    tell = phase or (lambda _: None)
    paths = _rsync_sources(sources)
    existing = m.find_volume_by_name(name)
    if existing is not None:
        raise NameTaken(
            f"backup {name!r}: a volume named {name!r} exists ({existing.volume_id}); a backup "
            "works only on a volume of its own and never touches it: choose another backup name"
        )
    started = time.monotonic()
    previous = _usable(await m.snapshots(name))
    needed = size if size is not None else await anyio.to_thread.run_sync(_default_size, paths)
    snapshot_id: str | None = None
    if previous:
        needed = max(needed, int(previous[0]["VolumeSize"]))
        snapshot_id = str(previous[0]["SnapshotId"])
    tell("volume")
    # reuse=False: a volume of this name that appeared meanwhile is refused, never adopted
    if server is not None:
        volume = await server.provision_volume(
            name, size=needed, snapshot_id=snapshot_id, reuse=False
        )
    else:
        volume = await m.provision_volume(
            name, size=needed, snapshot_id=snapshot_id, reuse=False, availability_zone=zone
        )
    t_volume = time.monotonic()
    try:
        tell("rsync")
        stats = await _rsync_into(m, volume, paths, progress)
        t_rsync = time.monotonic()
        tell("snapshot")
        new_id = await volume.create_snapshot(description or f"asyncstage backup {name}", wait=True)
        await _require_completed(m, new_id)
    except BaseException:
        tell("cleanup")
        await _delete_own(volume)
        raise
    t_snapshot = time.monotonic()
    tell("cleanup")
    await _delete_own(volume)
    return BackupResult(
        name=name,
        snapshot_id=new_id,
        previous_snapshot_id=snapshot_id,
        volume_id=volume.volume_id,
        size_gib=volume.size,
        bytes=stats.bytes,
        files=stats.files,
        wire_bytes=stats.wire_bytes,
        route=stats.route,
        volume_s=t_volume - started,
        rsync_s=t_rsync - t_volume,
        snapshot_s=t_snapshot - t_rsync,
        elapsed=time.monotonic() - started,
    )


async def _rsync_into(
    m: Manager, volume: Volume, paths: list[Any], progress: ProgressCallback | None
) -> TransferStats:
    options = list(RSYNC_OPTIONS)
    if any(isinstance(p, str) for p in paths):
        options.append("--relative")  # local paths keep their absolute path in the backup
    return await m.rsync(
        *paths, f"{volume.volume_id}:/", options=options, delete=True, progress=progress
    )


async def _require_completed(m: Manager, snapshot_id: str) -> None:
    found = await m.ec2.describe_snapshots([snapshot_id])
    state = found[0].get("State") if found else "gone"
    if state != "completed":
        raise EC2Error(
            f"snapshot {snapshot_id} is {state}, not completed", operation="DescribeSnapshots"
        )


def check_destination(dest: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """The absolute restore destination, or a typed error: ``/`` and the home directory
    itself are refused; an existing directory must be empty unless ``overwrite``."""
    path = os.path.abspath(os.path.expanduser(os.fspath(dest)))
    real = os.path.realpath(path)
    if real == "/":
        raise InvalidArgument("restore: refusing to restore into / (name a new directory)")
    if real == os.path.realpath(os.path.expanduser("~")):
        raise InvalidArgument(
            f"restore: refusing to restore into the home directory {path} itself "
            "(name a new directory under it, e.g. ~/restored)"
        )
    if os.path.lexists(path) and not os.path.isdir(real):
        raise InvalidArgument(f"restore: {path} exists and is not a directory")
    if not overwrite and os.path.isdir(real):
        with os.scandir(real) as entries:
            if any(True for _ in entries):
                raise DestinationNotEmpty(
                    f"restore: {path} is not empty; restore into a new directory, "
                    "or merge into it with --force (overwrite=True)"
                )
    return path


async def _pick_snapshot(m: Manager, name: str, snapshot_id: str | None) -> dict[str, Any]:
    snaps = _usable(await m.snapshots(name))
    if snapshot_id is not None:
        snaps = [s for s in snaps if s["SnapshotId"] == snapshot_id]
        if not snaps:
            raise UnknownSnapshot(f"backup {name!r} has no usable snapshot {snapshot_id}")
    if not snaps:
        raise UnknownSnapshot(f"no backup named {name!r} (see `asyncstage snapshots`)")
    return snaps[0]


@contextlib.asynccontextmanager
async def snapshot_volume(
    m: Manager,
    name: str,
    *,
    snapshot_id: str | None = None,
    server: Server | None = None,
    volume_name: str | None = None,
    phase: Phase | None = None,
) -> AsyncIterator[Volume]:
    """A temporary volume made from the newest snapshot of backup ``name`` (or
    ``snapshot_id``; a pending one is waited for), mounted on ``server`` (default: any),
    deleted on the way out."""
    names.check_name(name, "backup")
    snap = await _pick_snapshot(m, name, snapshot_id)
    async with _volume_from(m, str(snap["SnapshotId"]), server, volume_name, phase) as volume:
        yield volume


@contextlib.asynccontextmanager
async def _volume_from(
    m: Manager,
    snapshot_id: str,
    server: Server | None,
    volume_name: str | None,
    phase: Phase | None,
) -> AsyncIterator[Volume]:
    if phase:
        phase("volume")
    if server is not None:
        volume = await server.provision_volume(volume_name, snapshot_id=snapshot_id, reuse=False)
    else:
        volume = await m.provision_volume(volume_name, snapshot_id=snapshot_id, reuse=False)
    try:
        yield volume
    finally:
        if phase:
            phase("cleanup")
        await _delete_own(volume)


async def restore(
    m: Manager,
    name: str,
    dest: str | os.PathLike[str],
    *,
    snapshot_id: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    phase: Phase | None = None,
) -> RestoreResult:
    """Restore the newest snapshot of backup ``name`` (or ``snapshot_id``) into the local
    directory ``dest``.

    ``dest`` must be empty or missing unless ``overwrite`` (then files are merged into it,
    nothing deleted); ``/`` and the home directory are refused
    (:func:`check_destination`). Reads only from a snapshot, never from a live volume.
    """
    names.check_name(name, "backup")
    path = check_destination(dest, overwrite=overwrite)
    started = time.monotonic()
    chosen = str((await _pick_snapshot(m, name, snapshot_id))["SnapshotId"])
    async with _volume_from(m, chosen, None, None, phase) as volume:
        os.makedirs(path, exist_ok=True)
        if phase:
            phase("rsync")
        stats = await m.rsync(
            f"{volume.volume_id}:/",
            path.rstrip("/") + "/",
            options=list(RSYNC_OPTIONS),
            progress=progress,
        )
    return RestoreResult(
        name=name,
        snapshot_id=chosen,
        dest=path,
        bytes=stats.bytes,
        files=stats.files,
        elapsed=time.monotonic() - started,
    )
