"""Disks: what a server does with volumes: block devices, filesystems and mounts.

A :class:`Disks` belongs to one :class:`~asyncstage.server.Server` and does the work of
its volume methods (``provision_volume``, ``mount_volume`` ...) over the server's
commands; a volume's state changes only through its own ``record_*`` methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from logging import DEBUG
from typing import TYPE_CHECKING

import anyio

from asyncstage import mounts
from asyncstage.adoption import creation_tags, ours, owner_tags
from asyncstage.attachments import Attachments, detached
from asyncstage.ec2 import new_client_token, tag, tags_of
from asyncstage.ec2.tags import tag_list
from asyncstage.errors import (
    AsyncstageError,
    BadFstype,
    BadSize,
    CommandFailed,
    EC2Error,
    MountPointRefused,
    NameTaken,
    UnknownVolume,
    VolumeError,
    VolumeInUse,
    ZoneMismatch,
)
from asyncstage.names import check_mount_point, check_name, is_valid_mount_point

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.ec2 import Resource
    from asyncstage.options import VolumeOptions
    from asyncstage.refs import ServerRef, VolumeRef

__all__ = ["FSTYPES", "Disks", "mkfs_argv", "our_snapshots"]

log = logging.getLogger("asyncstage")

FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "raw")
"""The filesystem types provision_volume can make (``raw``: attached, not formatted)."""

_MKFS_PACKAGE = {
    "ext2": "e2fsprogs",
    "ext3": "e2fsprogs",
    "ext4": "e2fsprogs",
    "xfs": "xfsprogs",
    "btrfs": "btrfs-progs",
    "vfat": "dosfstools",
}
_LABEL_MAX = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12, "btrfs": 255, "vfat": 11}
_MAX_SIZE = 16384  # GiB, the largest EBS volume


def mkfs_argv(fstype: str, label: str | None = None, uuid: str | None = None) -> list[str]:
    """The mkfs command line (without the device) that makes ``fstype`` quietly and forcibly,
    with this label and UUID (vfat: an 8 hex digit volume id from the UUID)."""
    argv: list[str] = [f"mkfs.{fstype}"]
    if fstype.startswith("ext"):
        argv += ["-F", "-q"]
        argv += ["-L", label] if label else []
        argv += ["-U", uuid] if uuid else []
    elif fstype == "xfs":
        argv += ["-f", "-q"]
        argv += ["-L", label] if label else []
        argv += ["-m", f"uuid={uuid}"] if uuid else []
    elif fstype == "btrfs":
        argv += ["-f", "-q"]
        argv += ["-L", label] if label else []
        argv += ["-U", uuid] if uuid else []
    elif fstype == "vfat":
        argv += ["-I"]
        argv += ["-n", label.upper()] if label else []
        argv += ["-i", uuid.replace("-", "")[:8]] if uuid else []
    return argv


@dataclass(frozen=True)
class _NewVolume:
    """What provision_volume makes a new volume from, and how."""

    size: int
    fstype: str | None
    snapshot_id: str | None
    grow_from: int | None  # the snapshot's smaller size: grow the filesystem


async def _discard_volume(ctx: Context, volume: VolumeRef) -> None:
    """Best effort: detach and delete a volume whose provisioning failed (or was cancelled)."""
    m = ctx
    try:
        server = volume.server
        if server is not None and volume.mtdev is not None and server.state == "running":
            await server.run("umount", volume.mtdev, sudo=True, check=False)
        # EC2's word, not ours: a cancelled AttachVolume may have attached it unbeknown to
        # us, even after this description (the call was still in flight): a delete refused
        # because it is attached detaches it and deletes it again
        found = await m.ec2.describe_volumes([volume.volume_id])
        attached = server is not None or bool(found and found[0].get("Attachments"))
        for last in (False, False, True):
            if attached:
                await detached(ctx, volume.volume_id, force=True)
            try:
                await m.ec2.delete_volume(volume.volume_id)
                break
            except EC2Error as e:
                if e.code != "VolumeInUse" or last:
                    raise
                attached = True
    except AsyncstageError as e:
        log.warning("could not delete volume %s: %s", volume.volume_id, e)
    m.registry.forget_volume(volume)


def _check_size(size: object) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_SIZE:
        raise BadSize(f"bad volume size {size!r}: a whole number of GiB from 1 to {_MAX_SIZE}")
    return size


def _check_fstype(fstype: str | None) -> str | None:
    if fstype is not None and fstype not in FSTYPES:
        raise BadFstype(f"unsupported filesystem type {fstype!r}: one of {', '.join(FSTYPES)}")
    return fstype


async def _check_blank(server: ServerRef, volume: VolumeRef) -> None:
    """VolumeInUse unless the device about to be formatted is this volume, mounted
    nowhere, not swap, and blank (a volume this call created empty has no signature)."""
    assert volume.mtdev
    argv = mounts.mkfs_probe_argv(volume.volume_id, volume.mtdev)
    found = mounts.parse_mkfs_probe(await server.scmd(*argv, sudo=True))
    why = found.refusal(volume.name)
    if why is not None:
        raise VolumeInUse(f"refusing to format {volume.mtdev} on {server.name}: {why}")


async def _real_mount_point(server: ServerRef, where: str) -> str:
    """``where`` with its symlinks resolved on the server, checked again: a symlink
    that leads into a system directory is refused (MountPointRefused)."""
    real = (await server.scmd(*mounts.realpath_argv(where), sudo=True)).strip()
    return _checked_real(server, where, real)


def _checked_real(server: ServerRef, where: str, real: str) -> str:
    """``real``, where ``where`` leads on the server, unless it is refused as a mount point."""
    try:
        return check_mount_point(real)
    except MountPointRefused as e:
        raise MountPointRefused(
            f"mount point {where} on {server.name} leads to {real!r}: {e}"
        ) from e


async def _probe_mounts(server: ServerRef, volume: VolumeRef, mtdev: str) -> None:
    """Record where an adopted volume is mounted, as its server says (device numbers)."""
    mtpt = volume.mtpt or server.default_mtpt(volume)
    argv = mounts.probe_argv(volume.volume_id, mtdev, mtpt)
    probe = mounts.parse_probe(await server.scmd(*argv, sudo=True))
    where = [t for t in probe.volume_mounts() if is_valid_mount_point(t)]
    if mtpt in where:
        volume._record_mount(mtpt)
    elif where:
        volume._record_mount(where[0])
    else:
        volume._record_unmount()


async def our_snapshots(ctx: Context, name: str | None = None) -> list[Resource]:
    """Our staging snapshots (of volumes named ``name``), newest first, failed ones left
    out: only those our keys own (their ``asyncstage:owner`` tag), with tags that pass the
    naming rules; nothing else is ever restored from."""
    found = await ctx.images.snapshots(name)
    return ours("snapshot", found, keys=ctx.known_key_names(), fstypes=FSTYPES, level=DEBUG)


class Disks:
    """The volume work of one server: device names, filesystems, attach, mount, provision.

    Holds what only this server's volume work needs: its :class:`Attachments` (device
    names, slots, attach and detach), the filesystems its kernel can mount and the mkfs
    programs it was found to have.
    """

    def __init__(self, ctx: Context, server: ServerRef) -> None:
        self.ctx = ctx
        self.server = server
        self.attachments = Attachments(ctx, server)
        self._kernel_fs: set[str] = set()
        self._mkfs: set[str] = set()

    async def unused_block_device(self, major_start: str = "f") -> tuple[str, str]:
        """A free device name: see :meth:`Attachments.unused_block_device
        <asyncstage.attachments.Attachments.unused_block_device>`."""
        return await self.attachments.unused_block_device(major_start)

    async def _has_program(self, program: str) -> bool:
        result = await self.server.run("which", program, check=False, sudo=True)
        return result.exit_status == 0

    async def _ensure_kernel_fs(self, fstype: str) -> None:
        """BadFstype unless the server's kernel can mount fstype (loading its module if need be)."""
        if fstype in self._kernel_fs:
            return
        for attempt in range(2):
            text = await self.server.scmd("cat", "/proc/filesystems")
            self._kernel_fs = {line.split()[-1] for line in text.splitlines() if line.split()}
            if fstype in self._kernel_fs:
                return
            if attempt == 0:
                await self.server.run("modprobe", fstype, sudo=True, check=False)
        raise BadFstype(
            f"the kernel of server {self.server.name} cannot mount {fstype} filesystems"
        )

    async def _ensure_mkfs(self, fstype: str) -> None:
        """BadFstype unless this server has ``mkfs.FSTYPE`` (installed when allowed). Looked
        up once per server: one removed since fails its mkfs, which tells (:meth:`_format`)."""
        program = f"mkfs.{fstype}"
        if program in self._mkfs:
            return
        if await self._has_program(program):
            self._mkfs.add(program)
            return
        if self.ctx.storage.install_packages and await self._has_program("apt-get"):
            await self.server.run(
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-q",
                _MKFS_PACKAGE[fstype],
                sudo=True,
                check=False,
                timeout=600,
            )
            if await self._has_program(program):
                self._mkfs.add(program)
                return
        raise self._no_mkfs(program, fstype)

    def _no_mkfs(self, program: str, fstype: str) -> BadFstype:
        return BadFstype(
            f"server {self.server.name} cannot make {fstype} filesystems ({program} missing)"
        )

    async def _format(self, volume: VolumeRef, label: str | None, uuid: str | None) -> None:
        """mkfs on a new, blank volume; BadFstype when its program has gone since it was
        found (asked again only then)."""
        assert volume.mtdev
        fstype = volume.fstype
        program = f"mkfs.{fstype}"
        try:
            await self.server.run(
                *mkfs_argv(fstype, label, uuid), volume.mtdev, sudo=True, timeout=600
            )
        except CommandFailed as e:
            if await self._has_program(program):
                raise
            self._mkfs.discard(program)
            raise self._no_mkfs(program, fstype) from e

    async def _grow_unmounted(self, volume: VolumeRef) -> None:
        """Grow an ext2/3/4 filesystem to fill its device, offline (checked first)."""
        assert volume.mtdev
        check = await self.server.run("e2fsck", "-f", "-p", volume.mtdev, sudo=True, check=False)
        if check.exit_status not in (0, 1):  # 1: errors corrected
            await self.server.run("e2fsck", "-f", "-p", volume.mtdev, sudo=True)
        await self.server.run("resize2fs", volume.mtdev, sudo=True, timeout=600)

    async def _grow(self, volume: VolumeRef) -> None:
        """Grow a mounted xfs or btrfs filesystem to fill its device."""
        assert volume.mtdev and volume.mtpt
        if volume.fstype == "xfs":
            await self.server.run("xfs_growfs", volume.mtpt, sudo=True, timeout=600)
        elif volume.fstype == "btrfs":
            await self.server.run("btrfs", "filesystem", "resize", "max", volume.mtpt, sudo=True)

    async def _mounts(self) -> list[tuple[str, str, str]]:
        """(device, mount point, fstype) of every mount, from /proc/mounts."""
        return mounts.parse_mounts(await self.server.scmd("cat", "/proc/mounts"))

    async def provision(self, name: str | None, options: VolumeOptions) -> VolumeRef:
        """Make (or reuse) a volume, attach it here, format it and mount it: see
        :meth:`Server.provision_volume <asyncstage.server.Server.provision_volume>`."""
        server, m = self.server, self.ctx
        size = _check_size(options.get("size"))
        fstype = _check_fstype(options.get("fstype"))
        availability_zone, label = options.get("availability_zone"), options.get("label")
        volume_id, reuse = options.get("volume_id"), options.get("reuse")
        if availability_zone and availability_zone != server.availability_zone:
            raise ZoneMismatch(
                f"server {server.name} is in {server.availability_zone}, not {availability_zone}"
            )
        name = check_name(name, "volume") if name is not None else m.registry.new_volume_name()
        where = options.get("mtpt") or options.get("mount")
        where = check_mount_point(where) if where else None
        reuse = m.storage.reuse_volumes if reuse is None else reuse
        if fstype and label and len(label) > _LABEL_MAX.get(fstype, 255):
            raise BadFstype(f"label {label!r} too long for {fstype}")
        if volume_id is None:
            existing = m.registry.find_volume_by_name(name)
            if existing is not None:
                return await self._reuse_volume(existing, reuse=reuse, where=where)
            snapshot_id = options.get("snapshot_id")
            plan = await self._plan_new_volume(name, size, fstype, snapshot_id, reuse=reuse)
            if where is not None:  # a symlink out is refused before anything is made
                where = await _real_mount_point(self.server, where)
            uuid = options.get("uuid")
            return await self._make_volume(name, plan, where=where, label=label, uuid=uuid)
        return await self._adopt_volume_id(volume_id, name, fstype, where)

    async def _reuse_volume(
        self, existing: VolumeRef, *, reuse: bool, where: str | None
    ) -> VolumeRef:
        """provision_volume of a name in use: that volume, attached and mounted here."""
        name = existing.name
        if not reuse:
            raise NameTaken(f"a volume named {name!r} exists already ({existing.volume_id})")
        if existing.server is not None and existing.server is not self.server:
            raise VolumeInUse(
                f"volume {name} ({existing.volume_id}) is attached to {existing.server.name}"
            )
        if existing.availability_zone != self.server.availability_zone:
            raise ZoneMismatch(
                f"volume {name} is in {existing.availability_zone}, "
                f"server {self.server.name} in {self.server.availability_zone}"
            )
        if not existing.mounted and existing.fstype != "raw":
            await self.mount(existing, where)
        elif existing.server is None:
            await self._attach(existing)
        return existing

    async def _adopt_volume_id(
        self, volume_id: str, name: str, fstype: str | None, where: str | None
    ) -> VolumeRef:
        """provision_volume(volume_id=...): name an existing available volume, attach it here."""
        m = self.ctx
        found = await m.ec2.describe_volumes([volume_id])
        if not found:
            raise UnknownVolume(f"volume {volume_id} does not exist")
        desc = found[0]
        if desc["AvailabilityZone"] != self.server.availability_zone:
            raise ZoneMismatch(
                f"volume {volume_id} is in {desc['AvailabilityZone']}, "
                f"server {self.server.name} in {self.server.availability_zone}"
            )
        if desc.get("State") != "available":
            raise VolumeInUse(f"volume {volume_id} is {desc.get('State')}, not available")
        tags = {tag("role"): "volume", tag("name"): name, "Name": name}
        tags |= owner_tags(m.account.local_key().name)  # it is ours now
        await m.ec2.create_tags([volume_id], tags)
        desc.setdefault("Tags", []).extend({"Key": k, "Value": v} for k, v in tags.items())
        volume = m.registry.add_volume(desc)
        volume.fstype = tags_of(desc).get(tag("fstype"), fstype or "")
        await self._attach(volume)
        if not volume.fstype:
            volume.fstype = await volume.get_fstype() or "raw"
            await m.ec2.create_tags([volume.volume_id], {tag("fstype"): volume.fstype})
        if volume.fstype != "raw":
            await self.mount(volume, where)
        return volume

    async def _plan_new_volume(
        self,
        name: str,
        size: int | None,
        fstype: str | None,
        snapshot_id: str | None,
        *,
        reuse: bool,
    ) -> _NewVolume:
        """What a new volume is made from (a snapshot or nothing), its size and fstype;
        checks that this server can mount (and make) that filesystem."""
        if snapshot_id is None and reuse:
            snaps = await our_snapshots(self.ctx, name)  # our own only
            snapshot_id = snaps[0]["SnapshotId"] if snaps else None
        if snapshot_id is None:
            fstype = fstype or "ext4"
            if fstype != "raw":
                await self._ensure_kernel_fs(fstype)
                await self._ensure_mkfs(fstype)
            return _NewVolume(size=size or 1, fstype=fstype, snapshot_id=None, grow_from=None)
        m = self.ctx  # UnknownSnapshot; a pending one is waited for (EC2 needs it done)
        snaps = [await m.ec2.wait_for_snapshot(snapshot_id, timeout=m.timeouts.snapshot)]
        snap_size = int(snaps[0]["VolumeSize"])
        if size is not None and size < snap_size:
            raise BadSize(f"size {size} GiB is smaller than snapshot {snapshot_id} ({snap_size})")
        grow_from = snap_size if size is not None and size > snap_size else None
        fstype = tags_of(snaps[0]).get(tag("fstype")) or fstype
        if fstype and fstype != "raw":
            await self._ensure_kernel_fs(fstype)
        return _NewVolume(
            size=size or snap_size, fstype=fstype, snapshot_id=snapshot_id, grow_from=grow_from
        )

    async def _make_volume(
        self, name: str, plan: _NewVolume, *, where: str | None, label: str | None, uuid: str | None
    ) -> VolumeRef:
        """Create the planned volume; attach, format (or grow) and mount it here.

        On any failure (or cancellation) the new volume is detached and deleted.
        """
        m = self.ctx
        tags = {tag("role"): "volume", tag("name"): name, "Name": name}
        tags |= creation_tags(m.account.local_key().name)
        if plan.fstype:
            tags[tag("fstype")] = plan.fstype
        if plan.fstype and plan.fstype != "raw":  # where it goes: the mount then tags nothing
            tags[tag("mtpt")] = where or self.server.default_mtpt(name)
        token = new_client_token()
        # made and registered as one step (cancellation waits): what fails below deletes it
        with anyio.CancelScope(shield=True):
            desc = await m.ec2.create_volume(
                availability_zone=self.server.availability_zone,
                size=plan.size,
                snapshot_id=plan.snapshot_id,
                tags=tags,
                client_token=token,
            )
            volume = m.registry.add_volume(desc, created=True)
        try:
            await m.ec2.wait_for_volume(
                volume.volume_id,
                lambda v: v.get("State") == "available",
                what=f"volume {name} ({volume.volume_id}) to be available",
                timeout=m.timeouts.volume,
                kind="created",
            )
            await self._attach(volume)
            await self._format_new_volume(volume, plan, where=where, label=label, uuid=uuid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _discard_volume(self.ctx, volume)
            self.attachments.free_slot(volume.volume_id)
            raise
        return volume

    async def _format_new_volume(
        self,
        volume: VolumeRef,
        plan: _NewVolume,
        *,
        where: str | None,
        label: str | None,
        uuid: str | None,
    ) -> None:
        """A new volume just attached here: make (or read) its filesystem, grow it, mount it."""
        assert volume.mtdev
        if plan.snapshot_id is None:
            volume.fstype = plan.fstype or "ext4"
            if volume.fstype != "raw":
                await _check_blank(self.server, volume)
                await self._format(volume, label, uuid)
        elif plan.fstype:
            volume.fstype = plan.fstype  # the snapshot's, tagged with the volume's creation
        else:
            volume.fstype = await volume.get_fstype() or "raw"
            await self.ctx.ec2.create_tags([volume.volume_id], {tag("fstype"): volume.fstype})
        grow = plan.grow_from is not None
        if grow and volume.fstype.startswith("ext"):
            await self._grow_unmounted(volume)
        if volume.fstype == "raw":
            return
        await self.mount(volume, where)
        if plan.snapshot_id is None and volume.fstype != "vfat":
            await self.server.run(
                "chown", f"{self.server.username}:", volume.mtpt or "", sudo=True, check=False
            )
        if grow and volume.fstype in ("xfs", "btrfs"):
            await self._grow(volume)

    async def _attach(self, volume: VolumeRef) -> None:
        """Attach an available volume here and find its device."""
        if volume.availability_zone != self.server.availability_zone:
            raise ZoneMismatch(
                f"volume {volume.name} is in {volume.availability_zone}, "
                f"server {self.server.name} in {self.server.availability_zone}"
            )
        await self.attachments.attach(volume)

    async def mount(self, volume: VolumeRef, mtpt: str | None = None) -> None:
        """Mount a volume here (attaching it first if needed) at mtpt or its last mount point."""
        if volume.server is not None and volume.server is not self.server:
            raise VolumeInUse(
                f"volume {volume.name} ({volume.volume_id}) is attached to {volume.server.name}"
            )
        if volume.fstype == "raw":
            raise BadFstype(f"volume {volume.name} is raw: it has no filesystem to mount")
        where = check_mount_point(mtpt or volume.mtpt or self.server.default_mtpt(volume))
        if not await self.server.ping():
            await self.server.start()
        if volume.server is None:
            await self._attach(volume)
        elif volume.mtdev is None:
            assert volume.ec2_device
            mtdev = await self.attachments.find_device(
                volume.volume_id, volume.ec2_device, timeout=self.ctx.timeouts.volume
            )
            volume._record_attach(self.server, volume.ec2_device, mtdev)
        assert volume.mtdev
        # where it leads and the mount table, in one command; the table again only when
        # an unmount changed it
        found = await self.server.scmd(*mounts.realpath_and_mounts_argv(where), sudo=True)
        real, table = mounts.parse_realpath_and_mounts(found)
        where = _checked_real(self.server, where, real)
        current = next((mp for dev, mp, _ in table if dev == volume.mtdev), None)
        if current == where:
            volume._record_mount(where)
            return
        if current is not None:
            await self.server.run("umount", "--", current, sudo=True)
            table = await self._mounts()
        if any(mp == where for _, mp, _ in table):
            raise MountPointRefused(f"{where} on {self.server.name} has another filesystem mounted")
        options = [self.ctx.storage.mount_options]
        if volume.fstype == "vfat":
            ids = (
                (await self.server.scmd("id", "-u")).strip(),
                (await self.server.scmd("id", "-g")).strip(),
            )
            options.append(f"uid={ids[0]},gid={ids[1]}")
        elif volume.fstype == "xfs":  # copies of one snapshot share a UUID
            options.append("nouuid")
        argv = ["mount", "-o", ",".join(o for o in options if o)]
        if volume.fstype:
            argv += ["-t", volume.fstype]
        argv = mounts.mkdir_and_mount_argv(where, [*argv, "--", volume.mtdev, where])
        await self.server.run(*argv, sudo=True)
        volume._record_mount(where)
        await self._tag_mount_point(volume, where)

    async def _tag_mount_point(self, volume: VolumeRef, where: str) -> None:
        """Tag the volume with its mount point, unless its description says so already
        (a remount, a kept volume): a call less, of a bucket that a fleet's calls share."""
        key = tag("mtpt")
        if tags_of(volume.volume).get(key) == where:
            return
        await self.ctx.ec2.create_tags([volume.volume_id], {key: where})
        tags = {**tags_of(volume.volume), key: where}
        volume._record_description({**volume.volume, "Tags": tag_list(tags)})

    async def remount(self, volume: VolumeRef) -> None:
        """Mount again a volume unmounted from this server, at its old mount point."""
        if volume.server is not self.server or volume.mtpt is None:
            raise VolumeError(f"volume {volume.name} was not mounted on {self.server.name}")
        await self.mount(volume, volume.mtpt)

    async def unmount(self, volume: VolumeRef) -> None:
        """Unmount a volume (it stays attached)."""
        if volume.server is not self.server:
            raise VolumeError(f"volume {volume.name} is not attached to {self.server.name}")
        if not volume.mounted or volume.mtdev is None:
            return
        if volume.mtpt is not None:  # where it was mounted, still there: one command
            argv = mounts.umount_argv(volume.mtdev, volume.mtpt)
            done = await self.server.run(*argv, sudo=True, check=False)
            if done.exit_status == 0:
                volume._record_unmount()
                return
            if done.exit_status != mounts.UNMOUNTED_ELSEWHERE:
                raise VolumeInUse(
                    f"cannot unmount {volume.name} from {self.server.name}: "
                    f"{str(done.stderr).strip() or f'exit status {done.exit_status}'}"
                )
        where = [mp for dev, mp, _ in await self._mounts() if dev == volume.mtdev]
        if where:  # its own mount point: `umount <device>` would take the latest mount
            target = volume.mtpt if volume.mtpt in where else where[0]
            try:
                await self.server.run("umount", "--", target, sudo=True)
            except CommandFailed as e:
                raise VolumeInUse(
                    f"cannot unmount {volume.name} from {self.server.name}: {e}"
                ) from e
        volume._record_unmount()

    async def detach(self, volume: VolumeRef) -> None:
        """Unmount and detach a volume, waiting until EC2 says it is detached (see
        :meth:`Attachments.detach <asyncstage.attachments.Attachments.detach>`)."""
        if volume.server is not self.server:
            raise VolumeError(f"volume {volume.name} is not attached to {self.server.name}")
        if self.server.state == "running":
            await self.unmount(volume)
        await self.attachments.detach(volume)

    async def adopt_mounts(self, volumes: list[VolumeRef]) -> None:
        """Find where the volumes attached here are, and whether they are mounted: asked
        of the server (device numbers), never taken from tags."""
        for volume in volumes:
            assert volume.ec2_device
            mtdev = await self.attachments.find_device(
                volume.volume_id, volume.ec2_device, timeout=5.0
            )
            volume._record_attach(self.server, volume.ec2_device, mtdev)
            await _probe_mounts(self.server, volume, mtdev)
