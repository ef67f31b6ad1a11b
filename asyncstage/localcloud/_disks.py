"""Volumes and snapshots as sparse image files, attached through loop devices."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asyncstage.localcloud._registry import LoopId, free_loop
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError

GIB = 1 << 30
ROOT_DISK_GIB = 8  # EC2's default root volume size

Store = Literal["plain", "reflink"]
STORES: tuple[Store, ...] = ("plain", "reflink")


@dataclass
class Disk:
    """The image file behind one volume, and its loop device while attached."""

    volume_id: str
    image: Path
    loop: str | None = None
    loop_id: LoopId | None = None
    rdev: int | None = None
    instance_id: str | None = None
    name: str | None = None  # node name inside the instance, e.g. "xvdf" or "nvme3n1"
    serial: str | None = None  # the NVMe serial (its volume id) on a Nitro instance

    @classmethod
    def create(cls, volume_id: str, image: Path, size_gib: int) -> Disk:
        """A new sparse image of ``size_gib`` (one from a snapshot: :func:`copy_image`)."""
        try:
            image.touch(mode=0o600, exist_ok=False)
            os.truncate(image, size_gib * GIB)
        except OSError as e:
            image.unlink(missing_ok=True)
            raise LocalCloudError(f"{volume_id}: cannot create its image: {e}") from e
        return cls(volume_id, image)

    def attach(self, *, direct_io: bool = False) -> str:
        """Set up a loop device for the image; returns it (``/dev/loopN``). With
        ``direct_io`` (the reflink store's) the instance's filesystem is the only cache of
        its pages, as with EBS: new volumes fill much faster, with no second copy to write
        back. The plain store's images are copies made through the machine's page cache,
        which its loop devices read at once (direct I/O would write each copy back first
        and read its source from the disk)."""
        self.loop_id = LoopId.of(self.image)
        dio = ("--direct-io=on",) if direct_io else ()
        out = run(which("losetup"), "--find", "--show", *dio, self.image, what="losetup")
        self.loop = out.strip()
        self.rdev = os.stat(self.loop).st_rdev
        return self.loop

    def detach(self) -> None:
        """Free the loop device (waits until the kernel has let go of it)."""
        if self.loop is not None and self.loop_id is not None:
            free_loop(self.loop, self.loop_id)
        self.loop = self.rdev = self.loop_id = None
        self.instance_id = self.name = self.serial = None

    @property
    def major_minor(self) -> tuple[int, int] | None:
        return None if self.rdev is None else (os.major(self.rdev), os.minor(self.rdev))


@dataclass
class RootDisk:
    """The root block device every instance shows: one read-only, partitioned, empty disk.

    Instances boot from an overlay, not from a block device; this disk is there so that
    an instance has the root device nodes EC2's have (``/dev/xvda`` + ``xvda1``,
    ``/dev/nvme0n1`` + ``nvme0n1p1``), which clients look for to learn the naming scheme.
    """

    image: Path
    loop: str | None = None
    loop_id: LoopId | None = None
    rdev: int | None = None
    part_rdev: int | None = None

    def attach(self) -> str:
        """Make the image (sparse, one partition) and its read-only loop device."""
        with open(self.image, "wb") as f:
            f.write(_mbr(ROOT_DISK_GIB * GIB // 512))
            f.truncate(ROOT_DISK_GIB * GIB)
        os.chmod(self.image, 0o600)
        self.loop_id = LoopId.of(self.image)
        out = run(
            which("losetup"),
            "--find",
            "--show",
            "--read-only",
            "--partscan",
            self.image,
            what="losetup",
        )
        self.loop = out.strip()
        self.rdev = os.stat(self.loop).st_rdev
        name = Path(self.loop).name
        try:  # the kernel's partition of it; without one, the disk stands in for it
            dev = Path(f"/sys/block/{name}/{name}p1/dev").read_text().split(":")
            self.part_rdev = os.makedev(int(dev[0]), int(dev[1]))
        except (OSError, ValueError, IndexError):
            self.part_rdev = self.rdev
        return self.loop

    def detach(self) -> None:
        if self.loop is not None and self.loop_id is not None:
            free_loop(self.loop, self.loop_id)
        self.loop = self.loop_id = self.rdev = self.part_rdev = None


@dataclass
class ReflinkStore:
    """Where a run's volume and snapshot images live with ``store="reflink"``: an XFS
    filesystem (``reflink=1``) in a sparse file of the state dir, on a loop device of its
    own, mounted at ``mountpoint`` (``discard``: what is deleted in it is given back).

    A snapshot, or a volume made from one, then shares its source's blocks at once
    (``FICLONE``), as EBS keeps snapshots incremental and makes a volume from a
    snapshot available at once; in a state dir on ext4 each is a copy of its data.
    """

    image: Path
    mountpoint: Path
    loop: str | None = None
    loop_id: LoopId | None = None
    mounted: bool = False

    def attach(self) -> str:
        """Make the filesystem (sparse, as large as the state dir's free space) and its
        loop device (direct I/O: the pages are cached once, in the images' filesystem)."""
        size = max(shutil.disk_usage(self.image.parent).free, GIB)
        with open(self.image, "wb") as f:
            f.truncate(size)
        os.chmod(self.image, 0o600)
        run(which("mkfs.xfs"), "-q", "-f", "-m", "reflink=1", self.image, what="mkfs.xfs")
        self.loop_id = LoopId.of(self.image)
        out = run(
            which("losetup"), "--find", "--show", "--direct-io=on", self.image, what="losetup"
        )
        self.loop = out.strip()
        return self.loop

    def mount(self) -> None:
        assert self.loop is not None
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        run(
            which("mount"),
            "-t",
            "xfs",
            "-o",
            "discard,nodev,nosuid,noexec",
            self.loop,
            self.mountpoint,
            what="mount",
        )
        self.mounted = True

    def detach(self) -> None:
        if self.loop is not None and self.loop_id is not None:
            free_loop(self.loop, self.loop_id)
        self.loop = self.loop_id = None


def _mbr(sectors: int) -> bytes:
    """A DOS partition table with one Linux partition from sector 2048 to the end."""
    entry = struct.pack(
        "<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", 2048, sectors - 2048
    )
    return b"\0" * 440 + os.urandom(4) + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa"


BLKFLSBUF = 0x1261  # linux/fs.h: _IO(0x12, 97)


def flush_loop(loop: str) -> None:
    """Write what was written to ``loop`` into its image: the device's buffers, and the
    filesystem mounted on it synced (the kernel syncs a holder's filesystem on
    ``BLKFLSBUF``); what reaches the image file is then read by any copy of it."""
    fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_CLONE = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
_NO_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_RUN = 64 << 20  # bytes per copy_file_range call: how soon a stop is seen


class CopyStopped(Exception):
    """:func:`copy_image` was asked to stop (its target deleted, the cloud closed)."""


def copy_image(source: int, dest: int, stop: threading.Event, size: int = 0) -> tuple[int, bool]:
    """Copy the image open at ``source`` into the empty file open at ``dest``, holes kept,
    the kernel doing the work; ``dest`` is at least ``size`` bytes long afterwards. The
    bytes of data copied (those a reflink shares: the source's allocated bytes), and
    whether the copy shares the source's blocks (a reflink).

    A reflink (``FICLONE``: xfs, btrfs) shares the blocks at once; elsewhere (ext4) each
    data run that ``SEEK_DATA``/``SEEK_HOLE`` find is copied by ``copy_file_range``, so
    the holes of a sparse image cost nothing. Raises :class:`CopyStopped` when ``stop``
    is set between two runs, ``OSError`` when the copy fails.
    """
    info = os.fstat(source)
    length = info.st_size
    try:
        fcntl.ioctl(dest, FICLONE, source)
        copied, cloned = info.st_blocks * 512, True
    except OSError as e:
        if e.errno not in _NO_CLONE:
            raise
        copied, cloned = _copy_runs(source, dest, length, stop), False
    if os.fstat(dest).st_size < max(size, length):
        os.ftruncate(dest, max(size, length))
    return copied, cloned


def _copy_runs(source: int, dest: int, length: int, stop: threading.Event) -> int:
    ranged = True
    at = copied = 0
    while at < length:
        try:
            start = os.lseek(source, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return copied  # only a hole is left
            raise
        end = os.lseek(source, start, os.SEEK_HOLE)
        while start < end:
            if stop.is_set():
                raise CopyStopped
            count = min(_RUN, end - start)
            if ranged:
                try:
                    done = os.copy_file_range(source, dest, count, start, start)
                except OSError as e:
                    if e.errno not in _NO_RANGE:
                        raise
                    ranged = False  # a kernel or filesystem without it: read and write
                    continue
            else:
                done = os.pwrite(dest, os.pread(source, min(count, 1 << 20), start), start)
            if done <= 0:
                return copied  # the source ended early
            start += done
            copied += done
        at = end
    return copied
