"""EC2's eventual consistency: an id a create call returned is unknown for a moment.

For a window drawn per id (``Realism.consistency``, from the cloud's seeded generator) a
new instance, volume, snapshot, security group or image is, as on EC2, answered with
its ``...NotFound`` error by every call naming it (Describe* by id, CreateTags,
AttachVolume, ...), and silently left out of the describes that list or filter
(``Filter.N.Value.M`` naming it finds nothing). Thread-safe.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from xml.dom import minidom

# The create actions and the response element naming what they made.
_CREATES: Mapping[str, str] = {
    "RunInstances": "instanceId",
    "CreateVolume": "volumeId",
    "CreateSnapshot": "snapshotId",
    "CopySnapshot": "snapshotId",
    "CreateSecurityGroup": "groupId",
    "CopyImage": "imageId",
    "CreateImage": "imageId",
}

# id prefix -> EC2's error code and message (the message for several ids, for one).
_NOT_FOUND: Mapping[str, tuple[str, str, str]] = {
    "i-": (
        "InvalidInstanceID.NotFound",
        "The instance IDs '{}' do not exist",
        "The instance ID '{}' does not exist",
    ),
    "vol-": (
        "InvalidVolume.NotFound",
        "The volumes '{}' do not exist.",
        "The volume '{}' does not exist.",
    ),
    "snap-": (
        "InvalidSnapshot.NotFound",
        "The snapshots '{}' do not exist.",
        "The snapshot '{}' does not exist.",
    ),
    "sg-": (
        "InvalidGroup.NotFound",
        "The security groups '{}' do not exist",
        "The security group '{}' does not exist",
    ),
    "ami-": (
        "InvalidAMIID.NotFound",
        "The image ids '[{}]' do not exist",
        "The image id '[{}]' does not exist",
    ),
}

# Describe action -> (the element listing its resources, the element naming each one).
_LISTS: Mapping[str, tuple[str, str]] = {
    "DescribeInstances": ("instancesSet", "instanceId"),
    "DescribeInstanceStatus": ("instanceStatusSet", "instanceId"),
    "DescribeVolumes": ("volumeSet", "volumeId"),
    "DescribeVolumeStatus": ("volumeStatusSet", "volumeId"),
    "DescribeSnapshots": ("snapshotSet", "snapshotId"),
    "DescribeSecurityGroups": ("securityGroupInfo", "groupId"),
    "DescribeImages": ("imagesSet", "imageId"),
    "DescribeTags": ("tagSet", "resourceId"),
}


def created_ids(action: str, body: bytes) -> list[str]:
    """The ids a successful create call's response names."""
    element = _CREATES.get(action)
    if element is None:
        return []
    found = re.findall(rf"<{element}>([^<]+)</{element}>".encode(), body)
    ids = list(dict.fromkeys(i.decode() for i in found))
    return ids if action == "RunInstances" else ids[:1]


class Consistency:
    """Which new ids are not visible yet, and what the API answers about them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._visible_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def created(self, ids: list[str], windows: list[float]) -> None:
        """These ids were just made; each becomes visible after its window (seconds)."""
        now = self._clock()
        with self._lock:
            for resource_id, window in zip(ids, windows, strict=True):
                if window > 0:
                    self._visible_at[resource_id] = now + window

    def hidden(self) -> frozenset[str]:
        """The ids not visible yet (forgetting those whose window has passed)."""
        now = self._clock()
        with self._lock:
            for resource_id in [i for i, t in self._visible_at.items() if t <= now]:
                del self._visible_at[resource_id]
            return frozenset(self._visible_at)

    def refusal(self, params: Mapping[str, str], hidden: frozenset[str]) -> tuple[str, str] | None:
        """EC2's NotFound (code, message) for a request naming a hidden id, else None.

        Filters naming one are not refused: the describe leaves it out (:meth:`leave_out`).
        """
        if not hidden:
            return None
        named = [v for k, v in params.items() if v in hidden and not k.startswith("Filter.")]
        if not named:
            return None
        prefix = next((p for p in _NOT_FOUND if named[0].startswith(p)), "")
        if not prefix:
            return None
        same = list(dict.fromkeys(i for i in named if i.startswith(prefix)))
        code, several, one = _NOT_FOUND[prefix]
        return code, (one if len(same) == 1 else several).format(", ".join(same))

    def leave_out(self, action: str, body: bytes, hidden: frozenset[str]) -> bytes:
        """A describe's response without the resources that are hidden."""
        spec = _LISTS.get(action)
        if spec is None or not hidden or not any(i.encode() in body for i in hidden):
            return body
        list_tag, id_tag = spec
        doc = minidom.parseString(body)
        for listing in doc.getElementsByTagName(list_tag):
            for item in _children(listing, "item"):
                names = _children(item, id_tag)
                if names and _text(names[0]) in hidden:
                    listing.removeChild(item)
        if action == "DescribeInstances":  # a reservation of hidden instances only: gone
            for reservations in doc.getElementsByTagName("reservationSet"):
                for item in _children(reservations, "item"):
                    sets = _children(item, "instancesSet")
                    if sets and not _children(sets[0], "item"):
                        reservations.removeChild(item)
        return doc.toxml(encoding="UTF-8")


def _children(node: minidom.Node, tag: str) -> list[minidom.Element]:
    return [c for c in node.childNodes if isinstance(c, minidom.Element) and c.tagName == tag]


def _text(node: minidom.Element) -> str:
    return "".join(c.data for c in node.childNodes if isinstance(c, minidom.Text)).strip()
