"""Attachments: the EC2 side of a server's volumes: device names, slots, attach, detach.

An :class:`Attachments` belongs to one server's :class:`~asyncstage.disks.Disks`. It
picks device names as EC2 takes them (:mod:`asyncstage.devices`), keeps the volumes
attached at once within what the instance type takes (more wait their turn), finds the
device a volume shows as on the server (by its NVMe serial on Nitro, by its name on Xen,
waiting for the node, which comes a moment after EC2 says ``attached``) and detaches,
naming where a volume is still mounted when the detach stays ``busy``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from asyncstage import mounts
from asyncstage.devices import device_names, is_nitro, nvme_link, slot_of, volume_slots, xen_path
from asyncstage.errors import AsyncstageError, EC2Error, VolumeError, VolumeInUse, WaitTimeout

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.refs import ServerRef, VolumeRef

__all__ = ["Attachments", "detached"]

log = logging.getLogger("asyncstage")

_CLOCK_SLACK = timedelta(seconds=2)
"""How far EC2's clock may be from our estimate of it (taken from whole-second ``Date``
headers): an attachment this much older than an unanswered call still counts as its."""

# Waits (about 5 s each, on the server) for the first of its arguments that is a block
# device and prints its real path: the node of a new attachment comes after `attached`.
_WAIT_FOR_NODE = (
    'n=0; while [ "$n" -lt 50 ]; do for p; do if [ -b "$p" ]; then readlink -f -- "$p"; '
    "exit 0; fi; done; n=$((n+1)); sleep 0.1; done; exit 3"
)


async def detached(ctx: Context, volume_id: str, *, force: bool = False, what: str = "") -> None:
    """Detach a volume (``force``: forcibly) and wait until EC2 says it is ``available``."""
    await ctx.ec2.detach_volume(volume_id, force=force)
    await ctx.ec2.wait_for_volume(
        volume_id,
        lambda v: v.get("State") == "available",
        what=f"{what or 'volume to detach'} ({volume_id})",
        timeout=ctx.timeouts.volume,
        kind="detached",
    )


class Attachments:
    """The attachments of one server's volumes (see the module's docstring)."""

    def __init__(self, ctx: Context, server: ServerRef) -> None:
        self.ctx = ctx
        self.server = server
        self._name_lock = anyio.Lock()  # two attachments never pick one name
        self._reserved = 0  # attachments on their way: a slot taken, no device name yet
        self._slot_freed = anyio.Event()
        self._gone: set[str] = set()  # volumes detached from here (EC2's mapping may lag)

    @property
    def nitro(self) -> bool:
        """Whether the server's instance type is a Nitro one (volumes as NVMe devices)."""
        return is_nitro(self.server.instance.get("InstanceType"))

    def volume_slots(self) -> int:
        """How many volumes (besides the root one) its instance type takes at once."""
        interfaces = len(self.server.instance.get("NetworkInterfaces") or []) or 1
        return volume_slots(self.server.instance.get("InstanceType"), interfaces)

    def _names_in_use(self) -> set[str]:
        """The EC2 device names taken here (``sdf``): ours, and EC2's mapping but the root
        and what we detached since it was read."""
        root = str(self.server.instance.get("RootDeviceName", "")).rsplit("/", 1)[-1]
        used = {str(v.ec2_device).rsplit("/", 1)[-1] for v in self.server.volumes() if v.ec2_device}
        for mapping in self.server.instance.get("BlockDeviceMappings", []):
            name = str(mapping.get("DeviceName", "")).rsplit("/", 1)[-1]
            if name != root and mapping.get("Ebs", {}).get("VolumeId") not in self._gone:
                used.add(name)
        return used

    async def _dev_listing(self) -> set[str]:
        result = await self.server.run("ls", "-1", "/dev", check=False)
        return {line for line in str(result.stdout).splitlines() if line}

    async def unused_block_device(self, major_start: str = "f") -> tuple[str, str]:
        """A free device name: (EC2 name, the name a Xen kernel gives it).

        Every name EC2 takes is offered (:func:`asyncstage.devices.device_names`): on Xen
        one per disk slot (``/dev/sdf`` and ``/dev/sdf1`` are one slot there), on Nitro,
        where the name is only a label (the kernel says ``nvme<N>n1``), every one.
        """
        await self.server.refresh()
        used = self._names_in_use()
        nitro = self.nitro
        slots = {slot_of(n) for n in used}
        dev = set() if nitro else await self._dev_listing()
        for name in device_names(nitro):
            short = name.rsplit("/", 1)[-1]
            slot = slot_of(name)
            assert slot is not None
            if short in used or (short.startswith("sd") and short[2] < major_start):
                continue
            if not nitro and (slot in slots or {f"xvd{slot}", f"sd{slot}"} & dev):
                continue
            xen = xen_path(name)
            assert xen is not None
            return name, xen
        raise VolumeError(f"server {self.server.name}: no free block device name left")

    async def _take_slot(self) -> None:
        """Wait while the server has as many volumes as its type takes (their turn comes
        as others detach); VolumeError when none is freed within ``timeouts.volume``."""
        bound = self.ctx.timeouts.volume
        while True:
            slots = self.volume_slots()
            if len(self._names_in_use()) + self._reserved < slots:
                self._reserved += 1
                return
            freed = self._slot_freed
            with anyio.move_on_after(bound) as waited:
                await freed.wait()
            if waited.cancelled_caught:
                await self.server.refresh()  # EC2's word, in case they went elsewhere
                if len(self._names_in_use()) + self._reserved < slots:
                    continue
                raise VolumeError(
                    f"server {self.server.name} has {slots} volumes attached, the most its "
                    f"type ({self.server.instance.get('InstanceType')}) takes, and none "
                    f"was detached within {bound:g}s"
                )

    def free_slot(self, volume_id: str | None = None) -> None:
        """A slot is free again (a volume detached, or an attachment on its way done)."""
        if volume_id is not None:
            self._gone.add(volume_id)
        self._slot_freed.set()
        self._slot_freed = anyio.Event()

    async def attach(self, volume: VolumeRef) -> None:
        """Attach an available volume here (once a slot is free) and find its device."""
        m = self.ctx
        await self._take_slot()
        try:
            async with self._name_lock:
                ec2_device, _ = await self.unused_block_device()
                asked = m.ec2.now()
                try:
                    await m.ec2.attach_volume(volume.volume_id, self.server.instance_id, ec2_device)
                except BaseException as e:
                    # no answer came (cancelled, interrupted, the connection lost)
                    if not isinstance(e, Exception) or (isinstance(e, EC2Error) and e.code is None):
                        with anyio.CancelScope(shield=True):
                            await self._undo_unanswered(volume, asked)
                    raise
                volume._record_attach(self.server, ec2_device, None)
        finally:
            self._reserved -= 1  # attached, the volume holds it now; failed, it is free
            self.free_slot()
        desc = await m.ec2.wait_for_volume(
            volume.volume_id,
            lambda v: any(
                a.get("State") == "attached" and a.get("InstanceId") == self.server.instance_id
                for a in v.get("Attachments", [])
            ),
            what=f"volume {volume.name} ({volume.volume_id}) to attach to {self.server.name}",
            timeout=m.timeouts.volume,
            kind="attached",
        )
        volume._record_description(desc)
        mtdev = await self.find_device(volume.volume_id, ec2_device, timeout=m.timeouts.volume)
        volume._record_attach(self.server, ec2_device, mtdev)

    async def _undo_unanswered(self, volume: VolumeRef, asked: datetime) -> None:
        """After an AttachVolume that got no answer (cancelled, the connection lost), which
        EC2 may have carried out all the same: detach the volume again when EC2 says it was
        attached here since ``asked`` (by that call, then), so that it is as it was before.
        An attachment from before the call is someone else's and stays. Best effort: an
        attach still in flight may land after this look (a later attach or delete of the
        volume then says it is in use)."""
        m = self.ctx
        since = asked - _CLOCK_SLACK
        try:
            found = await m.ec2.describe_volumes([volume.volume_id])
            made = [
                a
                for a in (found[0].get("Attachments") or [] if found else [])
                if a.get("InstanceId") == self.server.instance_id
                and isinstance(a.get("AttachTime"), datetime)
                and a["AttachTime"] >= since
            ]
            if not made:
                return
            await detached(m, volume.volume_id, what=f"volume {volume.name} to detach again")
        except AsyncstageError as e:
            log.warning(
                "volume %s may be left attached to %s: %s", volume.volume_id, self.server.name, e
            )

    async def find_device(self, volume_id: str, ec2_device: str, *, timeout: float) -> str:
        """The device path of a volume attached here: by its NVMe serial on Nitro, by the
        name it was attached under on Xen (``/dev/sdf`` -> ``/dev/xvdf``), never by
        guessing; waits for the node, which comes a moment after EC2 says ``attached``."""
        if self.nitro:
            paths = [nvme_link(volume_id)]
        else:  # xen-blkfront says xvdX; an older kernel keeps the name as given
            xen = xen_path(ec2_device)
            paths = ([xen] if xen else []) + ["/dev/" + ec2_device.rsplit("/", 1)[-1]]
        with anyio.move_on_after(timeout):
            while True:
                found = await self.server.run("sh", "-c", _WAIT_FOR_NODE, "sh", *paths, check=False)
                if found.exit_status == 0 and str(found.stdout).strip():
                    return str(found.stdout).strip()
                await anyio.sleep(0.1)
        raise WaitTimeout(
            f"volume {volume_id} to appear on {self.server.name} as {' or '.join(paths)}",
            timeout=timeout,
            last_state="no device",
        )

    async def detach(self, volume: VolumeRef) -> None:
        """Detach a volume (unmounted by the caller), waiting until EC2 says it is.

        A detach that stays ``busy`` (the volume is still mounted elsewhere on the server)
        past ``timeouts.volume``, or is refused, raises VolumeInUse naming where it is
        mounted.
        """
        m = self.ctx
        try:
            await self._detach_call(volume)
            desc = await m.ec2.wait_for_volume(
                volume.volume_id,
                lambda v: v.get("State") == "available",
                what=f"volume {volume.name} ({volume.volume_id}) to detach from {self.server.name}",
                timeout=m.timeouts.volume,
                kind="detached",
            )
        except (EC2Error, WaitTimeout) as e:
            if isinstance(e, EC2Error) and e.code != "VolumeInUse":
                raise
            if isinstance(e, WaitTimeout) and not await self._busy(volume):
                raise
            where = await self._mount_points(volume)
            raise VolumeInUse(
                f"cannot detach volume {volume.name} ({volume.volume_id}) from "
                f"{self.server.name}: still mounted at {', '.join(where) or '(unknown)'}"
                + (f" after {m.timeouts.volume:g}s busy" if isinstance(e, WaitTimeout) else "")
                + " (unmount it there, or detach it with force)"
            ) from e
        volume._record_description(desc)
        volume._record_detach()
        self.free_slot(volume.volume_id)

    async def _detach_call(self, volume: VolumeRef) -> None:
        """DetachVolume; one EC2 finished meanwhile (a busy detach that was unmounted
        since, a forced one) is done, not an error."""
        try:
            await self.ctx.ec2.detach_volume(volume.volume_id)
        except EC2Error as e:
            if e.code != "IncorrectState":
                raise
            found = await self.ctx.ec2.describe_volumes([volume.volume_id])
            if not found or found[0].get("State") != "available":
                raise

    async def _busy(self, volume: VolumeRef) -> bool:
        """Whether EC2 says the volume's detach is ``busy`` (mounted on the server)."""
        found = await self.ctx.ec2.describe_volumes([volume.volume_id])
        return any(a.get("State") == "busy" for v in found for a in v.get("Attachments", []))

    async def _mount_points(self, volume: VolumeRef) -> list[str]:
        """Where the server has the volume's device mounted (by device numbers)."""
        mtpt = volume.mtpt or self.server.default_mtpt(volume)
        argv = mounts.probe_argv(volume.volume_id, volume.mtdev, mtpt)
        try:
            return mounts.parse_probe(await self.server.scmd(*argv, sudo=True)).volume_mounts()
        except AsyncstageError:
            return []
