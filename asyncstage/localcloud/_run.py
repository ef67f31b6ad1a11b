"""What one local-cloud run holds on the machine, from its start to its end.

Its state dir's lock, its registry record (so that a crash is cleaned up by the next
cloud), its device cgroup, the cgroup v2 tree whose cgroups freeze its instances (none
when the device cgroups are v2 ones: they freeze then), the tmpfs of its instances'
roots, its root disk, and with ``store="reflink"`` the filesystem of its images
(:class:`~._disks.ReflinkStore`). Each is recorded as soon as it exists and released by
:meth:`_Run.close`, also after a failed start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from asyncstage.localcloud._disks import ReflinkStore, RootDisk, Store
from asyncstage.localcloud._isolation import (
    DEVICES_V1,
    MECHANISMS,
    BpfDeviceCgroup,
    DeviceCgroup,
    DeviceIsolation,
    InstanceCgroup,
    bpf_probe,
    cgroup2_mount,
    device_cgroups_available,
    remove_cgroup_tree,
    run_cgroup_dir,
)
from asyncstage.localcloud._registry import LoopId, RunRecord, lock_state_dir, register
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError, NoDeviceIsolation

log = logging.getLogger("asyncstage.localcloud")
SUBDIRS = ("instances", "roots")
IMAGES = ("volumes", "snapshots")
"""The images' dirs: in the state dir, or in the reflink store."""
STORE = "store"
"""The reflink store's mount point in the state dir (its image: ``store.img``)."""


class _Run:
    """The machine-wide resources of one run (blocking)."""

    def __init__(self) -> None:
        self.record: RunRecord | None = None
        self.state_dir = Path()
        self.cgroups: Path | None = None  # this run's device cgroup
        self.freezers: Path | None = None  # its cgroup v2 tree for freezing instances
        self.isolation = ""  # the mechanism in force: "v1", "bpf" or "none"
        self.root_disk: RootDisk | None = None
        self.store: ReflinkStore | None = None
        self.images = Path()  # where the volumes' and snapshots' images live
        self._lock_fd: int | None = None
        self._roots_mounted = False

    def start(
        self,
        state_dir: Path,
        created: bool,
        isolation: DeviceIsolation = "auto",
        store: Store = "plain",
    ) -> None:
        self.state_dir = self.images = state_dir
        self._lock_fd = lock_state_dir(state_dir)  # StateDirInUse: another cloud has it
        self.record = RunRecord(state_dir, created)
        register(self.record)  # cleans crashed runs, claims an address block
        for sub in SUBDIRS:
            (state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        if store == "reflink":
            self._reflink_store()
        for sub in IMAGES:
            (self.images / sub).mkdir(mode=0o700, exist_ok=True)
        self._device_isolation(isolation)
        self._freezers()
        log.info("local cloud: device isolation: %s", MECHANISMS[self.isolation])
        roots = state_dir / "roots"
        source = self.record.mount_source("roots")
        self.record.add_mount(roots, source)
        run(which("mount"), "-t", "tmpfs", "-o", "mode=0700", source, roots, what="mount")
        self._roots_mounted = True
        disk = RootDisk(state_dir / "root-disk.img")
        self.root_disk = disk
        loop = disk.attach()
        assert disk.loop_id is not None
        self.record.add_loop(loop, disk.loop_id)

    def _reflink_store(self) -> None:
        assert self.record is not None
        self.store = ReflinkStore(self.state_dir / f"{STORE}.img", self.state_dir / STORE)
        loop = self.store.attach()
        assert self.store.loop_id is not None
        self.record.add_loop(loop, self.store.loop_id)
        self.record.add_mount(self.store.mountpoint, loop)  # its source: the loop device
        self.store.mount()
        self.images = self.store.mountpoint

    def _device_isolation(self, wanted: DeviceIsolation) -> None:
        """The best mechanism the machine has (of those ``wanted`` allows), or refuse."""
        assert self.record is not None
        missing = []
        if wanted in ("auto", "v1"):
            if device_cgroups_available():
                self._run_cgroup("v1", DEVICES_V1)
                return
            missing.append(f"no writable cgroup v1 devices controller at {DEVICES_V1}")
        if wanted in ("auto", "bpf"):
            hierarchy = cgroup2_mount()
            if hierarchy is None:
                missing.append("no writable cgroup2 hierarchy mounted")
            else:
                cgroups = self._run_cgroup("bpf", hierarchy)
                why = bpf_probe(cgroups)
                if why is None:
                    return
                missing.append(why)
                self._remove_run_cgroup()
                self.isolation = ""
        if wanted == "none":
            self.isolation = "none"
            log.warning(
                "local cloud: device_isolation='none': root in an instance is kept from the "
                "machine's disks by its capabilities only (a devtmpfs mount reaches them)"
            )
            return
        raise NoDeviceIsolation(
            f"the local cloud cannot keep instances off this machine's disks "
            f"(device_isolation={wanted!r}): {'; '.join(missing)}. Use a machine with either "
            "mechanism, or pass device_isolation='none' to accept that root in an instance "
            "can read and write the machine's disks"
        )

    def _freezers(self) -> None:
        """A cgroup v2 tree for the instances' freezes, unless their device cgroups are
        v2 ones (they freeze then); none without a writable cgroup v2 (``SIGSTOP`` then)."""
        assert self.record is not None
        hierarchy = None if self.isolation == "bpf" else cgroup2_mount()
        if hierarchy is None:
            return
        path = run_cgroup_dir(self.record.token, hierarchy)
        self.record.add_cgroup(path)
        try:
            path.mkdir()
        except OSError as e:
            self.record.remove_cgroup(path)
            log.warning("local cloud: no cgroup to freeze instances in (%s): SIGSTOP then", e)
            return
        self.freezers = path

    def instance_freezer(self, name: str, cgroup: InstanceCgroup | None) -> Path | None:
        """The cgroup v2 that freezes instance ``name`` (None: the machine has none)."""
        if isinstance(cgroup, BpfDeviceCgroup):
            return cgroup.inner
        return None if self.freezers is None else self.freezers / name

    def _run_cgroup(self, mechanism: str, hierarchy: Path) -> Path:
        assert self.record is not None
        self.cgroups = run_cgroup_dir(self.record.token, hierarchy)
        self.record.add_cgroup(self.cgroups)
        self.cgroups.mkdir()
        self.isolation = mechanism
        return self.cgroups

    def _remove_run_cgroup(self) -> None:
        if self.cgroups is not None and self.record is not None:
            remove_cgroup_tree(self.cgroups)
            self.record.remove_cgroup(self.cgroups)
        self.cgroups = None

    def instance_cgroup(self, name: str) -> InstanceCgroup | None:
        """The device cgroup of a new instance (None: device_isolation='none')."""
        if self.cgroups is None:
            return None
        kind = BpfDeviceCgroup if self.isolation == "bpf" else DeviceCgroup
        return kind(self.cgroups, name)

    @property
    def block(self) -> int:
        assert self.record is not None
        return self.record.block

    def add_loop(self, device: str, loop: LoopId) -> None:
        if self.record is not None:
            self.record.add_loop(device, loop)

    def remove_loop(self, device: str) -> None:
        if self.record is not None:
            self.record.remove_loop(device)

    def close(self) -> None:
        """Release everything (after the hosts are dead); LocalCloudError if a mount stays."""
        errors: list[str] = []
        if self.root_disk is not None and self.root_disk.loop is not None:
            loop = self.root_disk.loop
            self.root_disk.detach()
            self.remove_loop(loop)
        self._remove_run_cgroup()
        if self.freezers is not None and self.record is not None:
            remove_cgroup_tree(self.freezers)
            self.record.remove_cgroup(self.freezers)
            self.freezers = None
        if self._roots_mounted:
            roots = self.state_dir / "roots"
            try:
                _unmount(roots)
                if self.record is not None:
                    self.record.remove_mount(roots)
            except LocalCloudError as e:
                errors.append(str(e))
        if self.store is not None:
            self._close_store(errors)
        if self.record is not None and not errors:
            if self.record.data["created_state_dir"]:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            else:
                for sub in (*SUBDIRS, *IMAGES, STORE):
                    shutil.rmtree(self.state_dir / sub, ignore_errors=True)
                for name in ("credentials", "root-disk.img", f"{STORE}.img"):
                    (self.state_dir / name).unlink(missing_ok=True)
            self.record.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise LocalCloudError("local cloud cleanup incomplete: " + "; ".join(errors))

    def _close_store(self, errors: list[str]) -> None:
        """Unmount the reflink store (its volumes' loop devices are free by now), then
        free its loop device."""
        assert self.store is not None
        if self.store.mounted:
            try:
                _unmount(self.store.mountpoint)
                self.store.mounted = False
                if self.record is not None:
                    self.record.remove_mount(self.store.mountpoint)
            except LocalCloudError as e:
                errors.append(str(e))
                return
        loop = self.store.loop
        self.store.detach()
        if loop is not None:
            self.remove_loop(loop)


def _unmount(path: Path) -> None:
    """Unmount ``path``; waits a little for dying namespaces, then detaches lazily."""
    umount = which("umount")
    deadline = time.monotonic() + 5
    while True:
        try:
            run(umount, path, what="umount")
            return
        except LocalCloudError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    with contextlib.suppress(LocalCloudError):
        run(umount, "--lazy", path, what="umount --lazy")
        return
    raise LocalCloudError(f"cannot unmount {path}")
