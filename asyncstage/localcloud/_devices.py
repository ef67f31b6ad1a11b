"""How EC2 names block devices, by instance type: Xen (``xvdX``) or Nitro (NVMe).

AttachVolume takes the names EC2's "Device names on Linux instances" lists: ``/dev/sd[a-z]``
and ``/dev/hd[a-z]``, each optionally with a partition number ``[1-15]``, ``/dev/xvd[a-z]``
and ``/dev/xvd[b-z][a-z]``; ``/dev/sda1`` and ``/dev/xvda`` are the root device's. Inside a
Xen instance (families t2, m4, c4, m3, m1, r4 ...) the volume then shows as ``/dev/xvd...``
(``/dev/sdf`` -> ``xvdf``, ``/dev/sdf1`` -> ``xvdf1``); inside a Nitro instance (every
newer family) as ``/dev/nvme<N>n1`` with ``N`` not in attach order, its volume id the NVMe
serial (``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...``). The root device is
``/dev/xvda`` + ``xvda1`` on Xen, ``/dev/nvme0n1`` + ``nvme0n1p1`` on Nitro; EC2 calls it
``/dev/xvda`` (``RootDeviceName``) either way.
"""

from __future__ import annotations

import re

ROOT_DEVICE_NAME = "/dev/xvda"
# Families that run on Xen; every other family is a Nitro one.
XEN_FAMILIES = frozenset(
    {
        "t1",
        "t2",
        "m1",
        "m2",
        "m3",
        "m4",
        "c1",
        "c3",
        "c4",
        "r3",
        "r4",
        "i2",
        "d2",
        "g2",
        "g3",
        "p2",
        "p3",
        "x1",
        "x1e",
        "f1",
        "h1",
        "cc2",
        "cr1",
        "hs1",
    }
)
_ATTACH_NAME = re.compile(
    r"^(?:/dev/)?(?:"
    r"(?P<sd>(?:sd|hd)[a-z])(?P<part>[1-9]|1[0-5])?"
    r"|(?P<xvd>xvd[a-z]|xvd[b-z][a-z])"
    r")$"
)


def is_nitro(instance_type: str | None) -> bool:
    """True for an instance type of a Nitro family (m1.small and other Xen ones: False)."""
    family = (instance_type or "m1.small").split(".", 1)[0]
    return family not in XEN_FAMILIES


def xen_node(device: str) -> str | None:
    """The node a Xen instance shows for an AttachVolume device name; None if EC2 refuses it.

    ``/dev/sdf`` -> ``xvdf``, ``/dev/sdf1`` -> ``xvdf1``, ``/dev/xvdbc`` -> ``xvdbc``.
    """
    m = _ATTACH_NAME.match(device)
    if m is None:
        return None
    node = str(m["xvd"]) if m["xvd"] else "xvd" + m["sd"][2:] + (m["part"] or "")
    if re.fullmatch(r"xvda\d*", node):
        return None  # the root device and its partitions
    return node


def root_nodes(nitro: bool) -> tuple[str, str]:
    """(disk, first partition) node names of the root device."""
    return ("nvme0n1", "nvme0n1p1") if nitro else ("xvda", "xvda1")


def nvme_node(number: int) -> str:
    return f"nvme{number}n1"
