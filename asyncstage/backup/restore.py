"""Restores: from a complete snapshot of a backup, never from a live volume.

A backup run made one snapshot (``copy`` mode) or a set of them, one per data volume of a
server taken at one instant (``snapshot`` mode). The newest backup of a name is every
complete snapshot of its newest run: :func:`restore` copies a set into one directory per
volume, :func:`restore_volumes` makes a new volume of each on a server.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from asyncstage import names
from asyncstage.backup._common import RSYNC_OPTIONS, Phase, ProgressCallback, delete_own, log
from asyncstage.backup.check import CheckResult, verify_restored
from asyncstage.backup.manifest import MANIFEST_NAME
from asyncstage.backup.runs import RUN_TAG
from asyncstage.backup.scratch import volume_from as _volume_from
from asyncstage.backup.snapshot_mode import set_size
from asyncstage.backup.snapshots import pick_snapshot, usable
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import (
    DestinationNotEmpty,
    InvalidArgument,
    RestoreVerifyFailed,
    UnknownSnapshot,
)
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.volume import Volume

__all__ = [
    "RestoreResult",
    "check_destination",
    "pick_set",
    "restore",
    "restore_volumes",
    "snapshot_volume",
]


@dataclass(frozen=True)
class RestoreResult:
    """What one restore did."""

    name: str
    snapshot_id: str
    dest: str
    bytes: int
    files: int
    elapsed: float
    verified: str = "not asked"
    """``verified`` (every file as its manifest says), ``not asked``, or why it could not
    be (``none``/``untagged``: the snapshot has no manifest)."""
    snapshots: dict[str, str] = field(default_factory=dict)
    """For a set: each snapshot → the directory of ``dest`` it was restored into."""

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return asdict(self)


async def pick_set(m: Manager, name: str, snapshot_id: str | None = None) -> list[dict[str, Any]]:
    """The snapshots to restore of backup ``name``: with ``snapshot_id`` that one, else
    every complete snapshot of the newest run (one, or a ``snapshot``-mode set), else
    :class:`~asyncstage.errors.UnknownSnapshot` (also for a set that has lost members:
    never restored in part without being asked for a snapshot by id)."""
    newest = await pick_snapshot(m, name, snapshot_id)
    run = tags_of(newest).get(RUN_TAG)
    if snapshot_id is not None or not run:
        return [newest]
    found = [s for s in usable(await m.snapshots(name)) if tags_of(s).get(RUN_TAG) == run]
    size = set_size(newest)
    if size is not None and len(found) != size:
        raise UnknownSnapshot(
            f"backup {name!r}: its newest set has {len(found)} complete snapshots of "
            f"{size}; restore one by id (--snapshot), or the set is still being copied"
        )
    return found


def _labels(snaps: list[dict[str, Any]]) -> dict[str, str]:
    """Snapshot id → the name of the volume it was taken from, as the set recorded it
    (tags are anyone's to write: a name that breaks the naming rule, or one used twice,
    gives way to the volume's or the snapshot's id)."""
    found: dict[str, str] = {}
    for snap in snaps:
        sid, tags = str(snap["SnapshotId"]), tags_of(snap)
        label = tags.get(tag("volume-name"), "")
        if not names.is_valid_name(label) or label in found.values():
            label = str(snap.get("VolumeId") or sid)
            label = label if names.is_valid_name(label) and label not in found.values() else sid
        found[sid] = label
    return found


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
    """A temporary volume made from the newest complete snapshot of backup ``name`` (or
    ``snapshot_id``), mounted on ``server`` (default: any), deleted on the way out."""
    names.check_name(name, "backup")
    snap = await pick_snapshot(m, name, snapshot_id)
    async with _volume_from(m, str(snap["SnapshotId"]), server, volume_name, phase) as volume:
        yield volume


async def restore(
    m: Manager,
    name: str,
    dest: str | os.PathLike[str],
    *,
    snapshot_id: str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    phase: Phase | None = None,
    verify: bool = True,
) -> RestoreResult:
    """Restore the newest complete snapshot of backup ``name`` (or ``snapshot_id``) into
    the local directory ``dest``.

    ``dest`` must be empty or missing unless ``overwrite`` (then files are merged into it,
    nothing deleted); ``/`` and the home directory are refused
    (:func:`check_destination`). Reads only from a snapshot, never from a live volume.

    With ``verify`` (the default) the restored files are then checked, content included,
    against the snapshot's manifest (:func:`~asyncstage.backup.check.verify_restored`):
    :class:`~asyncstage.errors.RestoreVerifyFailed` when they differ or the manifest
    cannot be trusted (the files stay where they were written).
    """
    names.check_name(name, "backup")
    path = check_destination(dest, overwrite=overwrite)
    started = time.monotonic()
    chosen = await pick_set(m, name, snapshot_id)
    labels = _labels(chosen) if len(chosen) > 1 else {str(chosen[0]["SnapshotId"]): ""}
    nbytes = nfiles = 0
    found: CheckResult | None = None
    for snap in chosen:
        sid = str(snap["SnapshotId"])
        label = labels[sid]
        async with _volume_from(m, sid, None, None, phase) as volume:
            into = os.path.join(path, label) if label else path
            os.makedirs(into, exist_ok=True)
            if phase:
                phase("rsync")
            stats = await m.rsync(
                f"{volume.volume_id}:/",
                into.rstrip("/") + "/",
                options=[*RSYNC_OPTIONS, "--exclude", f"/{MANIFEST_NAME}"],
                progress=progress,
            )
            if verify and not label:  # a set's snapshots carry no manifest (by design)
                if phase:
                    phase("verify")
                found = await verify_restored(m, name, snap, volume, into, merged=overwrite)
        nbytes, nfiles = nbytes + stats.bytes, nfiles + stats.files
    first = next(iter(labels))
    result = RestoreResult(
        name=name,
        snapshot_id=first,
        dest=path,
        bytes=nbytes,
        files=nfiles,
        elapsed=time.monotonic() - started,
        snapshots={sid: label for sid, label in labels.items() if label},
        verified="not asked" if found is None else "verified" if found.verified else found.manifest,
    )
    if found is None:
        return result
    if found.failed:
        raise RestoreVerifyFailed(
            f"restore {name}: {first} was written to {path}, and it does not match the "
            f"backup's manifest: {found.summary()}",
            findings=found.as_dict(),
        )
    if not found.verified:
        log.warning("restore %s: %s: %s", name, first, found.summary())
    return result


async def restore_volumes(
    m: Manager,
    name: str,
    server: Server,
    *,
    snapshot_id: str | None = None,
    name_template: str = "{volume}-restored",
) -> dict[str, Volume]:
    """New volumes on ``server`` from the newest backup of ``name`` (or ``snapshot_id``):
    for a ``snapshot``-mode set, one per volume of the set, all from one instant.

    Each is named from ``name_template`` (``{volume}``: the name of the volume it was
    taken from) and is the caller's to keep: mounted, and left in place on success. Keyed
    by snapshot id. On a failure the volumes made so far are deleted.
    """
    names.check_name(name, "backup")
    chosen = await pick_set(m, name, snapshot_id)
    wanted: dict[str, str] = {}
    for sid, label in _labels(chosen).items():
        try:
            raw = name_template.format(volume=label)
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidArgument(
                f"restore: name template {name_template!r}: only {{volume}} is known"
            ) from e
        wanted[sid] = names.check_name(raw, "volume")
    made: dict[str, Volume] = {}
    try:
        for sid, new_name in wanted.items():
            made[sid] = await server.provision_volume(new_name, snapshot_id=sid, reuse=False)
    except BaseException:
        for volume in made.values():
            await delete_own(volume)
        raise
    return made
