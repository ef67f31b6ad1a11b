"""Volumes and snapshots as sparse image files, attached through loop devices."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from asyncstage.localcloud._registry import LoopId, free_loop
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError

GIB = 1 << 30
ROOT_DISK_GIB = 8  # EC2's default root volume size


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
    def create(cls, volume_id: str, image: Path, size_gib: int, source: Path | None) -> Disk:
        """A new sparse image of ``size_gib``; a copy of ``source`` (grown) when given."""
        try:
            if source is not None:
                copy_sparse(source, image)
            else:
                image.touch(mode=0o600, exist_ok=False)
            if image.stat().st_size < size_gib * GIB:
                os.truncate(image, size_gib * GIB)
        except OSError as e:
            image.unlink(missing_ok=True)
            raise LocalCloudError(f"{volume_id}: cannot create its image: {e}") from e
        return cls(volume_id, image)

    def attach(self) -> str:
        """Set up a loop device for the image; returns it (``/dev/loopN``)."""
        self.loop_id = LoopId.of(self.image)
        out = run(which("losetup"), "--find", "--show", self.image, what="losetup")
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


def _mbr(sectors: int) -> bytes:
    """A DOS partition table with one Linux partition from sector 2048 to the end."""
    entry = struct.pack(
        "<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", 2048, sectors - 2048
    )
    return b"\0" * 440 + os.urandom(4) + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa"


def copy_sparse(source: Path, dest: Path) -> None:
    """Copy an image keeping its holes (``cp --sparse=always``)."""
    run(which("cp"), "--sparse=always", "--", source, dest, what="cp")
    os.chmod(dest, 0o600)
