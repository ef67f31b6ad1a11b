"""The local cloud's errors: a tree of their own, apart from the library's.

The library (:mod:`asyncstage.errors`) speaks of EC2, ssh, volumes and transfers, on AWS
as on the local cloud; these say that the local cloud itself could not start or do what
was asked.

::

    LocalCloudError
    ├── NeedsRoot
    ├── StateDirInUse          another local cloud runs on that state dir
    └── NoDeviceIsolation      neither device cgroup mechanism works here (names
                               what is missing)
"""

from __future__ import annotations

__all__ = ["LocalCloudError", "NeedsRoot", "NoDeviceIsolation", "StateDirInUse"]


class LocalCloudError(Exception):
    """The embedded local cloud could not start or do what was asked."""


class NeedsRoot(LocalCloudError):
    """The local cloud needs root (namespaces, mounts, loop devices)."""


class StateDirInUse(LocalCloudError):
    """Another local cloud runs on this state dir (each cloud locks its own)."""


class NoDeviceIsolation(LocalCloudError):
    """The machine offers no way to keep instances off its disks: no cgroup v1 ``devices``
    controller and no cgroup v2 device BPF (the message names what is missing). Start
    the cloud with ``device_isolation="none"`` to accept the weaker isolation."""
