"""Volume: an EBS volume with a name, a filesystem and maybe a mount on a server."""

from __future__ import annotations

import os
import posixpath
import time
from typing import TYPE_CHECKING, Unpack

import anyio

from asyncstage import mounts, transfer
from asyncstage.adoption import creation_tags
from asyncstage.ec2 import Resource, tag, tags_of
from asyncstage.errors import (
    BadFstype,
    ConnectError,
    ConnectionLost,
    ServerNotRunning,
    VolumeError,
    VolumeInUse,
    VolumeNotMounted,
)
from asyncstage.paths import RemotePath
from asyncstage.transfer import DdOptions, RsyncOptions, TransferStats

if TYPE_CHECKING:
    from asyncstage.context import ManagerRef
    from asyncstage.paths import PathLike
    from asyncstage.refs import ServerRef
    from asyncstage.ssh import Command

__all__ = ["Volume"]


class Volume:
    """A managed EBS volume (``str(volume)`` is its volume id).

    Made by :meth:`Server.provision_volume` / :meth:`Manager.provision_volume`.
    ``server`` is the server it is attached to (or None), ``mtdev`` its device
    path there, ``mtpt`` its mount point and ``mounted`` whether it is mounted now.
    """

    def __init__(self, manager: ManagerRef, volume: Resource) -> None:
        self.manager = manager
        self._ctx = manager.context
        self.volume: Resource = volume
        """The latest EC2 description of the volume (a DescribeVolumes item)."""
        self.volume_id: str = str(volume["VolumeId"])
        tags = tags_of(volume)
        self._fstype: str = tags.get(tag("fstype"), "")
        self._mtpt: str | None = tags.get(tag("mtpt")) or None
        self._server: ServerRef | None = None
        self._mtdev: str | None = None
        self._ec2_device: str | None = None
        self._mounted = False
        self._remount = False  # mounted when its server stopped: mount again on start

    def __str__(self) -> str:
        return self.volume_id

    def __repr__(self) -> str:
        where = f" on {self.server.name}:{self.mtpt}" if self.server and self.mounted else ""
        return f"<Volume {self.name} {self.volume_id} {self.size}GiB {self.fstype}{where}>"

    @property
    def name(self) -> str:
        """The symbolic name (tag ``asyncstage:name``), else the volume id."""
        return tags_of(self.volume).get(tag("name")) or self.volume_id

    @property
    def size(self) -> int:
        """Size in GiB."""
        return int(self.volume.get("Size", 0))

    @property
    def availability_zone(self) -> str:
        """The volume's availability zone."""
        return str(self.volume.get("AvailabilityZone", ""))

    @property
    def fstype(self) -> str:
        """The filesystem type (``raw``: none); set it when a block copy changed it."""
        return self._fstype

    @fstype.setter
    def fstype(self, fstype: str) -> None:
        self._fstype = fstype

    @property
    def server(self) -> ServerRef | None:
        """The server it is attached to, or None."""
        return self._server

    @property
    def mtdev(self) -> str | None:
        """Its device path on the server (``/dev/nvme1n1``, ``/dev/xvdf`` ...)."""
        return self._mtdev

    @property
    def ec2_device(self) -> str | None:
        """The EC2 device name it is attached under (``/dev/sdf``)."""
        return self._ec2_device

    @property
    def mtpt(self) -> str | None:
        """Its mount point (the last one when unmounted)."""
        return self._mtpt

    @property
    def mounted(self) -> bool:
        """Whether it is mounted now."""
        return self._mounted

    # -- state changes: called by its Server and the Manager's fleet, not by users ------------
    # The volume's attachment fields change only here; the callers report what they did.

    def _record_description(self, volume: Resource) -> None:
        """Keep a fresh EC2 description of the volume."""
        self.volume = volume

    def _record_attach(self, server: ServerRef, ec2_device: str, mtdev: str | None) -> None:
        """Attached to ``server`` as ``ec2_device``, seen there as ``mtdev``."""
        self._server, self._ec2_device, self._mtdev = server, ec2_device, mtdev

    def _record_mount(self, mtpt: str) -> None:
        """Mounted at ``mtpt`` on its server."""
        self._mtpt, self._mounted, self._remount = mtpt, True, False

    def _record_unmount(self, *, server_stopped: bool = False) -> None:
        """Not mounted any more; ``server_stopped``: mount it again when it starts."""
        if server_stopped:
            self._remount = self._remount or self._mounted
        self._mounted = False

    def _record_detach(self) -> None:
        """Detached from its server (or its server went away)."""
        self._server, self._mtdev, self._ec2_device = None, None, None
        self._mounted = self._remount = False

    def _prepare_remount(self) -> bool:
        """Whether its server stopped while it was mounted; if so its device
        path is forgotten (it may differ after the start) before it is mounted again."""
        if self._remount:
            self._mtdev = None
        return self._remount

    def fstab_line(self) -> str:
        """An /etc/fstab line that mounts the volume where it is mounted now."""
        if self.mtdev is None or self.mtpt is None:
            raise VolumeNotMounted(f"volume {self.name} has no device or mount point")
        options = ",".join(o for o in (self._ctx.storage.mount_options, "nofail") if o)
        return f"{self.mtdev}\t{self.mtpt}\t{self.fstype or 'auto'}\t{options}\t0\t2"

    def _need_server(self) -> ServerRef:
        if self.server is None:
            raise VolumeError(f"volume {self.name} ({self.volume_id}) is not attached")
        return self.server

    async def get_fstype(self) -> str:
        """The filesystem type on the device, as blkid reads it ('' when none)."""
        server = self._need_server()
        assert self.mtdev
        result = await server.run(
            "blkid", "-o", "value", "-s", "TYPE", self.mtdev, sudo=True, check=False
        )
        return str(result.stdout).strip()

    async def refresh(self) -> Resource:
        """Fetch the volume's description again."""
        found = await self._ctx.ec2.describe_volumes([self.volume_id])
        if found:
            self._record_description(found[0])
        return self.volume

    # -- lifecycle ---------------------------------------------------------------------

    async def mount(self, server: ServerRef | None = None, mtpt: str | None = None) -> None:
        """Mount the volume: on its server, the given one, or one in its zone (made if needed).

        Given another server than the one it is attached to, it is detached first.
        """
        if server is not None and self.server is not None and server is not self.server:
            await self.detach()
        target = server or self.server
        if target is None:
            target = await self.manager.get_server_in_zone(self.availability_zone)
        await target.mount_volume(self, mtpt)

    async def remount(self) -> None:
        """Mount the volume again where it was mounted on its server."""
        await self._need_server().remount_volume(self)

    async def unmount(self) -> None:
        """Unmount the volume (it stays attached)."""
        if self.server is not None:
            await self.server.unmount_volume(self)

    async def detach(self) -> None:
        """Unmount and detach the volume."""
        if self.server is not None:
            await self.server.detach_volume(self)

    async def delete(self) -> None:
        """Unmount, detach and delete the volume; it is unregistered from its manager."""
        await self.detach()
        await self._ctx.ec2.delete_volume(self.volume_id)
        self._ctx.registry.forget_volume(self)

    async def create_snapshot(self, description: str = "", *, wait: bool = False) -> str:
        """Snapshot the volume cleanly; the snapshot's id.

        A mounted volume is unmounted first (or frozen with fsfreeze when it is
        busy) and mounted again afterwards. The snapshot is tagged with the volume's
        name and fstype, so that ``provision_volume(name, reuse=True)`` finds it.
        ``wait`` waits until the snapshot is completed.
        """
        m = self._ctx
        tags = {
            tag("role"): "snapshot",
            tag("name"): self.name,
            tag("fstype"): self.fstype,
            tag("volume"): self.volume_id,
            tag("created"): f"{time.time():020.6f}",
            "Name": self.name,
            **creation_tags(m.account.local_key().name),
        }
        desc = description or (
            self.server.volume_description(self)
            if self.server
            else f"Staging volume for {self.name}"
        )
        server, was_mounted, frozen = self.server, self.mounted, False
        if server is not None and was_mounted:
            try:
                await server.unmount_volume(self)
            except VolumeInUse:
                assert self.mtpt
                await server.run("fsfreeze", "-f", self.mtpt, sudo=True)
                frozen = True
        try:
            snap = await m.ec2.create_snapshot(self.volume_id, description=desc, tags=tags)
        finally:
            with anyio.CancelScope(shield=True):
                if server is not None and frozen:
                    assert self.mtpt
                    await server.run("fsfreeze", "-u", self.mtpt, sudo=True)
                elif server is not None and was_mounted:
                    await server.remount_volume(self)
        snapshot_id = str(snap["SnapshotId"])
        if wait:
            await m.ec2.wait_for_snapshot(snapshot_id, timeout=m.timeouts.snapshot)
        return snapshot_id

    snapshot = create_snapshot

    # -- file commands, run as root with paths relative to the volume's root ---------------

    async def _checked_paths(self, *subs: str, mount: bool = True) -> list[str]:
        """Where ``subs`` (relative to the volume's root) are on its server, after
        checking there that its mount point holds this very volume right now.

        Not mounted anywhere although the manager mounted it (an admin, a reboot): it is
        mounted again (attached, and its server started, as needed); one the manager
        unmounted is mounted too with ``mount``, else VolumeNotMounted. Another
        filesystem at its mount point: VolumeNotMounted; the volume mounted elsewhere:
        VolumeInUse. Each path is resolved on the server (symlinks followed) and must
        stay inside the volume: PathError otherwise.
        """
        if self.fstype == "raw":
            raise BadFstype(f"volume {self.name} is raw: it has no files to read or write")
        if not mount and not self._mounted:
            raise VolumeNotMounted(f"volume {self.name} is not mounted")
        for _ in range(3):
            server, mtpt = self._server, self._mtpt
            if server is None or mtpt is None:
                await self.mount()
                continue
            probe = await self._probe(server, mtpt, subs)
            if probe.by_serial and probe.device != self._mtdev and self._ec2_device:
                self._record_attach(server, self._ec2_device, probe.device)  # renamed (a restart)
            if probe.judge(self.name, mtpt) == "mounted":
                self._record_mount(mtpt)
                return [
                    mounts.resolved_inside(mtpt, sub, real, self.name)
                    for sub, real in zip(subs, probe.resolved, strict=True)
                ]
            self._record_unmount()
            await server.mount_volume(self, mtpt)
        raise VolumeNotMounted(f"volume {self.name} could not be mounted at {self._mtpt}")

    async def _probe(self, server: ServerRef, mtpt: str, subs: tuple[str, ...]) -> mounts.Probe:
        """The mount probe of this volume on its server (started when it is not running)."""
        wanted = [posixpath.join(mtpt, sub.lstrip("/")) for sub in subs]
        argv = mounts.probe_argv(self.volume_id, self._mtdev, mtpt, wanted)
        if server.state != "running":
            await server.start()
        try:
            return mounts.parse_probe(await server.scmd(*argv, sudo=True))
        except (ServerNotRunning, ConnectError, ConnectionLost):
            # stopped (and maybe started again) behind our back: its state, then again
            await server.refresh()
            if not await server.ping():
                await server.start()
            return mounts.parse_probe(await server.scmd(*argv, sudo=True))

    async def _file_cmd(self, program: str, *args: str, fixed: tuple[str, ...] = ()) -> str:
        """Run ``program`` as root: its options, the ``fixed`` arguments, then the other
        arguments as paths relative to the volume's root (checked: see _checked_paths)."""
        opts = [a for a in args if a.startswith("-")]
        paths = await self._checked_paths(*(a for a in args if not a.startswith("-")), mount=False)
        return await self._need_server().scmd(program, *opts, *fixed, "--", *paths, sudo=True)

    async def ls(self, *args: str) -> str:
        """``ls`` on the volume (paths relative to its root; default its root)."""
        if not any(not a.startswith("-") for a in args):
            args = (*args, ".")
        return await self._file_cmd("ls", *args)

    async def df(self, *args: str) -> str:
        """``df`` of the volume."""
        return await self._file_cmd("df", *args, ".")

    async def mkdir(self, *args: str) -> str:
        """``mkdir`` on the volume."""
        return await self._file_cmd("mkdir", *args)

    async def chown(self, owner: str, *args: str) -> str:
        """``chown owner paths...`` on the volume."""
        return await self._file_cmd("chown", *args, fixed=(owner,))

    async def chgrp(self, group: str, *args: str) -> str:
        """``chgrp group paths...`` on the volume."""
        return await self._file_cmd("chgrp", *args, fixed=(group,))

    async def chmod(self, mode: str, *args: str) -> str:
        """``chmod mode paths...`` on the volume."""
        return await self._file_cmd("chmod", *args, fixed=(mode,))

    async def cp(self, *args: str) -> str:
        """``cp`` within the volume."""
        return await self._file_cmd("cp", *args)

    async def mv(self, *args: str) -> str:
        """``mv`` within the volume."""
        return await self._file_cmd("mv", *args)

    async def rm(self, *args: str) -> str:
        """``rm`` on the volume."""
        return await self._file_cmd("rm", *args)

    async def rmdir(self, *args: str) -> str:
        """``rmdir`` on the volume."""
        return await self._file_cmd("rmdir", *args)

    async def cmd(self, *cmd: Command) -> str:
        """Run a command as root in the volume's root directory; its output.

        One string is a shell command line, several are an argv (each quoted).
        """
        (root,) = await self._checked_paths(".", mount=False)
        server = self._need_server()
        if len(cmd) == 1:
            return await server.scmd("env", "-C", root, "sh", "-c", cmd[0], sudo=True)
        return await server.scmd("env", "-C", root, *cmd, sudo=True)

    async def ssh(self, *cmd: Command) -> bool:
        """Like :meth:`cmd`, with the output on our stdout/stderr; true on success."""
        (root,) = await self._checked_paths(".", mount=False)
        server = self._need_server()
        if len(cmd) == 1:
            return await server.ssh("env", "-C", root, "sh", "-c", cmd[0], sudo=True)
        return await server.ssh("env", "-C", root, *cmd, sudo=True)

    # -- transfers (the work is done in asyncstage.transfer) --------------------------------

    def __truediv__(self, sub: str | os.PathLike[str]) -> RemotePath:
        """``volume / "sub"``: a typed transfer path inside this volume."""
        return RemotePath(self, sub)

    async def put(
        self, *sources: PathLike, dest: str = ".", **options: Unpack[RsyncOptions]
    ) -> TransferStats:
        """rsync sources (any path form) into ``dest``, relative to the volume's root."""
        return await transfer.volume_put(self, *sources, dest=dest, **options)

    async def get(self, *paths: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync sources relative to the volume's root to ``dest`` (the last path)."""
        return await transfer.get_from(self, *paths, **options)

    async def copy(self, dest: PathLike, **options: Unpack[RsyncOptions]) -> TransferStats:
        """rsync the volume's whole contents to ``dest`` (any path form, e.g. another volume)."""
        return await transfer.volume_copy(self, dest, **options)

    async def dd(self, dest: Volume | str, **options: Unpack[DdOptions]) -> TransferStats:
        """Block-copy this volume onto volume ``dest`` (both attached, unmounted)."""
        return await transfer.dd(self.manager, self, dest, **options)
