"""Server: an EC2 instance with ssh access, its lifecycle, commands and volumes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack, cast

import anyio

from asyncstage import hostkeys, jumps, transfer
from asyncstage.concurrency import concurrently
from asyncstage.disks import Disks
from asyncstage.ec2 import EC2, Resource, tag, tags_of
from asyncstage.errors import (
    HostKeyMismatch,
    HostKeyUnverified,
    ServerNotRunning,
    SSHError,
)
from asyncstage.jumps import JumpSpec, route_for, ssh_target
from asyncstage.options import VolumeOptions, check_keys
from asyncstage.ssh import Command, CommandResult, SSHHost
from asyncstage.transfer import DdOptions, RsyncOptions, TransferStats
from asyncstage.transfer.ingress import admit_ssh
from asyncstage.volume import Volume

if TYPE_CHECKING:
    from asyncstage.context import ManagerRef
    from asyncstage.paths import PathLike
    from asyncstage.refs import VolumeRef
    from asyncstage.ssh import CommandReader, CommandWriter

__all__ = ["Server"]


class Server:
    """An EC2 instance of a Manager, reached over ssh (``str(server)`` is its instance id).

    Made by :meth:`Manager.provision_server` / :meth:`Manager.get_server`, not directly.
    """

    def __init__(
        self,
        manager: ManagerRef,
        instance: Resource,
        *,
        keyfile: Path | None,
        username: str,
    ) -> None:
        self.manager = manager
        self._ctx = manager.context
        self.instance: Resource = instance
        """The latest EC2 description of the instance (a DescribeInstances item)."""
        self.instance_id: str = str(instance["InstanceId"])
        self.keyfile = keyfile
        self.username = username
        self._host: SSHHost | None = None
        self._pin = hostkeys.HostKeyPin()
        self._running_at: str | None = None  # the address of the last running description
        if self.state == "running":
            self._running_at = self.address
        self._up = False
        self._disks = Disks(self._ctx, self)

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
        return self._ctx.ec2

    @property
    def jump_host(self) -> JumpSpec | None:
        """The jump host (bastion) it is reached through, or None (directly): its own (set
        here, or by ``jump_host=`` of ``provision_server``/``get_server``), else the
        manager's when it has no public address (:mod:`asyncstage.jumps`). Setting one
        takes effect at the next connection; None goes back to the default."""
        return jumps.jump_of(self, self._ctx)

    @jump_host.setter
    def jump_host(self, spec: JumpSpec | None) -> None:
        jumps.set_jump(self._ctx, self.name, spec)

    @property
    def host(self) -> SSHHost:
        """The ssh connection to the server (made on first use, per address and jump host)."""
        if self.address is None:
            raise ServerNotRunning(
                f"server {self.name} ({self.instance_id}) has no address: it is {self.state}"
            )
        address, jump = route_for(self, self._ctx)
        if self._host is None or self._host.address != address or self._host.jump is not jump:
            self._host = SSHHost(
                address,
                username=self.username,
                client_keys=[self.keyfile] if self.keyfile else [],
                known_hosts=self._ctx.known_hosts.path,
                host_key_policy=self._pin.policy,
                expected_fingerprints=self._pin.expected,
                label=f"{self.name} ({self.instance_id})",
                before_connect=self._before_connect,  # whoever connects first: settled then
                jump=jump,
            )
            vpc, private = self.instance.get("VpcId"), self.instance.get("PrivateIpAddress")
            if vpc and private:  # servers of one VPC (of one region) reach each other there
                self._host.private_network = (f"{self._ctx.region}/{vpc}", str(private))
                public = self.instance.get("PublicIpAddress")
                self._host.public_address = str(public) if public else None
                ctx, label = self._ctx, self.name
                self._host.admit_ssh = lambda cidr: admit_ssh(
                    ctx.ec2, self.instance, ctx.account.security_group, label, cidr
                )
            # the manager closes it on exit (and the one it replaces)
            self._ctx.registry.track_host(self, self._host)
        return self._host

    async def refresh(self) -> Resource:
        """Fetch the instance's description again (sharing a round with other callers)."""
        found = await self._ctx.ec2.describe_instances_shared([self.instance_id])
        if self.instance_id in found:
            self._record_description(found[self.instance_id])
        return self.instance

    def volumes(self) -> list[Volume]:
        """The managed volumes attached to this server (the root volume is not one)."""
        return [cast(Volume, v) for v in self._ctx.registry.volumes() if v.server is self]

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self, timeout: float = 10.0) -> bool:
        """True when the instance is running AND ssh answers with our key (cached)."""
        if not self._up:
            await self.refresh()
            if self.state != "running":
                return False
        self._up = await self.host.ping(timeout=timeout)  # settles the host key first
        return self._up

    async def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until ping() succeeds (default: ``timeouts.server``)."""
        await self._ctx.fleet.start_one(self, timeout=timeout or self._ctx.timeouts.server)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the server and wait until it is stopped (default: ``timeouts.stop``)."""
        await self._ctx.fleet.stop_one(self, timeout=timeout or self._ctx.timeouts.stop)

    async def terminate(self, timeout: float | None = None) -> None:
        """Terminate, wait (default: ``timeouts.stop``), unregister it and its host key."""
        await self._ctx.fleet.terminate_one(self, timeout=timeout or self._ctx.timeouts.stop)

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
        return await self.host.run(
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
        return await self.host.scmd(*cmd, check=check, timeout=timeout, input=input, sudo=sudo)

    async def ssh(
        self,
        *cmd: Command,
        timeout: float | None = None,
        sudo: bool = False,
    ) -> bool:
        """Run a command with its output on our stdout/stderr; true on success."""
        return await self.host.ssh(*cmd, timeout=timeout, sudo=sudo)

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

    async def scmd_to_file(
        self, *cmd: Command, path: str | os.PathLike[str], sudo: bool = False
    ) -> int:
        """Run a command with its stdout written to the local file ``path`` (renamed into
        place on success); the bytes written. See :meth:`SSHHost.scmd_to_file`."""
        return await self.host.scmd_to_file(*cmd, path=path, sudo=sudo)

    async def scmd_from_file(
        self, *cmd: Command, path: str | os.PathLike[str], sudo: bool = False
    ) -> int:
        """Run a command with the local file ``path`` as its stdin; the bytes sent."""
        return await self.host.scmd_from_file(*cmd, path=path, sudo=sudo)

    @asynccontextmanager
    async def _streaming(
        self, way: str, cmd: tuple[Command, ...], encoding: str | None, sudo: bool
    ) -> AsyncIterator[Any]:
        host = self.host
        opened = host.scmd_read if way == "read" else host.scmd_write
        async with opened(*cmd, encoding=encoding, sudo=sudo) as stream:
            yield stream

    async def shell(self) -> int:
        """An interactive shell on the server; its exit status."""
        return await self.host.shell()

    # -- volumes: helpers ---------------------------------------------------------------------

    def default_mtpt(self, volume: VolumeRef | str) -> str:
        """The default mount point of a volume: ``/mnt/Staging/<name>``."""
        name = volume if isinstance(volume, str) else volume.name
        return f"/mnt/Staging/{name}"

    def volume_description(self, volume: VolumeRef | str) -> str:
        """The description given to a staging volume's snapshots."""
        name = volume if isinstance(volume, str) else volume.name
        return f"Staging volume for {name} created by asyncstage"

    async def unused_block_device(self, major_start: str = "f") -> tuple[str, str]:
        """A free device name: (EC2 name ``/dev/sdX``, the name the kernel may give it)."""
        return await self._disks.unused_block_device(major_start)

    # -- volumes: public ------------------------------------------------------------------

    async def provision_volume(
        self, name: str | None = None, **options: Unpack[VolumeOptions]
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
        check_keys(options, VolumeOptions, "provision_volume")
        volume = await self._disks.provision(name, options)
        return cast(Volume, volume)  # the registry makes the manager's volume_class

    add_volume = provision_volume

    async def mount_volume(self, volume: VolumeRef, mtpt: str | None = None) -> None:
        """Mount a volume here (attaching it first if needed) at mtpt or its last mount point."""
        await self._disks.mount(volume, mtpt)

    async def remount_volume(self, volume: VolumeRef) -> None:
        """Mount again a volume unmounted from this server, at its old mount point."""
        await self._disks.remount(volume)

    async def unmount_volume(self, volume: VolumeRef) -> None:
        """Unmount a volume (it stays attached)."""
        await self._disks.unmount(volume)

    async def detach_volume(self, volume: VolumeRef) -> None:
        """Unmount and detach a volume, waiting until EC2 says it is detached."""
        await self._disks.detach(volume)

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
        return await transfer.get_from(self, *paths, **options)

    async def dd(
        self, source: Volume | str, dest: Volume | str, **options: Unpack[DdOptions]
    ) -> TransferStats:
        """Block-copy volume ``source`` onto volume ``dest``; see Manager.dd."""
        return await transfer.dd(self.manager, source, dest, **options)

    # -- state changes: called by the Manager's fleet, not by users ----------------------------
    # The server's fields change only here; the fleet reports what EC2 did.

    def _record_description(self, instance: Resource) -> None:
        """Keep a fresh EC2 description of the instance."""
        self.instance = instance
        if self.state != "running":
            self._up = False
        elif self.address:
            if self._running_at not in (None, self.address):  # a start gave a new address
                self._pin.moved_from = self._pin.moved_from or self._running_at
            self._running_at = self.address

    def _expect_new_host_key(self, launch_key: str | None = None) -> None:
        """Launched, or given a new address: no known_hosts entry to trust yet (but the
        host key its user data gave it, ``launch_key``, replaced at the first contact)."""
        self._pin.fresh = True
        self._pin.launch_key = launch_key
        self._pin.rotate = launch_key is not None

    def _record_stop(self) -> None:
        """Asked to stop (the registry tells its volumes)."""
        self._up = False
        self._host = None  # its address goes away (the manager closes the connection)

    def _record_termination(self) -> None:
        """Terminated: its host key is forgotten (the registry detaches its volumes)."""
        self._host = None
        for address in {self.address, self._pin.pinned_for} - {None}:
            assert address is not None
            self._ctx.known_hosts.remove(address, 22)
        self.instance.setdefault("State", {})["Name"] = "terminated"
        self._up = False

    async def _adopt_mounts(self, volumes: list[VolumeRef]) -> None:
        """Find where the volumes attached here are, and whether they are mounted."""
        await self._disks.adopt_mounts(volumes)

    async def _before_connect(self) -> None:
        """Before a new ssh connection: the group lets this machine in, the host key is
        settled."""
        await self._ctx.account.before_ssh()
        await self._pin_host_key()

    async def _pin_host_key(self) -> None:
        """Before the first contact at an address: settle what its host key must be
        (:class:`~asyncstage.hostkeys.HostKeyPin`)."""
        address = ssh_target(self, self._ctx)[0] if self.address else None
        if address:
            await self._pin.settle(self._ctx, self, address, lambda: self._host)

    async def _wait_ssh(self, deadline: float) -> None:
        """Try ssh until it answers or the deadline passes (ServerUnreachable
        then, saying what is known of the server).

        The console is watched for the host key fingerprints while sshd comes up (at
        once, not one after the other). A host key that does not match fails at once
        with HostKeyMismatch; one that cannot be verified with HostKeyUnverified.

        A console that showed the fingerprints already was written after sshd started
        (cloud-init prints them in its last stage): ssh is tried at once, and sshd is
        probed for only if that fails. A probe is a connection of its own, which the
        server's sshd serves with a process of its own: a fleet would pay it twice.

        A server whose launch key is to be replaced is only connected to (verified): the
        replacement is its first command (:meth:`_replace_launch_key`, run by the caller
        once it has let go of its share of the ssh slots).
        """
        if self.address is None:
            raise ServerNotRunning(f"server {self.name} ({self.instance_id}) has no address")
        at, jump = ssh_target(self, self._ctx)
        address = None if jump is not None else at  # behind a jump host: not ours to probe
        # on its console, or given in its user data: ssh is tried at once
        known = bool(self._pin.expected) or self._pin.launch_key is not None
        shown = self._pin.pinned_for == at and known
        waits = [self._pin_host_key]  # through a jump host: the ssh below tells when it is up
        if address is not None and not shown:
            waits.append(lambda: hostkeys.wait_for_sshd(self._ctx, self, at, deadline))
        await concurrently(*waits)
        interval = 0.2
        while True:
            left = deadline - anyio.current_time()
            limit = max(2.0, min(10.0, left))
            try:
                with anyio.fail_after(limit):
                    if self._pin.rotate:  # the handshake alone: the replacement comes next
                        await self.host.host_public_key()
                    else:
                        await self.host.run("true", timeout=limit)
            except HostKeyMismatch as e:
                if not self._pin.fall_back():
                    raise
                # not the key its user data gave it: never pinned, its console decides
                hostkeys.log.info("%s: %s; reading its console", self.name, e)
                self.host.reset()
                await self._pin_host_key()
                continue
            except HostKeyUnverified:
                raise
            except (SSHError, TimeoutError) as e:
                failure: BaseException = e
            else:
                self._up = not self._pin.rotate
                return
            left = deadline - anyio.current_time()
            if left <= 0:
                raise await hostkeys.diagnose(
                    self._ctx, self, address, f"never answered ssh ({failure})"
                ) from failure
            self.host.reset()
            if address is not None and shown:  # not up after all: probe for its sshd now
                shown = False
                await hostkeys.wait_for_sshd(self._ctx, self, address, deadline)
                continue
            await anyio.sleep(min(interval, left))
            interval = min(interval * 1.5, 5.0)

    async def _replace_launch_key(self) -> None:
        """After :meth:`_wait_ssh` reached the server: its launch key replaced, as its first
        command (:func:`~asyncstage.hostkeys.rotate`). A replacement that failed leaves
        the server usable with the launch key pinned, once a command shows that it runs
        them (an error of that command is the server's)."""
        if not self._pin.rotate:
            return
        if not await hostkeys.rotate(self._ctx, self, self.host, self._pin):
            await self.host.run("true", timeout=10.0)
        self._up = True
