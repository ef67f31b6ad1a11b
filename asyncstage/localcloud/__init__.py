"""The embedded local cloud: an EC2-compatible endpoint with real hosts and disks.

::

    from asyncstage.localcloud import LocalCloud

    async with LocalCloud() as cloud:
        session = aioboto3.Session()
        async with session.client("ec2", **cloud.session_kwargs()) as ec2:
            ...

Instances are isolated hosts on this machine (mount, pid and uts namespaces, a
copy-on-write overlay of ``/``, their own sshd), each in a network namespace of its own
on a VPC-like network: private addresses on the VPC's bridge, public ones from
198.18.0.0/15 through the cloud's router (``network="loopback"``: loopback addresses
instead); volumes are sparse image files attached as loop devices. Needs root.
``python -m asyncstage.localcloud`` runs one in the foreground.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncstage._lazy import lazy_names

if TYPE_CHECKING:
    from asyncstage.localcloud._cloud import LocalCloud
    from asyncstage.localcloud._realism import Realism
    from asyncstage.localcloud.errors import StateDirInUse as StateDirInUse

__all__ = ["LocalCloud", "Realism"]

# The cloud imports moto, its hosts and disks: they are imported when first named, so that
# the command line (and the library's errors) can read asyncstage.localcloud.errors without.
_LAZY = {
    "LocalCloud": "asyncstage.localcloud._cloud",
    "Realism": "asyncstage.localcloud._realism",
    "StateDirInUse": "asyncstage.localcloud.errors",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
