"""``copy`` mode: rsync the sources into a work volume of the run's own, snapshot it.

One run of backup ``NAME``:

1. takes the backup's lease (:mod:`asyncstage.backup.lease`): another live run of the
   name makes it wait (``wait`` seconds) or refuse with ``BackupInProgress``;
2. removes the leftovers of runs of the name that died (:mod:`asyncstage.backup.sweep`),
   while it lists the backup's complete snapshots and measures the sources;
3. makes a **new** work volume called ``NAME``, tagged as the run's from its create call
   on: from the newest complete snapshot of the name (grown when the data needs more
   room), or empty for the first backup; with ``keep_volume``, the volume the previous
   run kept, when it holds that snapshot (:mod:`asyncstage.backup.warm`);
4. brings it up to date with ``rsync --delete``, one host's sources after another, and
   writes the manifest of every file at its root (:mod:`asyncstage.backup.manifest`;
   what landed is hashed while rsync runs, the final pass reads what changed since);
5. snapshots it (the manifest's digest in a tag from its create call on), waits until
   the snapshot is ``completed`` (detaching the volume meanwhile, unless it is kept),
   and marks it complete with its parent snapshot and its consistency;
6. deletes the work volume (with ``keep_volume``: unmounts it and tags it as kept for
   the new snapshot) and releases the lease.

A live volume that has the backup's name, made by someone else, is never written,
adopted nor deleted: the backup is refused with :class:`~asyncstage.errors.NameTaken`.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from asyncstage import names
from asyncstage.adoption import extra_tags
from asyncstage.backup._common import RSYNC_OPTIONS, Phase, ProgressCallback, delete_own, log
from asyncstage.backup.hooks import Hook, HookFailed, run_hook
from asyncstage.backup.lease import Lease, with_lease
from asyncstage.backup.manifest import (
    MANIFEST_NAME,
    Follower,
    data_tag,
    manifest_tag,
    recorded,
    write_manifest,
)
from asyncstage.backup.runs import RunInfo
from asyncstage.backup.snapshots import STATE_TAG, mark_complete, usable
from asyncstage.backup.sources import Group, Source, measure, plan_sources, volume_dir
from asyncstage.backup.sweep import SweepResult, sweep
from asyncstage.backup.warm import claim, is_kept, mark_kept, reuse
from asyncstage.concurrency import concurrently
from asyncstage.errors import (
    AsyncstageError,
    InvalidArgument,
    NameTaken,
    RsyncError,
    ServerNotRunning,
    SSHError,
)
from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.transfer import TransferStats
from asyncstage.volume import Volume

__all__ = ["DEFAULT_TTL", "BackupResult", "backup"]

DEFAULT_TTL = 300.0
"""Seconds a run's lease lasts unless renewed (it is renewed every third of that)."""


@dataclass(frozen=True)
class BackupResult:
    """What one backup run did."""

    name: str
    snapshot_id: str
    """The new snapshot (completed, marked complete)."""
    previous_snapshot_id: str | None
    """The snapshot the volume was made from (None for a first backup)."""
    volume_id: str
    """The work volume (deleted, unless kept)."""
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
    run_id: str = ""
    """This run's id (in the tags of everything it made)."""
    consistency: str = "crash-consistent"
    """``crash-consistent``, or ``application-consistent`` when ``pre`` hooks ran."""
    swept: tuple[str, ...] = ()
    """Leftovers of dead runs this run removed first (volume and snapshot ids)."""
    manifest_sha256: str = ""
    """sha256 of the snapshot's manifest (also in its ``asyncstage:backup-manifest`` tag)."""
    manifest_s: float = 0.0
    """Seconds from the end of rsync to the manifest written (hashing the files on the
    work volume that changed since the previous snapshot's manifest, or every file,
    except those the follow pass hashed while rsync ran)."""
    manifest_reused: int = 0
    """Files whose digest the previous snapshot's manifest gave (unchanged since)."""
    manifest_followed: int = 0
    """Files whose digest the follow pass gave (hashed while rsync ran, unchanged since)."""
    manifest_hashed: int = 0
    """Bytes of files read and hashed for the manifest once rsync was done."""
    volume_kept: bool = False
    """Whether the work volume was kept for the next run (``keep_volume``)."""
    volume_reused: bool = False
    """Whether this run copied into the volume the previous run kept."""

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict (``--json``)."""
        found = asdict(self)
        found["swept"] = list(self.swept)
        return found


@contextlib.contextmanager
def run_tags(run: RunInfo, more: dict[str, str] | None = None) -> Iterator[None]:
    """Volumes and snapshots made inside carry ``run``'s tags (and ``more``) from their
    create call on."""
    token = extra_tags.set({**run.tags(), STATE_TAG: "pending", **(more or {})})
    try:
        yield
    finally:
        extra_tags.reset(token)


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
    wait: float = 0.0,
    ttl: float = DEFAULT_TTL,
    keep_volume: bool = False,
) -> BackupResult:
    """Back ``sources`` up into a new snapshot named ``name`` (incremental).

    Sources are local paths, ``SERVER:/path``, ``user@host:/path``, ``VOLUME:`` or
    ``VOLUME:/sub`` (see :mod:`asyncstage.backup.sources` for where each lands in the
    snapshot). The work volume is made on ``server`` (default: the managed server all
    sources are on, when they are on one that is running; else any server in ``zone``).
    ``size`` is in GiB (default: room for the data, never less than the previous snapshot).

    Another live run of ``name`` is waited for up to ``wait`` seconds, then refused with
    :class:`~asyncstage.errors.BackupInProgress`. :class:`NameTaken` when a volume called
    ``name`` that is no run's work volume exists. On failure or cancellation the run's own
    volume is deleted and the earlier snapshots are kept.

    ``keep_volume`` keeps the work volume (attached, unmounted) for the next run, which
    then copies only the change into it (:mod:`asyncstage.backup.warm`: when it is used,
    what it costs). A run without it deletes a volume an earlier run kept.
    """
    names.check_name(name, "backup")
    if not isinstance(keep_volume, bool):
        raise InvalidArgument(f"backup {name}: keep_volume is true or false")
    groups = plan_sources(m, sources)
    run = RunInfo.new(name, ttl)

    async def body(lease: Lease) -> BackupResult:
        return await _run(
            m, lease, groups, server, size, zone, description, progress, phase, keep_volume
        )

    return await with_lease(m, run, body, wait=wait, ttl=ttl)


async def _run(
    m: Manager,
    lease: Lease,
    groups: list[Group],
    server: Server | None,
    size: int | None,
    zone: str | None,
    description: str | None,
    progress: ProgressCallback | None,
    phase: Phase | None,
    keep_volume: bool,
) -> BackupResult:
    tell = phase or (lambda _: None)
    name = lease.run.name
    found = await _look_around(m, lease, groups, size)
    existing, kept_desc, swept = found.kept, found.kept_desc, found.swept
    started = time.monotonic()
    if server is None:
        server = _sole_source_server(groups, zone, name)
    previous, needed = found.previous, found.needed
    parent: str | None = None
    earlier: str | None = None  # the parent's manifest digest: its unchanged files kept
    if previous:
        needed = max(needed, int(previous[0]["VolumeSize"]))
        parent = str(previous[0]["SnapshotId"])
        kind, digest = recorded(previous[0])
        earlier = digest if kind == "sha256" else None
    tell("volume")
    volume: Volume | None = None
    if existing is not None:  # a kept volume (sweep left it: it holds the newest backup)
        volume = await _reuse_kept(
            m, lease.run, existing, kept_desc, previous, needed, server, zone, keep_volume
        )
    reused = volume is not None
    if volume is None:
        volume = await _new_volume(m, lease.run, server, needed, parent, zone)
    t_volume = time.monotonic()
    try:
        tell("rsync")
        stats, consistency, t_rsync, manifest = await _copy_listed(
            m, volume, groups, progress, earlier, tell
        )
        t_manifest = time.monotonic()
        tell("snapshot")
        # the snapshot needs it unmounted (nothing mounts it again); the lease is checked
        # meanwhile, before anything is made
        await concurrently(lease.check, volume.unmount, cancel_others=False)
        # the manifest's digest is known: tagged in the create call, not a call of its own
        with run_tags(lease.run, manifest_tag(manifest["sha256"]) | data_tag(manifest)):
            new_id = await volume.create_snapshot(description or f"asyncstage backup {name}")
        # EC2 said completed (the wait returns only then), so it can be a backup's base
        await _completed(m, new_id, None if keep_volume else volume)
        await lease.check()  # a run that lost its lease never marks anything complete
        await mark_complete(m, [new_id], parent, consistency)
        if keep_volume:  # only now: a kept volume always holds a complete backup
            await mark_kept(m, volume, new_id)
    except BaseException:
        tell("cleanup")
        await delete_own(volume)
        raise
    t_snapshot = time.monotonic()
    tell("cleanup")
    if not keep_volume:
        await delete_own(volume)
    return BackupResult(
        name=name,
        snapshot_id=new_id,
        previous_snapshot_id=parent,
        volume_id=volume.volume_id,
        size_gib=volume.size,
        bytes=stats.bytes,
        files=stats.files,
        wire_bytes=stats.wire_bytes,
        route=stats.route,
        volume_s=t_volume - started,
        rsync_s=t_rsync - t_volume,
        snapshot_s=t_snapshot - t_manifest,
        elapsed=time.monotonic() - started,
        run_id=lease.run.run_id,
        consistency=consistency,
        swept=tuple(swept.volumes + swept.snapshots),
        manifest_sha256=manifest["sha256"],
        manifest_s=t_manifest - t_rsync,
        manifest_reused=int(manifest.get("reused", 0)),
        manifest_followed=int(manifest.get("followed", 0)),
        manifest_hashed=int(manifest.get("hashed", 0)),
        volume_kept=keep_volume,
        volume_reused=reused,
    )


@dataclass
class _Found:
    """What a run finds before it makes anything (:func:`_look_around`)."""

    swept: SweepResult
    kept: Volume | None = None
    kept_desc: dict[str, Any] = field(default_factory=dict)
    previous: list[dict[str, Any]] = field(default_factory=list)
    needed: int = 0


async def _look_around(m: Manager, lease: Lease, groups: list[Group], size: int | None) -> _Found:
    """Sweep what dead runs of the backup left, find the volume an earlier run kept, list
    the complete backups and measure the sources, the three at once (each its own calls
    or commands; the sweep never removes a complete backup, so the list holds). A failure
    of one lets the others end first, the sweep above all."""
    name = lease.run.name
    found = _Found(swept=SweepResult())

    async def swept_and_kept() -> None:
        found.swept = await sweep(m, name, current_run=lease.run.run_id, lease_held=True)
        kept_elsewhere = bool(found.swept.kept_volumes)
        found.kept, found.kept_desc = await _kept_volume(m, name, kept_elsewhere=kept_elsewhere)

    async def listed() -> None:
        found.previous = usable(await m.snapshots(name))

    async def measured() -> None:
        found.needed = size if size is not None else await measure(groups)

    await concurrently(swept_and_kept, listed, measured, cancel_others=False)
    return found


async def _copy_listed(
    m: Manager,
    volume: Volume,
    groups: list[Group],
    progress: ProgressCallback | None,
    earlier: str | None,
    tell: Phase,
) -> tuple[TransferStats, str, float, dict[str, Any]]:
    """rsync into the volume while the follow pass hashes what lands, then the manifest
    (:mod:`asyncstage.backup.manifest`; the follow pass writes it when it ran): the
    copy's figures, its consistency, when it ended, and the manifest's answer."""
    follower = Follower(volume, earlier)
    done: list[tuple[TransferStats, str, float]] = []

    async def copy() -> None:
        stats, consistency = await _copy_into(m, volume, groups, progress, follower.rsyncing)
        done.append((stats, consistency, time.monotonic()))
        tell("manifest")
        follower.rsyncing.set()  # (set already, unless no rsync ran)
        follower.copied.set()

    await concurrently(copy, follower.run)  # the copy's error as itself, the follower stopped
    ((stats, consistency, copied),) = done
    return stats, consistency, copied, follower.reply or await write_manifest(volume, earlier)


async def _completed(m: Manager, snapshot_id: str, detach: Volume | None) -> None:
    """Wait until the snapshot is completed, detaching ``detach`` meanwhile: a snapshot
    holds the volume as it was at its create call, so the volume that is deleted next
    need not wait for EC2 to finish it. The detach is never cut short (a failed wait
    waits for it), so that the cleanup finds the volume attached or detached."""

    async def detached(volume: Volume) -> None:
        with anyio.CancelScope(shield=True):
            await volume.detach()

    async with anyio.create_task_group() as tg:
        if detach is not None:
            tg.start_soon(detached, detach)
        await m.ec2.wait_for_snapshot(snapshot_id, timeout=m.timeouts.snapshot)


async def _kept_volume(
    m: Manager, name: str, *, kept_elsewhere: bool
) -> tuple[Volume | None, dict[str, Any]]:
    """The volume an earlier run kept for backup ``name``, with its description, if any.

    ``kept_elsewhere``: the sweep saw one that a run of another manager kept, which is
    adopted with its server, as a manager that scans would. A volume of the name that is
    no kept backup volume is someone else's: refused."""
    existing = m.find_volume_by_name(name)
    if existing is None and kept_elsewhere:
        await m.scan_region()
        existing = m.find_volume_by_name(name)
    if existing is None:
        return None, {}
    desc = await existing.refresh()
    if not is_kept(desc, name):
        raise NameTaken(
            f"backup {name!r}: a volume named {name!r} exists ({existing.volume_id}); a backup "
            "works only on a volume of its own and never touches it: choose another backup name"
        )
    return existing, desc


async def _reuse_kept(
    m: Manager,
    run: RunInfo,
    kept: Volume,
    desc: dict[str, Any],
    previous: Sequence[dict[str, Any]],
    needed: int,
    server: Server | None,
    zone: str | None,
    keep_volume: bool,
) -> Volume | None:
    """``kept``, claimed by the run, when it is asked for and holds the newest of the
    backup's ``previous`` snapshots; else None (and deleted when no longer asked for)."""
    if not keep_volume:  # kept by an earlier run, no longer asked for: dropped
        log.info("backup %s: deleting the volume an earlier run kept", run.name)
        await delete_own(kept)
        return None
    newest = previous[0] if previous else None
    if not await reuse(kept, desc, run.name, newest, needed=needed, server=server, zone=zone):
        return None
    try:
        await claim(m, kept, run)
    except BaseException:
        await delete_own(kept)
        raise
    return kept


async def _new_volume(
    m: Manager, run: RunInfo, server: Server | None, size: int, parent: str | None, zone: str | None
) -> Volume:
    """A new work volume of the run, on ``server`` when given, from ``parent`` if any."""
    with run_tags(run):  # reuse=False: a volume of this name is refused, never adopted
        if server is not None:
            return await server.provision_volume(
                run.name, size=size, snapshot_id=parent, reuse=False
            )
        return await m.provision_volume(
            run.name, size=size, snapshot_id=parent, reuse=False, availability_zone=zone
        )


def _sole_source_server(groups: list[Group], zone: str | None, name: str) -> Server | None:
    """The managed server all sources are on, when it is running (in ``zone``, if one is
    asked for) and no source holds the work volume's mount point: the work volume is
    made there, so rsync copies on that server alone (no ssh leg, no temporary key).
    Otherwise every backup of a fleet would funnel its data over ssh into one server."""
    hosts = {id(g.server): g.server for g in groups}
    if len(hosts) != 1:
        return None
    (only,) = hosts.values()
    if only is None or only.state != "running":
        return None
    if zone is not None and only.availability_zone != zone:
        return None
    mtpt = only.default_mtpt(name)
    for g in groups:
        for p in g.paths:
            top = posixpath.normpath(str(p).split(":", 1)[1]).rstrip("/") + "/"
            if mtpt.startswith(top):  # the copy would take in its own destination
                return None
    return only


async def _copy_into(
    m: Manager,
    volume: Volume,
    groups: list[Group],
    progress: ProgressCallback | None,
    rsyncing: anyio.Event,
) -> tuple[TransferStats, str]:
    """rsync each host's sources into its directory of the volume, between their hooks
    (``rsyncing`` set as the first rsync starts); the summed figures and the consistency
    (application-consistent only when every source had a ``pre`` hook that succeeded)."""
    total = TransferStats(route="", elapsed=0.0, bytes=0)
    routes: list[str] = []
    quiesced = True
    for g in groups:
        posts: list[Hook] = []
        post_error: HookFailed | None = None
        try:
            for hooks in g.hooks:
                if hooks.post is not None:
                    posts.append(hooks.post)  # runs once its pre has started, whatever happens
                ok = hooks.pre is not None and await run_hook("pre", hooks.pre, g.server)
                quiesced = quiesced and ok
            try:
                rsyncing.set()
                stats = await _rsync_group(m, volume, g, progress)
            except (RsyncError, SSHError) as e:
                better = await _explained(volume, g, e)
                if better is e:
                    raise
                raise better from e
        finally:
            with anyio.CancelScope(shield=True):
                for post in reversed(posts):
                    try:
                        await run_hook("post", post, g.server)
                    except HookFailed as e:
                        log.warning("backup: %s", e)
                        post_error = post_error or e
        if post_error is not None:
            raise post_error
        if stats.route not in routes:
            routes.append(stats.route)
        total = TransferStats(
            route=",".join(routes),
            elapsed=total.elapsed + stats.elapsed,
            bytes=total.bytes + stats.bytes,
            files=total.files + stats.files,
            wire_bytes=total.wire_bytes + stats.wire_bytes,
        )
    return total, ("application-consistent" if quiesced else "crash-consistent")


async def _explained(volume: Volume, g: Group, e: RsyncError | SSHError) -> Exception:
    """The error a failed copy of one group stands for: a work volume that is full, or a
    source server that is no longer running (stopped, terminated), said as such; else ``e``."""
    if isinstance(e, RsyncError) and "No space left on device" in f"{e.stderr}\n{e}":
        return RsyncError(
            f"backup {volume.name}: its work volume ({volume.size} GiB) is full while copying "
            f"{', '.join(g.labels)}; give it a bigger size (--size, size=, or size in a plan)",
            exit_code=e.exit_code,
            stderr=e.stderr,
        )
    if g.server is not None:
        with anyio.CancelScope(shield=True):
            try:
                await g.server.refresh()
            except AsyncstageError as why:
                log.debug("backup: could not look %s up again: %s", g.server.name, why)
        if g.server.state != "running":
            return ServerNotRunning(
                f"backup {volume.name}: source server {g.server.name} "
                f"({g.server.instance_id}) is {g.server.state}; its copy failed: {e}"
            )
    return e


async def _rsync_group(
    m: Manager, volume: Volume, g: Group, progress: ProgressCallback | None
) -> TransferStats:
    if "/" in g.dest:  # rsync makes the destination's last directory, not those above it
        assert volume.server is not None and volume.mtpt
        parent = posixpath.dirname(g.dest)
        await volume.server.scmd("mkdir", "-p", "--", f"{volume.mtpt}/{parent}", sudo=True)
    options = [*RSYNC_OPTIONS, *(["--relative"] if g.relative else [])]
    if not g.dest:  # into the root: --delete would take the manifest the next pass reuses
        options += ["--exclude", f"/{MANIFEST_NAME}"]
    return await m.rsync(
        *g.paths,
        f"{volume.volume_id}:{volume_dir(g.dest)}",
        options=options,
        delete=True,
        progress=progress,
    )
