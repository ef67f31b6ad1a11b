"""The engine's volumes and snapshots: loop devices, device nodes, image files.

:class:`StorageEvents` is the part of :class:`~._engine.Engine` that the API calls when
volumes and snapshots change (under the engine's lock).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path

from asyncstage.localcloud._devices import nvme_node, xen_node
from asyncstage.localcloud._disks import Disk, copy_sparse
from asyncstage.localcloud._freeze import frozen
from asyncstage.localcloud._hooks import ApiHooks, ApiRefusal
from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._machine import Machine
from asyncstage.localcloud._realism import Realism
from asyncstage.localcloud._run import _Run
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError

__all__ = ["StorageEvents"]

log = logging.getLogger("asyncstage.localcloud")


class StorageEvents:
    """Volumes and snapshots of the engine (its tables: ``disks``, ``snapshots``)."""

    lock: threading.RLock
    machines: dict[str, Machine]
    disks: dict[str, Disk]
    snapshots: dict[str, Path]
    random: random.Random
    realism: Realism
    state_dir: Path
    _run: _Run
    _api: ApiHooks | None
    _closed: bool

    def volume_created(self, volume_id: str, size: int, source: Path | None) -> None:
        image = self.state_dir / "volumes" / f"{volume_id}.img"
        self.disks[volume_id] = Disk.create(volume_id, image, size, source)

    def volume_attached(self, volume_id: str, instance_id: str, device: str) -> bool:
        """Bind the volume's loop device; its node appears in the instance (if booted) a
        moment later (``realism.device``). True: the attachment says ``attaching`` until
        then (Xen: blkfront's node is there by ``attached``); Nitro says ``attached`` first."""
        disk = self.disks[volume_id]
        machine = self.machines[instance_id]
        if machine.nitro:
            # EC2 numbers NVMe devices in no order a client may rely on
            taken = {d.name for d in self.disks.values() if d.instance_id == instance_id}
            free = [n for n in range(1, 28) if nvme_node(n) not in taken] or [
                n for n in range(28, 128) if nvme_node(n) not in taken
            ]
            if not free:
                raise LocalCloudError(f"{instance_id}: no NVMe device number left")
            name, serial = nvme_node(self.random.choice(free)), volume_id
        else:
            node = xen_node(device)
            assert node is not None  # the API checked the name
            name, serial = node, None
        loop = disk.attach()
        assert disk.loop_id is not None
        self._run.add_loop(loop, disk.loop_id)
        disk.instance_id, disk.name, disk.serial = instance_id, name, serial
        if not (machine.ready and machine.host.alive):
            return False  # it boots with the node (_add_devices)
        delay = self.random.uniform(*self.realism.device)
        if delay > 0:
            timer = threading.Timer(delay, self._device_node, (disk, machine, loop))
            timer.daemon = True
            timer.start()
            return not machine.nitro
        assert disk.rdev is not None
        try:
            machine.host.add_device(name, disk.rdev, serial)
        except OSError as e:
            self._free(disk)
            raise LocalCloudError(f"{volume_id}: cannot make its device node: {e}") from e
        return False

    def _device_node(self, disk: Disk, machine: Machine, loop: str) -> None:
        """The late device node of an attachment, unless it is gone since; on Xen the
        attachment turns ``attached`` with it (a boot since adds the node: _add_devices)."""
        with self.lock:
            if self._closed or disk.loop != loop or disk.instance_id != machine.host.instance_id:
                return
            if machine.ready and machine.host.alive and disk.rdev is not None:
                assert disk.name is not None
                try:
                    machine.host.add_device(disk.name, disk.rdev, disk.serial)
                except (OSError, LocalCloudError):  # stays attaching, as a stuck one on EC2
                    log.exception("local cloud: %s: no device node", disk.volume_id)
                    return
            if not machine.nitro and self._api is not None:
                self._api.attachment_done(disk.volume_id)

    def volume_detaching(self, volume_id: str, *, force: bool = False) -> str | None:
        """Remove the volume's device node and loop device; None once done.

        While it is mounted inside its instance: with ``force``, it is unmounted there
        (lazily: the device goes from under it, as a forced detach does on EC2); else
        its mount point is returned (EC2's ``busy``: the API retries until it is
        unmounted) or, when ``realism.busy_detach`` is off, the detach is refused.
        """
        disk = self.disks[volume_id]
        machine = self.machines.get(disk.instance_id or "")
        if machine is not None and disk.major_minor is not None:
            where = machine.host.mounted_devices().get(disk.major_minor)
            if where is not None and force:
                where = _force_unmount(machine.host, disk.major_minor)
            if where is not None:
                if self.realism.busy_detach:
                    return where
                raise ApiRefusal(
                    "VolumeInUse",
                    f"{volume_id} is mounted at {where} on {disk.instance_id}: unmount it "
                    "first (the local cloud refuses instead of waiting in EC2's 'busy' state)",
                )
            if disk.name is not None:
                machine.host.remove_device(disk.name, disk.rdev, disk.serial)
        self._free(disk)
        return None

    def _free(self, disk: Disk) -> None:
        loop = disk.loop
        disk.detach()
        if loop is not None:
            self._run.remove_loop(loop)

    def volume_deleted(self, volume_id: str) -> None:
        disk = self.disks.pop(volume_id, None)
        if disk is not None:
            self._free(disk)
            disk.image.unlink(missing_ok=True)

    @contextlib.contextmanager
    def instance_frozen(self, instance_id: str) -> Iterator[None]:
        """Every process of the instance stopped (and its writes synced) while the block
        runs: one instant for all its volumes (``CreateSnapshots``)."""
        machine = self.machines.get(instance_id)
        pid = machine.host.init_pid if machine is not None and machine.host.alive else None
        if pid is None:
            yield  # stopped or gone: nothing writes
            return
        with frozen(pid):
            yield

    def snapshot_created(self, snapshot_id: str, source: Path) -> None:
        """Copy the image now (the snapshot's moment); report `completed` right after."""
        image = self.state_dir / "snapshots" / f"{snapshot_id}.img"
        copy_sparse(source, image)
        self.snapshots[snapshot_id] = image
        threading.Timer(0.05, self._snapshot_completed, args=(snapshot_id,)).start()

    def _snapshot_completed(self, snapshot_id: str) -> None:
        with self.lock:
            if self._api is not None and not self._closed:
                self._api.snapshot_completed(snapshot_id)

    def snapshot_deleted(self, snapshot_id: str) -> None:
        image = self.snapshots.pop(snapshot_id, None)
        if image is not None:
            image.unlink(missing_ok=True)


def _force_unmount(host: Host, device: tuple[int, int]) -> str | None:
    """Unmount (lazily) every mount of ``device`` inside the host; where it is still
    mounted if that fails."""
    assert host.init_pid is not None
    for _ in range(16):  # a device mounted at several places: one each time
        where = host.mounted_devices().get(device)
        if where is None:
            return None
        try:
            run(
                which("nsenter"),
                "--target",
                str(host.init_pid),
                "--mount",
                "--pid",  # its /proc/self: umount reads the mount table there
                "--root",
                "umount",
                "--lazy",
                "--",
                where,
                what="umount (forced detach)",
            )
        except LocalCloudError as e:
            log.warning(
                "local cloud: %s: forced detach cannot unmount %s: %s", host.instance_id, where, e
            )
            return where
    return host.mounted_devices().get(device)
