"""How EC2 names block devices, by instance type: Xen (``xvdX``) or Nitro (NVMe).

The names AttachVolume takes, the families and the attachment limits are EC2's, as
:mod:`asyncstage.devices` has them (the library follows the same rules). Inside a Xen
instance (families t2, m4, c4, m3, m1, r4 ...) a volume shows as ``/dev/xvd...``
(``/dev/sdf`` -> ``xvdf``, ``/dev/sdf1`` -> ``xvdf1``); inside a Nitro instance (every
newer family) as ``/dev/nvme<N>n1`` with ``N`` not in attach order, its volume id the NVMe
serial (``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...``). The root device is
``/dev/xvda`` + ``xvda1`` on Xen, ``/dev/nvme0n1`` + ``nvme0n1p1`` on Nitro; EC2 calls it
``/dev/xvda`` (``RootDeviceName``) either way.
"""

from __future__ import annotations

import re

from asyncstage.devices import XEN_FAMILIES, attachment_limit, is_nitro, xen_path

__all__ = [
    "ROOT_DEVICE_NAME",
    "XEN_FAMILIES",
    "attachment_refusal",
    "is_nitro",
    "nvme_node",
    "root_nodes",
    "xen_node",
]

ROOT_DEVICE_NAME = "/dev/xvda"


def xen_node(device: str) -> str | None:
    """The node a Xen instance shows for an AttachVolume device name; None if EC2 refuses it.

    ``/dev/sdf`` -> ``xvdf``, ``/dev/sdf1`` -> ``xvdf1``, ``/dev/xvdbc`` -> ``xvdbc``.
    """
    path = xen_path(device)
    if path is None:
        return None
    node = path.removeprefix("/dev/")
    if re.fullmatch(r"xvda\d*", node):
        return None  # the root device and its partitions
    return node


def attachment_refusal(instance_type: str, volumes: int, interfaces: int) -> str | None:
    """EC2's AttachmentLimitExceeded message when an instance of this type with this many
    EBS volumes (the root one included) and network interfaces takes no more; else None."""
    limit = attachment_limit(instance_type)
    used = volumes + (interfaces if limit.shared else 0)
    if not limit.enforced or used < limit.attachments:
        return None
    what = "EBS volumes, network interfaces and NVMe instance store volumes"
    return (
        f"an instance of type {instance_type} takes at most {limit.attachments} "
        f"{what if limit.shared else 'EBS volumes'} ({used} attached)"
    )


def root_nodes(nitro: bool) -> tuple[str, str]:
    """(disk, first partition) node names of the root device."""
    return ("nvme0n1", "nvme0n1p1") if nitro else ("xvda", "xvda1")


def nvme_node(number: int) -> str:
    return f"nvme{number}n1"
