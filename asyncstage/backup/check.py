"""Checks of backups against their manifests: in a snapshot (:func:`check`), and in a
restored copy (:func:`verify_restored`).

:func:`check` makes a scratch volume from the snapshot, mounts it read-only on a server
and runs :mod:`asyncstage.remote.manifest` there: the manifest is first checked against
the digest in the snapshot's tag (a manifest that does not match is reported and never
used), then the tree against the manifest: its metadata, and with ``read_data`` every
file's content. The scratch volume is deleted whatever happens; a server the check had
to start is stopped again and one it had to make is terminated.

Findings (:class:`CheckResult`): ``missing`` (listed, not there), ``changed`` (type,
size, mode, mtime or link target differ), ``extra`` (there, not listed) and ``damaged``
(metadata as listed, content not: found only with ``read_data``, or unreadable).
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from asyncstage import names, remote
from asyncstage.backup._common import Phase
from asyncstage.backup.manifest import MANIFEST_NAME, recorded
from asyncstage.backup.scratch import volume_from
from asyncstage.backup.snapshots import pick_snapshot, usable
from asyncstage.errors import InvalidArgument, UnknownSnapshot
from asyncstage.manager import Manager
from asyncstage.refs import ServerRef
from asyncstage.remote import manifest as script
from asyncstage.server import Server
from asyncstage.volume import Volume

__all__ = ["MANIFEST_STATES", "CheckResult", "check", "check_mounted", "verify_restored"]

MANIFEST_STATES = {
    "ok": "the manifest matches its tag",
    "none": "no manifest by design (a snapshot-mode set: the server's own volumes)",
    "untagged": "no manifest recorded (made before manifests, or by another tool)",
    "bad-tag": "the manifest tag is not a sha256: not trusted",
    "missing": "the tag names a manifest, and the snapshot has none",
    "mismatch": "the manifest's digest is not its tag's: not trusted",
    "unreadable": "the manifest matches its tag, and is not a manifest",
}
"""What :attr:`CheckResult.manifest` can say."""
_TRUSTED_FAILURES = ("bad-tag", "missing", "mismatch", "unreadable")


@dataclass(frozen=True)
class CheckResult:
    """What one check of one snapshot (or restored copy) found."""

    name: str
    snapshot_id: str
    manifest: str
    """One of :data:`MANIFEST_STATES`."""
    read_data: bool
    entries: int = 0
    files_read: int = 0
    bytes_read: int = 0
    missing: tuple[str, ...] = ()
    changed: tuple[dict[str, Any], ...] = ()
    """``{"path": ..., "fields": [...]}`` per changed path."""
    extra: tuple[str, ...] = ()
    damaged: tuple[dict[str, Any], ...] = ()
    """``{"path": ..., "error": ...}`` per damaged path."""
    counts: dict[str, int] = field(default_factory=dict)
    """How many of each finding (the lists hold the first 200 of each)."""
    elapsed: float = 0.0

    @property
    def verified(self) -> bool:
        """A manifest was trusted and nothing differs from it."""
        return self.manifest == "ok" and not any(self.counts.values())

    @property
    def failed(self) -> bool:
        """Something differs, or a recorded manifest cannot be trusted (``exit 1``).
        A snapshot with no manifest (``none``, ``untagged``) is not verified, nor failed."""
        return self.manifest in _TRUSTED_FAILURES or any(self.counts.values())

    def summary(self) -> str:
        """One line: the verdict and the counts."""
        if self.manifest != "ok":
            return f"not verified: {MANIFEST_STATES.get(self.manifest, self.manifest)}"
        found = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        what = "metadata and content" if self.read_data else "metadata"
        entries = f"{self.entries} entr{'y' if self.entries == 1 else 'ies'}"
        return f"{found or 'ok'} ({entries}, {what} checked" + (
            f", {self.bytes_read} bytes read)" if self.read_data else ")"
        )

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        found = asdict(self)
        for key in ("missing", "changed", "extra", "damaged"):
            found[key] = list(found[key])
        found["verified"] = self.verified
        found["failed"] = self.failed
        return found


def _from_reply(name: str, sid: str, read_data: bool, reply: dict[str, Any]) -> CheckResult:
    """A result from the helper's answer (whose shape is checked, not assumed)."""
    state = reply.get("manifest")
    if state not in ("ok", "missing", "mismatch", "unreadable"):
        state = "unreadable"
    if state != "ok":
        return CheckResult(name, sid, str(state), read_data)

    def listed(key: str) -> tuple[Any, ...]:
        value = reply.get(key)
        return tuple(value) if isinstance(value, list) else ()

    def number(key: str, within: dict[str, Any] = reply) -> int:
        value = within.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    counts = reply.get("counts")
    counts = counts if isinstance(counts, dict) else {}
    return CheckResult(
        name=name,
        snapshot_id=sid,
        manifest="ok",
        read_data=read_data,
        entries=number("entries"),
        files_read=number("files_read"),
        bytes_read=number("bytes_read"),
        missing=listed("missing"),
        changed=listed("changed"),
        extra=listed("extra"),
        damaged=listed("damaged"),
        counts={k: number(k, counts) for k in script.KINDS},
    )


async def check(
    m: Manager,
    name: str,
    *,
    snapshot_id: str | None = None,
    all_snapshots: bool = False,
    read_data: bool = False,
    server: Server | None = None,
    phase: Phase | None = None,
) -> list[CheckResult]:
    """Check the newest complete snapshot of backup ``name`` (or ``snapshot_id``, or with
    ``all_snapshots`` every complete one, newest first) against its manifest.

    Each is read from a scratch volume mounted read-only on ``server`` (default: a
    running server, else one started or made for the check and put back afterwards).
    :class:`~asyncstage.errors.UnknownSnapshot` when there is nothing to check.
    """
    names.check_name(name, "backup")
    if all_snapshots and snapshot_id is not None:
        raise InvalidArgument("check: give a snapshot id or all snapshots, not both")
    if all_snapshots:
        snaps = usable(await m.snapshots(name))
        if not snaps:
            raise UnknownSnapshot(f"no backup named {name!r} (see `asyncstage snapshots`)")
    else:
        snaps = [await pick_snapshot(m, name, snapshot_id)]
    return [await _check_one(m, name, snap, read_data, server, phase) for snap in snaps]


async def _check_one(
    m: Manager,
    name: str,
    snap: dict[str, Any],
    read_data: bool,
    server: Server | None,
    phase: Phase | None,
) -> CheckResult:
    sid = str(snap["SnapshotId"])
    kind, digest = recorded(snap)
    if kind != "sha256":
        return CheckResult(name, sid, kind, read_data)
    started = time.monotonic()
    async with volume_from(m, sid, server, None, phase, put_back=True) as volume:
        assert volume.server is not None and volume.mtpt
        # read-only from here on: a check never changes what it checks
        await volume.server.run("mount", "-o", "remount,ro", "--", volume.mtpt, sudo=True)
        if phase:
            phase("check")
        reply = await check_mounted(volume.server, volume.mtpt, digest, read_data=read_data)
    found = _from_reply(name, sid, read_data, reply)
    return CheckResult(**{**asdict(found), "elapsed": time.monotonic() - started})


async def check_mounted(
    server: ServerRef, root: str, digest: str, *, read_data: bool
) -> dict[str, Any]:
    """The manifest helper's answer for the tree mounted at ``root`` on ``server``, whose
    manifest must have the sha256 ``digest`` (see :mod:`asyncstage.remote.manifest`)."""
    flags = ["read-data"] if read_data else []
    return await remote.run_json(
        server.host,
        True,
        "manifest",
        "check",
        root,
        f"{root}/{MANIFEST_NAME}",
        digest,
        *flags,
        timeout=None,
    )


async def verify_restored(
    m: Manager,
    name: str,
    snap: dict[str, Any],
    volume: Volume,
    dest: str,
    *,
    merged: bool,
) -> CheckResult:
    """Check a restored local copy at ``dest`` (content included) against the manifest on
    ``volume`` (the snapshot's scratch volume), trusted only when it matches its tag.
    ``merged``: files that were already in ``dest`` are not reported as extra."""
    sid = str(snap["SnapshotId"])
    kind, digest = recorded(snap)
    if kind != "sha256":
        return CheckResult(name, sid, kind, True)
    assert volume.server is not None and volume.mtpt
    started = time.monotonic()
    where = f"{volume.mtpt}/{MANIFEST_NAME}"
    there = await volume.server.run("test", "-f", where, sudo=True, check=False)
    if not there.ok:
        return CheckResult(name, sid, "missing", True)
    with tempfile.TemporaryDirectory(prefix="asyncstage-manifest-") as tmp:
        await m.rsync(f"{volume.volume_id}:/{MANIFEST_NAME}", tmp + "/")
        run = functools.partial(
            script.check,
            dest,
            os.path.join(tmp, MANIFEST_NAME),
            digest,
            read_data=True,
            ignore_extra=merged,
        )
        reply = await _in_thread(run)
    found = _from_reply(name, sid, True, reply)
    return CheckResult(**{**asdict(found), "elapsed": time.monotonic() - started})


async def _in_thread(run: functools.partial[dict[str, Any]]) -> dict[str, Any]:
    """Run a local check in a worker thread; cancelling it stops the thread at its next
    file instead of waiting for the whole tree."""
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(
            functools.partial(run, cancelled=stop.is_set), abandon_on_cancel=True
        )
    finally:
        stop.set()
