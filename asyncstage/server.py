"""Server: an EC2 instance with ssh access, its lifecycle, commands and volumes."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

import anyio

from asyncstage import transfer
from asyncstage.ec2 import EC2, Resource, console_fingerprints, tag, tags_of
from asyncstage.errors import (
    AsyncstageError,
    BadFstype,
    BadSize,
    CommandFailed,
    HostKeyMismatch,
    MountPointRefused,
    NameTaken,
    ServerNotRunning,
    ServerUnreachable,
    SSHError,
    UnknownSnapshot,
    UnknownVolume,
    VolumeError,
    VolumeInUse,
    WaitTimeout,
    ZoneMismatch,
)
from asyncstage.ssh import Command, CommandResult, SSHHost
from asyncstage.transfer import DdOptions, RsyncOptions, TransferStats

if TYPE_CHECKING:
    from asyncstage.manager import Manager
    from asyncstage.paths import PathLike
    from asyncstage.ssh import CommandReader, CommandWriter
    from asyncstage.volume import Volume

__all__ = [
    "FSTYPES",
    "REFUSED_MOUNT_POINTS",
    "Server",
    "check_mount_point",
    "mkfs_argv",
    "parse_mounts",
]

log = logging.getLogger("asyncstage")

FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "raw")
"""The filesystem types provision_volume can make (``raw``: attached, not formatted)."""

REFUSED_MOUNT_POINTS = (
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/proc",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
)
"""Mount points refused, with ``/lib*`` and everything below ``/dev``, ``/proc`` and ``/sys``."""

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


def check_mount_point(mtpt: str) -> str:
    """The normalised absolute mount point, or MountPointRefused for essential system paths."""
    if not mtpt.startswith("/"):
        raise MountPointRefused(f"mount point {mtpt!r} is not an absolute path")
    norm = posixpath.normpath(mtpt)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if (
        norm in REFUSED_MOUNT_POINTS
        or re.fullmatch(r"/lib[^/]*", norm)
        or norm.startswith(("/dev/", "/proc/", "/sys/"))
    ):
        raise MountPointRefused(f"refusing to mount a volume over {norm}: an essential system path")
    return norm


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


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal; backslash last
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(device, mount point, fstype) of each line of /proc/mounts, mount points unescaped."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            found.append((parts[0], _unescape_mount_field(parts[1]), parts[2]))
    return found


@dataclass(frozen=True)
class _NewVolume:
    """What provision_volume makes a new volume from, and how."""

    size: int
    fstype: str | None
    snapshot_id: str | None
    grow_from: int | None  # the snapshot's smaller size: grow the filesystem


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


class Server:
    """An EC2 instance of a Manager, reached over ssh (``str(server)`` is its instance id).

    Made by :meth:`Manager.provision_server` / :meth:`Manager.get_server`, not directly.
    """

    INTERNAL_METHODS = (
        "adopt_mounts",
        "expect_new_host_key",
        "record_description",
        "record_stop",
        "record_termination",
        "wait_ssh",
    )
    """Methods without an underscore that only the Manager's parts call (they report what
    EC2 did, so that the server changes its own state); not for users, no blocking twins."""

    def __init__(
        self,
        manager: Manager,
        instance: Resource,
        *,
        keyfile: Path | None,
        username: str,
    ) -> None:
        self.manager = manager
        self.instance: Resource = instance
        """The latest EC2 description of the instance (a DescribeInstances item)."""
        self.instance_id: str = str(instance["InstanceId"])
        self.keyfile = keyfile
        self.username = username
        self._host: SSHHost | None = None
        self._expected_fingerprints: tuple[str, ...] = ()
        self._fresh = False  # launched by this manager: no known_hosts entry to trust yet
        self._pinned_for: str | None = None  # the address whose host key was settled
        self._up = False
        self._attach_lock = anyio.Lock()
        self._kernel_fs: set[str] = set()

    # -- info ---------------------------------------------------------------------

    def __str__(self) -> str:
        return self.instance_id

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.instance_id} {self.state} {self.address or '-'}>"

    @property
    def tags(self) -> dict[str, str]:
        """The instance's tags."""
        return tags_of(self.instance)

    @property
    def name(self) -> str:
        """The symbolic name (tag ``asyncstage:name``), else the instance id."""
        return self.tags.get(tag("name")) or self.instance_id

    @property
    def state(self) -> str:
        """The last known EC2 state: pending, running, stopping, stopped ..."""
        return str(self.instance.get("State", {}).get("Name", "unknown"))

    @property
    def availability_zone(self) -> str:
        """The instance's availability zone."""
        return str(self.instance.get("Placement", {}).get("AvailabilityZone", ""))

    @property
    def address(self) -> str | None:
        """The address ssh connects to: public IP, else private IP (None when stopped)."""
        addr = self.instance.get("PublicIpAddress") or self.instance.get("PrivateIpAddress")
        return str(addr) if addr else None

    @property
    def endpoint(self) -> str | None:
        """Alias of :attr:`address`."""
        return self.address

    @property
    def ec2(self) -> EC2:
        """The manager's :class:`asyncstage.ec2.EC2` client."""
        return self.manager.ec2

    @property
    def host(self) -> SSHHost:
        """The ssh connection to the server (made on first use, per address)."""
        address = self.address
        if address is None:
            raise ServerNotRunning(
                f"server {self.name} ({self.instance_id}) has no address: it is {self.state}"
            )
        if self._host is None or self._host.address != address:
            self._host = SSHHost(
                address,
                username=self.username,
                client_keys=[self.keyfile] if self.keyfile else [],
                known_hosts=self.manager.known_hosts.path,
                host_key_policy="accept-new",
                expected_fingerprints=self._expected_fingerprints,
                label=f"{self.name} ({self.instance_id})",
            )
            # the manager closes every connection it ever made on exit, this one too
            self.manager.registry.track_host(self._host)
        return self._host

    async def refresh(self) -> Resource:
        """Fetch the instance's description again (sharing a round with other callers)."""
        found = await self.manager.ec2.describe_instances_shared([self.instance_id])
        if self.instance_id in found:
            self.record_description(found[self.instance_id])
        return self.instance

    def volumes(self) -> list[Volume]:
        """The managed volumes attached to this server (the root volume is not one)."""
        return [v for v in self.manager.volumes() if v.server is self]

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self, timeout: float = 10.0) -> bool:
        """True when the instance is running AND ssh answers with our key (cached)."""
        if not self._up:
            await self.refresh()
            if self.state != "running":
                return False
            await self._pin_host_key()
        self._up = await self.host.ping(timeout=timeout)
        return self._up

    async def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until ping() succeeds."""
        await self.manager.fleet.start([self], timeout=timeout, single=True)

    async def stop(self, timeout: float = 300.0) -> None:
        """Stop the server and wait until it is stopped."""
        await self.manager.fleet.stop([self], timeout=timeout, single=True)

    async def terminate(self, timeout: float = 300.0) -> None:
        """Terminate the server, wait until it is, and unregister it (and its host key)."""
        await self.manager.fleet.terminate([self], timeout=timeout, single=True)

    # -- commands -------------------------------------------------------------------------

    async def run(
        self,
        *cmd: Command,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        encoding: str | None = "utf-8",
        sudo: bool = False,
    ) -> CommandResult:
        """Run a command; the full result (exit status, stdout, stderr)."""
        return await (await self._ready()).run(
            *cmd, input=input, check=check, timeout=timeout, encoding=encoding, sudo=sudo
        )

    async def scmd(
        self,
        *cmd: Command,
        check: bool = True,
        timeout: float | None = None,
        input: str | bytes | None = None,
        sudo: bool = False,
    ) -> str:
        """Run a command and return its standard output, like backticks."""
        return await (await self._ready()).scmd(
            *cmd, check=check, timeout=timeout, input=input, sudo=sudo
        )

    async def ssh(
        self,
        *cmd: Command,
        timeout: float | None = None,
        sudo: bool = False,
    ) -> bool:
        """Run a command with its output on our stdout/stderr; true on success."""
        return await (await self._ready()).ssh(*cmd, timeout=timeout, sudo=sudo)

    def scmd_read(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandReader[Any]]:
        """``async with server.scmd_read(...) as r``: a readable stream of its stdout."""
        return self._streaming("read", cmd, encoding, sudo)

    def scmd_write(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandWriter[Any]]:
        """``async with server.scmd_write(...) as w``: a writable stream to its stdin."""
        return self._streaming("write", cmd, encoding, sudo)

    async def _ready(self) -> SSHHost:
        """The ssh host, its host key expectations settled for the current address."""
        await self._pin_host_key()
        return self.host

    @asynccontextmanager
    async def _streaming(
        self, way: str, cmd: tuple[Command, ...], encoding: str | None, sudo: bool
    ) -> AsyncIterator[Any]:
        host = await self._ready()
        opened = host.scmd_read if way == "read" else host.scmd_write
        async with opened(*cmd, encoding=encoding, sudo=sudo) as stream:
            yield stream

    async def shell(self) -> int:
        """An interactive shell on the server; its exit status."""
        return await (await self._ready()).shell()

    # -- volumes: helpers ---------------------------------------------------------------------

    def default_mtpt(self, volume: Volume | str) -> str:
        """The default mount point of a volume: ``/mnt/Staging/<name>``."""
        name = volume if isinstance(volume, str) else volume.name
        return f"/mnt/Staging/{name}"

    def volume_description(self, volume: Volume | str) -> str:
        """The description given to a staging volume's snapshots."""
        name = volume if isinstance(volume, str) else volume.name
        return f"Staging volume for {name} created by asyncstage"

    async def _dev_listing(self) -> tuple[set[str], set[str]]:
        result = await self.run("ls", "-1", "/dev", "/dev/disk/by-id", check=False)
        section = ""
        dev: set[str] = set()
        by_id: set[str] = set()
        for line in str(result.stdout).splitlines():
            if line.endswith(":") and line.startswith("/dev"):
                section = line[:-1]
            elif line:
                (by_id if section == "/dev/disk/by-id" else dev).add(line)
        return dev, by_id

    async def unused_block_device(self, major_start: str = "f") -> tuple[str, str]:
        """A free device name: (EC2 name ``/dev/sdX``, the name the kernel may give it)."""
        await self.refresh()
        used = {
            str(m.get("DeviceName", "")).rsplit("/", 1)[-1]
            for m in self.instance.get("BlockDeviceMappings", [])
        }
        used |= {str(v.ec2_device).rsplit("/", 1)[-1] for v in self.volumes() if v.ec2_device}
        dev, _ = await self._dev_listing()
        for letter in "fghijklmnop":
            if letter < major_start:
                continue
            names = {f"sd{letter}", f"xvd{letter}"}
            if names & used or names & dev:
                continue
            return f"/dev/sd{letter}", f"/dev/xvd{letter}"
        raise VolumeError(f"server {self.name}: no free block device name left")

    async def _find_device(self, volume_id: str, ec2_device: str, *, timeout: float) -> str:
        """The device path of an attached volume on the server: NVMe serial, xvdX, sdX."""
        serial = volume_id.replace("-", "")
        letter = ec2_device.rsplit("/", 1)[-1].removeprefix("xvd").removeprefix("sd")
        interval = 0.1
        with anyio.move_on_after(timeout):
            while True:
                dev, by_id = await self._dev_listing()
                hits = sorted(n for n in by_id if serial in n and "-part" not in n)
                if hits:
                    real = await self.scmd("readlink", "-f", f"/dev/disk/by-id/{hits[0]}")
                    return real.strip()
                for name in (f"xvd{letter}", f"sd{letter}"):
                    if name in dev:
                        return f"/dev/{name}"
                await anyio.sleep(interval)
                interval = min(interval * 2, 2.0)
        raise WaitTimeout(
            f"volume {volume_id} to appear as a block device on {self.name}",
            timeout=timeout,
            last_state="no device",
        )

    async def _has_program(self, program: str) -> bool:
        result = await self.run("which", program, check=False, sudo=True)
        return result.exit_status == 0

    async def _ensure_kernel_fs(self, fstype: str) -> None:
        """BadFstype unless the server's kernel can mount fstype (loading its module if need be)."""
        if fstype in self._kernel_fs:
            return
        for attempt in range(2):
            text = await self.scmd("cat", "/proc/filesystems")
            self._kernel_fs = {line.split()[-1] for line in text.splitlines() if line.split()}
            if fstype in self._kernel_fs:
                return
            if attempt == 0:
                await self.run("modprobe", fstype, sudo=True, check=False)
        raise BadFstype(f"the kernel of server {self.name} cannot mount {fstype} filesystems")

    async def _ensure_mkfs(self, fstype: str) -> None:
        program = f"mkfs.{fstype}"
        if await self._has_program(program):
            return
        if self.manager.install_packages and await self._has_program("apt-get"):
            await self.run(
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
                return
        raise BadFstype(f"server {self.name} cannot make {fstype} filesystems ({program} missing)")

    async def _grow_unmounted(self, volume: Volume) -> None:
        """Grow an ext2/3/4 filesystem to fill its device, offline (checked first)."""
        assert volume.mtdev
        check = await self.run("e2fsck", "-f", "-p", volume.mtdev, sudo=True, check=False)
        if check.exit_status not in (0, 1):  # 1: errors corrected
            await self.run("e2fsck", "-f", "-p", volume.mtdev, sudo=True)
        await self.run("resize2fs", volume.mtdev, sudo=True, timeout=600)

    async def _grow(self, volume: Volume) -> None:
        """Grow a mounted xfs or btrfs filesystem to fill its device."""
        assert volume.mtdev and volume.mtpt
        if volume.fstype == "xfs":
            await self.run("xfs_growfs", volume.mtpt, sudo=True, timeout=600)
        elif volume.fstype == "btrfs":
            await self.run("btrfs", "filesystem", "resize", "max", volume.mtpt, sudo=True)

    async def _mounts(self) -> list[tuple[str, str, str]]:
        """(device, mount point, fstype) of every mount, from /proc/mounts."""
        return parse_mounts(await self.scmd("cat", "/proc/mounts"))

    async def _mounted_at(self, device: str) -> str | None:
        for dev, mtpt, _ in await self._mounts():
            if dev == device:
                return mtpt
        return None

    # -- volumes: public ------------------------------------------------------------------

    async def provision_volume(
        self,
        name: str | None = None,
        *,
        size: int | None = None,
        fstype: str | None = None,
        mtpt: str | None = None,
        mount: str | None = None,
        volume_id: str | None = None,
        snapshot_id: str | None = None,
        reuse: bool | None = None,
        label: str | None = None,
        uuid: str | None = None,
        availability_zone: str | None = None,
    ) -> Volume:
        """Make (or reuse) a volume, attach it here, format it and mount it.

        ``size`` in GiB (default 1, or the snapshot's size); ``fstype`` ext4 by
        default (``raw``: attached but not formatted or mounted); ``mtpt``/``mount``
        default ``/mnt/Staging/<name>``. ``volume_id`` attaches an existing volume,
        ``snapshot_id`` makes it from a snapshot; with a name and ``reuse`` (default:
        the manager's ``reuse_volumes``) an existing volume of that name is used, else
        the newest snapshot of that name. A volume made larger than its snapshot has
        its filesystem grown. Volumes from a volume or snapshot are never reformatted.
        """
        m = self.manager
        size = _check_size(size)
        fstype = _check_fstype(fstype)
        if availability_zone and availability_zone != self.availability_zone:
            raise ZoneMismatch(
                f"server {self.name} is in {self.availability_zone}, not {availability_zone}"
            )
        name = name or m.new_volume_name()
        where = mtpt or mount
        where = check_mount_point(where) if where else None
        reuse = m.reuse_volumes if reuse is None else reuse
        if fstype and label and len(label) > _LABEL_MAX.get(fstype, 255):
            raise BadFstype(f"label {label!r} too long for {fstype}")
        if volume_id is None:
            existing = m.find_volume_by_name(name)
            if existing is not None:
                return await self._reuse_volume(existing, reuse=reuse, where=where)
            plan = await self._plan_new_volume(name, size, fstype, snapshot_id, reuse=reuse)
            return await self._make_volume(name, plan, where=where, label=label, uuid=uuid)
        return await self._adopt_volume_id(volume_id, name, fstype, where)

    add_volume = provision_volume

    async def _reuse_volume(self, existing: Volume, *, reuse: bool, where: str | None) -> Volume:
        """provision_volume of a name in use: that volume, attached and mounted here."""
        name = existing.name
        if not reuse:
            raise NameTaken(f"a volume named {name!r} exists already ({existing.volume_id})")
        if existing.server is not None and existing.server is not self:
            raise VolumeInUse(
                f"volume {name} ({existing.volume_id}) is attached to {existing.server.name}"
            )
        if existing.availability_zone != self.availability_zone:
            raise ZoneMismatch(
                f"volume {name} is in {existing.availability_zone}, "
                f"server {self.name} in {self.availability_zone}"
            )
        if not existing.mounted and existing.fstype != "raw":
            await self.mount_volume(existing, where)
        elif existing.server is None:
            await self._attach(existing)
        return existing

    async def _adopt_volume_id(
        self, volume_id: str, name: str, fstype: str | None, where: str | None
    ) -> Volume:
        """provision_volume(volume_id=...): name an existing available volume, attach it here."""
        m = self.manager
        found = await m.ec2.describe_volumes([volume_id])
        if not found:
            raise UnknownVolume(f"volume {volume_id} does not exist")
        desc = found[0]
        if desc["AvailabilityZone"] != self.availability_zone:
            raise ZoneMismatch(
                f"volume {volume_id} is in {desc['AvailabilityZone']}, "
                f"server {self.name} in {self.availability_zone}"
            )
        if desc.get("State") != "available":
            raise VolumeInUse(f"volume {volume_id} is {desc.get('State')}, not available")
        tags = {tag("role"): "volume", tag("name"): name, "Name": name}
        await m.ec2.create_tags([volume_id], tags)
        desc.setdefault("Tags", []).extend({"Key": k, "Value": v} for k, v in tags.items())
        volume = m.registry.add_volume(desc)
        volume.fstype = tags_of(desc).get(tag("fstype"), fstype or "")
        await self._attach(volume)
        if not volume.fstype:
            volume.fstype = await volume.get_fstype() or "raw"
            await m.ec2.create_tags([volume.volume_id], {tag("fstype"): volume.fstype})
        if volume.fstype != "raw":
            await self.mount_volume(volume, where)
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
            snaps = await self.manager.snapshots(name)
            snapshot_id = snaps[0]["SnapshotId"] if snaps else None
        if snapshot_id is None:
            fstype = fstype or "ext4"
            if fstype != "raw":
                await self._ensure_kernel_fs(fstype)
                await self._ensure_mkfs(fstype)
            return _NewVolume(size=size or 1, fstype=fstype, snapshot_id=None, grow_from=None)
        snaps = await self.manager.ec2.describe_snapshots([snapshot_id])
        if not snaps:
            raise UnknownSnapshot(f"snapshot {snapshot_id} does not exist")
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
    ) -> Volume:
        """Create the planned volume; attach, format (or grow) and mount it here.

        On any failure (or cancellation) the new volume is detached and deleted.
        """
        m = self.manager
        tags = {tag("role"): "volume", tag("name"): name, "Name": name}
        if plan.fstype:
            tags[tag("fstype")] = plan.fstype
        desc = await m.ec2.create_volume(
            availability_zone=self.availability_zone,
            size=plan.size,
            snapshot_id=plan.snapshot_id,
            tags=tags,
        )
        volume = m.registry.add_volume(desc, created=True)
        try:
            await m.ec2.wait_for_volume(
                volume.volume_id,
                lambda v: v.get("State") == "available",
                what=f"volume {name} ({volume.volume_id}) to be available",
                timeout=m.timeouts.volume,
            )
            await self._attach(volume)
            await self._format_new_volume(volume, plan, where=where, label=label, uuid=uuid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._discard_volume(volume)
            raise
        return volume

    async def _format_new_volume(
        self,
        volume: Volume,
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
                await self.run(
                    *mkfs_argv(volume.fstype, label, uuid), volume.mtdev, sudo=True, timeout=600
                )
        else:
            volume.fstype = plan.fstype or await volume.get_fstype() or "raw"
            await self.manager.ec2.create_tags([volume.volume_id], {tag("fstype"): volume.fstype})
        grow = plan.grow_from is not None
        if grow and volume.fstype.startswith("ext"):
            await self._grow_unmounted(volume)
        if volume.fstype == "raw":
            return
        await self.mount_volume(volume, where)
        if plan.snapshot_id is None and volume.fstype != "vfat":
            await self.run("chown", f"{self.username}:", volume.mtpt or "", sudo=True, check=False)
        if grow and volume.fstype in ("xfs", "btrfs"):
            await self._grow(volume)

    async def _discard_volume(self, volume: Volume) -> None:
        """Best effort: detach and delete a volume whose provisioning failed."""
        m = self.manager
        try:
            if volume.server is not None:
                if volume.mtdev is not None and volume.server.state == "running":
                    await volume.server.run("umount", volume.mtdev, sudo=True, check=False)
                await m.ec2.detach_volume(volume.volume_id, force=True)
                await m.ec2.wait_for_volume(
                    volume.volume_id,
                    lambda v: v.get("State") == "available",
                    what=f"volume {volume.volume_id} to detach",
                    timeout=m.timeouts.volume,
                )
            await m.ec2.delete_volume(volume.volume_id)
        except AsyncstageError as e:
            log.warning("could not delete volume %s: %s", volume.volume_id, e)
        m.registry.forget_volume(volume)

    async def _attach(self, volume: Volume) -> None:
        """Attach an available volume here and find its device."""
        m = self.manager
        if volume.availability_zone != self.availability_zone:
            raise ZoneMismatch(
                f"volume {volume.name} is in {volume.availability_zone}, "
                f"server {self.name} in {self.availability_zone}"
            )
        async with self._attach_lock:
            ec2_device, _ = await self.unused_block_device()
            await m.ec2.attach_volume(volume.volume_id, self.instance_id, ec2_device)
            volume.record_attach(self, ec2_device, None)
            desc = await m.ec2.wait_for_volume(
                volume.volume_id,
                lambda v: any(
                    a.get("State") == "attached" and a.get("InstanceId") == self.instance_id
                    for a in v.get("Attachments", [])
                ),
                what=f"volume {volume.name} ({volume.volume_id}) to attach to {self.name}",
                timeout=m.timeouts.volume,
            )
            volume.record_description(desc)
            mtdev = await self._find_device(volume.volume_id, ec2_device, timeout=m.timeouts.volume)
            volume.record_attach(self, ec2_device, mtdev)

    async def mount_volume(self, volume: Volume, mtpt: str | None = None) -> None:
        """Mount a volume here (attaching it first if needed) at mtpt or its last mount point."""
        if volume.server is not None and volume.server is not self:
            raise VolumeInUse(
                f"volume {volume.name} ({volume.volume_id}) is attached to {volume.server.name}"
            )
        if volume.fstype == "raw":
            raise BadFstype(f"volume {volume.name} is raw: it has no filesystem to mount")
        where = check_mount_point(mtpt or volume.mtpt or self.default_mtpt(volume))
        if not await self.ping():
            await self.start()
        if volume.server is None:
            await self._attach(volume)
        elif volume.mtdev is None:
            assert volume.ec2_device
            mtdev = await self._find_device(
                volume.volume_id, volume.ec2_device, timeout=self.manager.timeouts.volume
            )
            volume.record_attach(self, volume.ec2_device, mtdev)
        assert volume.mtdev
        current = await self._mounted_at(volume.mtdev)
        if current == where:
            volume.record_mount(where)
            return
        if current is not None:
            await self.run("umount", volume.mtdev, sudo=True)
        if any(mp == where for _, mp, _ in await self._mounts()):
            raise MountPointRefused(f"{where} on {self.name} has another filesystem mounted")
        await self.run("mkdir", "-p", where, sudo=True)
        argv = ["mount"]
        if volume.fstype == "vfat":
            ids = (await self.scmd("id", "-u")).strip(), (await self.scmd("id", "-g")).strip()
            argv += ["-o", f"uid={ids[0]},gid={ids[1]}"]
        elif volume.fstype == "xfs":  # copies of one snapshot share a UUID
            argv += ["-o", "nouuid"]
        if volume.fstype:
            argv += ["-t", volume.fstype]
        await self.run(*argv, volume.mtdev, where, sudo=True)
        volume.record_mount(where)
        await self.manager.ec2.create_tags([volume.volume_id], {tag("mtpt"): where})

    async def remount_volume(self, volume: Volume) -> None:
        """Mount again a volume unmounted from this server, at its old mount point."""
        if volume.server is not self or volume.mtpt is None:
            raise VolumeError(f"volume {volume.name} was not mounted on {self.name}")
        await self.mount_volume(volume, volume.mtpt)

    async def unmount_volume(self, volume: Volume) -> None:
        """Unmount a volume (it stays attached)."""
        if volume.server is not self:
            raise VolumeError(f"volume {volume.name} is not attached to {self.name}")
        if not volume.mounted or volume.mtdev is None:
            return
        if await self._mounted_at(volume.mtdev) is not None:
            try:
                await self.run("umount", volume.mtdev, sudo=True)
            except CommandFailed as e:
                raise VolumeInUse(f"cannot unmount {volume.name} from {self.name}: {e}") from e
        volume.record_unmount()

    async def detach_volume(self, volume: Volume) -> None:
        """Unmount and detach a volume, waiting until EC2 says it is detached."""
        if volume.server is not self:
            raise VolumeError(f"volume {volume.name} is not attached to {self.name}")
        if self.state == "running":
            await self.unmount_volume(volume)
        m = self.manager
        await m.ec2.detach_volume(volume.volume_id)
        desc = await m.ec2.wait_for_volume(
            volume.volume_id,
            lambda v: v.get("State") == "available",
            what=f"volume {volume.name} ({volume.volume_id}) to detach from {self.name}",
            timeout=m.timeouts.volume,
        )
        volume.record_description(desc)
        volume.record_detach()

    async def delete_volume(self, volume: Volume) -> None:
        """Unmount, detach and delete a volume."""
        if volume.server is self:
            await self.detach_volume(volume)
        await volume.delete()

    async def create_snapshot(self, volume: Volume, description: str = "") -> str:
        """Snapshot a volume cleanly (unmounted, or frozen if busy, then mounted again)."""
        return await volume.create_snapshot(description)

    # -- transfers (the work is done in asyncstage.transfer) --------------------------------

    async def rsync(self, *paths: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync between any path forms (the last path is the destination); see Manager.rsync."""
        return await transfer.rsync(self.manager, *paths, **options)

    async def put(self, *paths: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync sources (local, or any path form) to ``dest`` (the last path) on this server.

        A plain ``dest`` is a path on this server; a volume path goes into the volume.
        """
        return await transfer.server_put(self, *paths, **options)

    async def get(self, *paths: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync sources on this server (plain paths) or volumes to ``dest`` (the last path)."""
        return await transfer.server_get(self, *paths, **options)

    async def dd(
        self, source: Volume | str, dest: Volume | str, **options: Unpack[DdOptions]
    ) -> TransferStats:
        """Block-copy volume ``source`` onto volume ``dest``; see Manager.dd."""
        return await transfer.dd(self.manager, source, dest, **options)

    # -- state changes: called by the Manager's fleet, not by users ----------------------------
    # The server's fields change only here; the fleet reports what EC2 did.

    def record_description(self, instance: Resource) -> None:
        """Internal: keep a fresh EC2 description of the instance."""
        self.instance = instance
        if self.state != "running":
            self._up = False

    def expect_new_host_key(self) -> None:
        """Internal: launched, or given a new address: no known_hosts entry to trust yet."""
        self._fresh = True

    def record_stop(self) -> None:
        """Internal: asked to stop; its mounted volumes are mounted again on the next start."""
        self._up = False
        for volume in self.volumes():
            volume.record_unmount(server_stopped=True)
        self._host = None  # its address goes away (the manager closes the connection)

    def record_termination(self) -> None:
        """Internal: terminated: its volumes are detached and its host key forgotten."""
        for volume in self.volumes():
            volume.record_detach()
        self._host = None
        if self.address:
            self.manager.known_hosts.remove(self.address, 22)
        self.instance.setdefault("State", {})["Name"] = "terminated"
        self._up = False

    async def adopt_mounts(self, volumes: list[Volume]) -> None:
        """Internal: find where the volumes attached here are, and whether they are mounted."""
        mounts = await self._mounts()
        for volume in volumes:
            assert volume.ec2_device
            mtdev = await self._find_device(volume.volume_id, volume.ec2_device, timeout=5.0)
            volume.record_attach(self, volume.ec2_device, mtdev)
            where = [mp for dev, mp, _ in mounts if dev == mtdev]
            if where:
                volume.record_mount(where[0])
            else:
                volume.record_unmount()

    async def _pin_host_key(self) -> None:
        """Before the first contact at an address: expected fingerprints from the console.

        A server this manager launched (or whose address changed) has no trustworthy
        known_hosts entry yet: any old entry for its address is dropped. When the
        console carries host key fingerprints they are what the key must match;
        otherwise the key is pinned on first contact.
        """
        address = self.address
        if not address or self._pinned_for == address:
            return
        known = self.manager.known_hosts
        if self._fresh:
            known.remove(address, 22)
        if self._fresh or not known.lookup(address, 22):
            try:
                console = await self.manager.ec2.console_output(self.instance_id)
            except AsyncstageError:  # no console: pin on first contact
                console = ""
            self._expected_fingerprints = tuple(console_fingerprints(console))
            self._host = None  # the next one expects these fingerprints
        self._fresh = False
        self._pinned_for = address

    async def wait_ssh(self, deadline: float) -> None:
        """Internal: try ssh until it answers or the deadline passes (ServerUnreachable then).

        A host key that does not match fails at once with HostKeyMismatch.
        """
        await self._pin_host_key()
        interval = 0.2
        while True:
            left = deadline - anyio.current_time()
            limit = max(2.0, min(10.0, left))
            try:
                with anyio.fail_after(limit):
                    await self.host.run("true", timeout=limit)
            except HostKeyMismatch:
                raise
            except (SSHError, TimeoutError) as e:
                failure: BaseException = e
            else:
                self._up = True
                return
            left = deadline - anyio.current_time()
            if left <= 0:
                raise ServerUnreachable(
                    f"never answered ssh ({failure})", host=f"{self.name} ({self.instance_id})"
                ) from failure
            self.host.reset()
            await anyio.sleep(min(interval, left))
            interval = min(interval * 1.5, 5.0)
