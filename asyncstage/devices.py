"""EC2 block device names and attachment limits, by instance type.

EC2's "Device names on Linux instances" and "Amazon EBS volume limits for Amazon EC2
instances", as the library and the local cloud both need them:

- AttachVolume takes ``/dev/sd[a-z]`` and ``/dev/hd[a-z]``, each optionally with a
  partition number ``[1-15]``, ``/dev/xvd[a-z]`` and ``/dev/xvd[b-z][a-z]``; ``/dev/sda1``
  and ``/dev/xvda`` are the root device's.
- A Xen instance (families t2, m4, c4, m3, m1, r4 ...) shows the volume under the name it
  was attached as, ``sd`` turned into ``xvd`` (``/dev/sdf`` -> ``/dev/xvdf``, ``/dev/sdf1``
  -> ``/dev/xvdf1``). ``xvdf1`` is the first partition's minor of ``xvdf``: the names of
  one letter address one disk slot, so a Xen instance takes one name per slot.
- A Nitro instance (every newer family) shows it as ``/dev/nvme<N>n1``, ``N`` in no order
  a client may rely on, the volume id as the NVMe serial
  (``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...``): the name is only a label.
- Limits: most Nitro types take 28 attachments, shared between EBS volumes (the root one
  too), network interfaces and NVMe instance store volumes; the 7th/8th generation types
  of :data:`DEDICATED_FAMILIES` take 32 EBS volumes (more on the largest sizes), not
  shared. EC2 refuses more with ``AttachmentLimitExceeded``. Xen types have no API limit:
  AWS supports at most 40 volumes on Linux (more "on a best effort basis"), and the names
  bound them too.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

__all__ = [
    "DEDICATED_FAMILIES",
    "NVME_BY_ID",
    "XEN_FAMILIES",
    "AttachmentLimit",
    "attachment_limit",
    "device_names",
    "is_nitro",
    "nvme_link",
    "slot_of",
    "volume_slots",
    "xen_path",
]

NVME_BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
"""Where udev links an EBS volume on a Nitro instance, by its serial (the volume id)."""

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
"""Families that run on Xen; every other family is a Nitro one."""

DEDICATED_FAMILIES = frozenset(
    {
        "m7a",
        "m7i",
        "m7i-flex",
        "m8g",
        "c7a",
        "c7i",
        "c7i-flex",
        "c8g",
        "r7a",
        "r7i",
        "r7iz",
        "r8g",
        "x8g",
        "g6",
        "g6e",
        "gr6",
        "i7ie",
        "i8g",
        "f2",
        "p5",
        "p5e",
        "p5en",
        "trn2",
        "hpc7a",
    }
)
"""Nitro families with a dedicated EBS volume limit (not shared with network interfaces)."""

_DEDICATED_BY_SIZE = {
    "16xlarge": 48,
    "24xlarge": 64,
    "32xlarge": 88,
    "48xlarge": 128,
    "metal-16xl": 39,
    "metal-24xl": 39,
    "metal-32xl": 79,
    "metal-48xl": 79,
}
_DEDICATED_DEFAULT = 32  # medium ... 12xlarge
SHARED_NITRO_LIMIT = 28
XEN_VOLUME_LIMIT = 40

_NAME = re.compile(
    r"^(?:/dev/)?(?:(?:sd|hd)(?P<letter>[a-z])(?P<part>[1-9]|1[0-5])?|xvd(?P<xvd>[a-z]|[b-z][a-z]))$"
)


@dataclass(frozen=True)
class AttachmentLimit:
    """How many attachments an instance type takes."""

    attachments: int
    """EBS volumes (the root one included), plus network interfaces when ``shared``."""
    shared: bool
    """Network interfaces and NVMe instance store volumes count against it too."""
    enforced: bool
    """EC2 refuses more with ``AttachmentLimitExceeded`` (Xen: AWS's guidance only)."""


def _family_size(instance_type: str | None) -> tuple[str, str]:
    family, _, size = (instance_type or "m1.small").partition(".")
    return family, size


def is_nitro(instance_type: str | None) -> bool:
    """True for an instance type of a Nitro family (m1.small and other Xen ones: False)."""
    return _family_size(instance_type)[0] not in XEN_FAMILIES


def attachment_limit(instance_type: str | None) -> AttachmentLimit:
    """The attachment limit of an instance type (see the module's docstring)."""
    family, size = _family_size(instance_type)
    if family in XEN_FAMILIES:
        return AttachmentLimit(XEN_VOLUME_LIMIT, shared=False, enforced=False)
    if family in DEDICATED_FAMILIES:
        limit = _DEDICATED_BY_SIZE.get(size, _DEDICATED_DEFAULT)
        return AttachmentLimit(limit, shared=False, enforced=True)
    return AttachmentLimit(SHARED_NITRO_LIMIT, shared=True, enforced=True)


def device_names(nitro: bool) -> tuple[str, ...]:
    """The names offered for volumes, in order: ``/dev/sd[f-z]``, ``/dev/xvd[b-c][a-z]``
    (one per disk slot: 73), then, on Nitro where a name is only a label,
    ``/dev/sd[f-z][1-15]`` too."""
    letters = string.ascii_lowercase[5:]
    names = [f"/dev/sd{c}" for c in letters]
    names += [f"/dev/xvd{a}{b}" for a in "bc" for b in string.ascii_lowercase]
    if nitro:
        names += [f"/dev/sd{c}{n}" for c in letters for n in range(1, 16)]
    return tuple(names)


def volume_slots(instance_type: str | None, network_interfaces: int = 1) -> int:
    """How many volumes besides the root one an instance of this type takes at once."""
    limit = attachment_limit(instance_type)
    slots = limit.attachments - 1 - (network_interfaces if limit.shared else 0)
    return max(1, min(slots, len(device_names(is_nitro(instance_type)))))


def slot_of(device: str) -> str | None:
    """The disk slot a device name addresses on Xen (``/dev/sdf1`` -> ``f``,
    ``/dev/xvdba`` -> ``ba``); None for a name EC2 does not take."""
    m = _NAME.match(device)
    if m is None:
        return None
    return str(m["xvd"] or m["letter"])


def xen_path(device: str) -> str | None:
    """The node a Xen instance shows for an AttachVolume name (``/dev/sdf1`` ->
    ``/dev/xvdf1``); None for a name EC2 does not take."""
    m = _NAME.match(device)
    if m is None:
        return None
    return "/dev/xvd" + (m["xvd"] or m["letter"] + (m["part"] or ""))


def nvme_link(volume_id: str) -> str:
    """The by-id link of an EBS volume on a Nitro instance."""
    return NVME_BY_ID + volume_id.replace("-", "")
