"""Volumes and snapshots as sparse image files, attached through loop devices."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from asyncstage.errors import LocalCloudError
from asyncstage.localcloud._registry import free_loop
from asyncstage.localcloud._system import run, which

GIB = 1 << 30
_DEVICE = re.compile(r"^/dev/(?:sd|xvd)([a-z]{1,2})$")


def xen_name(device: str) -> str | None:
    """The node name a Xen instance shows for the requested device: /dev/sdf -> xvdf."""
    m = _DEVICE.match(device)
    return f"xvd{m.group(1)}" if m else None


@dataclass
class Disk:
    """The image file behind one volume, and its loop device while attached."""

    volume_id: str
    image: Path
    loop: str | None = None
    rdev: int | None = None
    instance_id: str | None = None
    name: str | None = None  # node name inside the instance, e.g. "xvdf"

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
        out = run(which("losetup"), "--find", "--show", self.image, what="losetup")
        self.loop = out.strip()
        self.rdev = os.stat(self.loop).st_rdev
        return self.loop

    def detach(self) -> None:
        """Free the loop device (waits until the kernel has let go of it)."""
        if self.loop is not None:
            free_loop(self.loop, self.image)
        self.loop = self.rdev = None
        self.instance_id = self.name = None

    @property
    def major_minor(self) -> tuple[int, int] | None:
        return None if self.rdev is None else (os.major(self.rdev), os.minor(self.rdev))


def copy_sparse(source: Path, dest: Path) -> None:
    """Copy an image keeping its holes (``cp --sparse=always``)."""
    run(which("cp"), "--sparse=always", "--", source, dest, what="cp")
    os.chmod(dest, 0o600)
