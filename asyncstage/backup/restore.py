"""Restores: from a complete snapshot of a backup, never from a live volume."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from asyncstage import names
from asyncstage.backup._common import RSYNC_OPTIONS, Phase, ProgressCallback, log
from asyncstage.backup.check import CheckResult, verify_restored
from asyncstage.backup.manifest import MANIFEST_NAME
from asyncstage.backup.scratch import volume_from as _volume_from
from asyncstage.backup.snapshots import pick_snapshot
from asyncstage.errors import DestinationNotEmpty, InvalidArgument, RestoreVerifyFailed
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.volume import Volume

__all__ = ["RestoreResult", "check_destination", "restore", "snapshot_volume"]


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

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        return asdict(self)


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
    snap = await pick_snapshot(m, name, snapshot_id)
    chosen = str(snap["SnapshotId"])
    found: CheckResult | None = None
    async with _volume_from(m, chosen, None, None, phase) as volume:
        os.makedirs(path, exist_ok=True)
        if phase:
            phase("rsync")
        stats = await m.rsync(
            f"{volume.volume_id}:/",
            path.rstrip("/") + "/",
            options=[*RSYNC_OPTIONS, "--exclude", f"/{MANIFEST_NAME}"],
            progress=progress,
        )
        if verify:
            if phase:
                phase("verify")
            found = await verify_restored(m, name, snap, volume, path, merged=overwrite)
    result = RestoreResult(
        name=name,
        snapshot_id=chosen,
        dest=path,
        bytes=stats.bytes,
        files=stats.files,
        elapsed=time.monotonic() - started,
        verified="not asked" if found is None else "verified" if found.verified else found.manifest,
    )
    if found is None:
        return result
    if found.failed:
        raise RestoreVerifyFailed(
            f"restore {name}: {chosen} was written to {path}, and it does not match the "
            f"backup's manifest: {found.summary()}",
            findings=found.as_dict(),
        )
    if not found.verified:
        log.warning("restore %s: %s: %s", name, chosen, found.summary())
    return result
