"""The engine's volumes and snapshots: loop devices, device nodes, image files.

:class:`StorageEvents` is the part of :class:`~._engine.Engine` that the API calls when
volumes and snapshots change (under the engine's lock).

Image copies (a snapshot of a volume, a copy of a snapshot, a volume from a snapshot)
run in threads of their own, out of the API call and out of the engine's lock, as EC2
answers CreateSnapshot at once with a ``pending`` snapshot. The snapshot is still the
volume's content at the instant of the call: both files are opened in the call, under
the lock (a DeleteVolume right after cannot race the open), and while the image of a
volume attached to a live instance is copied, that instance's processes stay stopped
(:func:`~._freeze.frozen`, taken in the call), so none of its writes reaches the image
before the copy has read it. An AttachVolume of the volume waits until its copies are
done, and so does a boot that would give an instance its device node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from asyncstage.localcloud._devices import nvme_node, xen_node
from asyncstage.localcloud._disks import GIB, CopyStopped, Disk, copy_image, flush_loop
from asyncstage.localcloud._freeze import frozen, namespace_pids
from asyncstage.localcloud._hooks import ApiHooks, ApiRefusal
from asyncstage.localcloud._hosts import Host
from asyncstage.localcloud._machine import Machine
from asyncstage.localcloud._realism import Realism
from asyncstage.localcloud._run import _Run
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError

__all__ = ["StorageEvents"]

log = logging.getLogger("asyncstage.localcloud")
_WAIT = 1.0  # seconds between two looks at the cloud's closing while waiting for a copy
# Copies that hold no instance still run this many at a time, the rest waiting their
# turn: all at once, each would end only with the last (they share the cores), so
# every volume made from a snapshot would stay ``creating`` as long as the slowest.
_SLOTS = max(1, os.cpu_count() or 1)
_NICE = 10  # a copy thread's nice value: the API and the instances go first


@dataclass
class _Hold:
    """The freeze of one instance's boot (its init ``pid``), held ``count`` times."""

    count: int
    pid: int | None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


@dataclass
class _Copy:
    """One image copy under way: of ``source`` (a volume id; None: a snapshot's image)
    into ``dest``, the image of ``target`` (the new snapshot's or volume's id)."""

    target: str
    source: str | None
    dest: Path
    frozen: str | None  # the instance kept stopped for it
    began: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


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
    copies: dict[str, _Copy]  # target id -> its copy under way
    copied: threading.Condition  # on ``lock``: notified as each copy ends
    _frozen: dict[str, _Hold]  # instance -> its freeze
    # copies made: "copies" (of them "cloned": sharing their source's blocks), "bytes" of
    # data, "seconds" each (call to end); of them, the volumes made from snapshots:
    # "volumes", "volume_seconds"
    copy_totals: dict[str, float]
    _slots: threading.Semaphore  # turns of the copies that hold no instance

    def _start_storage(self) -> None:
        self.copies = {}
        self.copy_totals = {
            "copies": 0,
            "cloned": 0,
            "bytes": 0,
            "seconds": 0.0,
            "volumes": 0,
            "volume_seconds": 0.0,
        }
        self.copied = threading.Condition(self.lock)
        self._frozen = {}
        self._slots = threading.Semaphore(_SLOTS)

    def volume_created(self, volume_id: str, size: int, source: Path | None) -> bool:
        """A new volume's image; True: ``creating`` until the copy of ``source`` (a
        snapshot's image) is done (:meth:`ApiHooks.copy_done`)."""
        image = self._run.images / "volumes" / f"{volume_id}.img"
        if source is None:
            self.disks[volume_id] = Disk.create(volume_id, image, size)
            return False
        self._copy(volume_id, source, image, None, size * GIB)
        self.disks[volume_id] = Disk(volume_id, image)
        return True

    def wait_copied(self, volume_ids: Iterable[str]) -> None:
        """Wait (the lock released meanwhile) until no copy reads one of the volumes."""
        wanted = set(volume_ids)
        while not self._closed and any(c.source in wanted for c in self.copies.values()):
            self.copied.wait(_WAIT)

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
        loop = disk.attach(direct_io=self._run.store is not None)
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
        """Its image goes (a copy being made of it stops); copies reading it go on from
        the image they hold open."""
        copy = self.copies.get(volume_id)
        if copy is not None:
            copy.stop.set()
        disk = self.disks.pop(volume_id, None)
        if disk is not None:
            self._free(disk)
            disk.image.unlink(missing_ok=True)

    @contextlib.contextmanager
    def instance_frozen(self, instance_id: str) -> Iterator[None]:
        """Every process of the instance stopped (and its writes synced) while the block
        runs: one instant for all its volumes (``CreateSnapshots``). The copies started
        meanwhile keep it stopped until they are done."""
        held = self._freeze(instance_id)
        try:
            yield
        finally:
            if held:
                self._thaw(instance_id)

    def _freeze(self, instance_id: str) -> bool:
        """One more hold on the instance's freeze (it starts with the first); False: the
        instance is not running (stopped or gone: nothing writes)."""
        machine = self.machines.get(instance_id)
        alive = machine is not None and machine.host.alive
        pid = machine.host.init_pid if machine is not None and alive else None
        hold = self._frozen.get(instance_id)
        if hold is None:
            if pid is None:
                return False
            hold = _Hold(0, None)
        if pid is not None and hold.pid != pid:  # the first hold, or a boot since the last
            assert machine is not None
            hold.stack.enter_context(
                frozen(pid, lambda: self._flush(instance_id), machine.host.freezer)
            )
            hold.pid = pid
        hold.count += 1
        self._frozen[instance_id] = hold
        return True

    def host_halted(self, instance_id: str) -> None:
        """The instance's processes are gone (stopped, terminated): its freeze ends now,
        not with the copies that hold it, so that its next boot is not born frozen (the
        copies read images that no process of it writes any more)."""
        hold = self._frozen.get(instance_id)
        if hold is not None and hold.pid is not None:
            hold.pid = None
            hold.stack.close()

    def _writable(self, disk: Disk) -> bool:
        """Whether the instance ``disk`` is attached to could write to it during a copy:
        it is mounted there, or a process of it holds its device open. An attached volume
        that is neither (a backup unmounts its work volume for the snapshot) is copied
        without freezing the instance, so that its other work goes on."""
        machine = self.machines.get(disk.instance_id or "")
        if machine is None or not machine.host.alive or disk.rdev is None:
            return False
        if disk.major_minor in machine.host.mounted_devices():
            return True
        assert machine.host.init_pid is not None
        for pid in namespace_pids(machine.host.init_pid):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue  # gone meanwhile
            for fd in fds:
                try:
                    found = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.S_ISBLK(found.st_mode) and found.st_rdev == disk.rdev:
                    return True
        return False

    def _flush(self, instance_id: str) -> None:
        """What the (stopped) instance wrote to its volumes, into their images: each loop
        device's buffers and the filesystem mounted on it (``BLKFLSBUF`` syncs that)."""
        for disk in self.disks.values():
            if disk.instance_id == instance_id and disk.loop is not None:
                flush_loop(disk.loop)

    def _thaw(self, instance_id: str) -> None:
        """One hold fewer; the instance's processes continue with the last."""
        hold = self._frozen[instance_id]
        hold.count -= 1
        if hold.count <= 0:
            del self._frozen[instance_id]
            hold.stack.close()

    def snapshot_created(self, snapshot_id: str, source: Path) -> None:
        """Start the copy of ``source`` (a volume's image or a snapshot's) for the new
        snapshot; the API hears of its end (:meth:`ApiHooks.copy_done`)."""
        image = self._run.images / "snapshots" / f"{snapshot_id}.img"
        disk = next((d for d in self.disks.values() if d.image == source), None)
        self._copy(snapshot_id, source, image, disk, 0)

    def snapshot_deleted(self, snapshot_id: str) -> None:
        copy = self.copies.get(snapshot_id)
        if copy is not None:
            copy.stop.set()  # its thread removes the part it wrote
        image = self.snapshots.pop(snapshot_id, None)
        if image is not None:
            image.unlink(missing_ok=True)

    def _copy(self, target: str, source: Path, dest: Path, disk: Disk | None, size: int) -> None:
        """Open both files, freeze the instance ``disk`` is attached to (if it runs), and
        copy in a thread of the copy's own (under the lock: the instant of the call)."""
        opened: list[int] = []
        try:
            opened.append(os.open(source, os.O_RDONLY | os.O_CLOEXEC))
            opened.append(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as e:
            for fd in opened:
                os.close(fd)
            if len(opened) == 1:
                dest.unlink(missing_ok=True)
            raise LocalCloudError(f"{target}: cannot copy {source.name}: {e}") from e
        held = disk.instance_id if disk is not None else None
        try:
            if disk is not None and held is not None and not self._writable(disk):
                held = None  # nothing of the instance can write to it: it runs on
                if disk.loop is not None:
                    flush_loop(disk.loop)
            if held is not None and not self._freeze(held):
                held = None
        except BaseException:
            for fd in opened:
                os.close(fd)
            dest.unlink(missing_ok=True)
            raise
        job = _Copy(target, disk.volume_id if disk is not None else None, dest, held)
        job.thread = threading.Thread(
            target=self._copying,
            args=(job, opened[0], opened[1], size),
            name=f"localcloud-copy-{target}",
            daemon=True,
        )
        self.copies[target] = job
        try:
            job.thread.start()
        except BaseException:
            self.copies.pop(target, None)
            for fd in opened:
                os.close(fd)
            dest.unlink(missing_ok=True)
            if held is not None:
                self._thaw(held)
            raise

    def _copying(self, job: _Copy, source: int, dest: int, size: int) -> None:
        """The copy's thread: copy, thaw, report; a stopped or failed copy leaves no file."""
        error: str | None = "the copy of its data failed"  # until it ends well
        copied, cloned = 0, False
        with contextlib.suppress(OSError):  # this thread only (Linux: a nice per thread)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        try:
            with self._turn(job):
                copied, cloned = copy_image(source, dest, job.stop, size)
            error = None
        except CopyStopped:
            error = None
        except OSError as e:
            error = f"the copy of its data failed: {e.strerror or e}"
            log.error("local cloud: %s: %s", job.target, error)
        except BaseException:
            log.exception("local cloud: %s: the copy of its data failed", job.target)
        finally:
            os.close(source)
            os.close(dest)
            with self.lock:  # whatever happened: its hold on the instance goes with it
                if job.frozen is not None:
                    self._thaw(job.frozen)
        with self.lock:
            try:
                done = error is None and not job.stop.is_set() and not self._closed
                if not done:
                    job.dest.unlink(missing_ok=True)
                else:
                    totals = self.copy_totals
                    took = time.monotonic() - job.began
                    totals["copies"] += 1
                    totals["cloned"] += cloned
                    totals["bytes"] += copied
                    totals["seconds"] += took
                    if job.target.startswith("vol-"):
                        totals["volumes"] += 1
                        totals["volume_seconds"] += took
                if done and job.target.startswith("snap-"):
                    self.snapshots[job.target] = job.dest
                if (done or error) and self._api is not None and not self._closed:
                    self._api.copy_done(job.target, error)
            finally:
                self.copies.pop(job.target, None)
                self.copied.notify_all()

    @contextlib.contextmanager
    def _turn(self, job: _Copy) -> Iterator[None]:
        """The copy's turn: at once for one that keeps an instance frozen (it is held
        still until the copy ends), else one of the slots (CopyStopped if stopped first)."""
        if job.frozen is not None:
            yield
            return
        while not self._slots.acquire(timeout=0.05):
            if job.stop.is_set():
                raise CopyStopped
        try:
            yield
        finally:
            self._slots.release()

    def _stop_copies(self) -> None:
        """Stop every copy and wait for its thread (at close: no thread, no part left)."""
        with self.lock:
            jobs = list(self.copies.values())
            for job in jobs:
                job.stop.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join()


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
