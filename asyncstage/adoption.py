"""Which EC2 resources a manager adopts, and what it reads from their tags.

Tags can be written by anybody with access to the account, so a resource is
adopted (scanned into a manager, mounted, written to, deleted on exit) only when

- it carries this library's role tag, and
- it is ours: an instance launched with a key pair whose private key is in our
  dot directory (so we made it, or a manager sharing our keys did), a volume or
  snapshot whose ``asyncstage:owner`` tag names such a key pair (the manager
  writes that tag in the create call), and
- every tag we would use passes the naming rules (:mod:`asyncstage.names`): the
  name, the login user, the mount point, the filesystem type.

:func:`refusal` says why a resource is not adopted (or None); the manager logs
it as a warning and leaves the resource alone.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import InvalidArgument
from asyncstage.names import check_mount_point, check_name, check_user

__all__ = ["OWNER_TAG", "Kind", "creation_tags", "extra_tags", "ours", "owner_tags", "refusal"]

OWNER_TAG = tag("owner")
"""The tag naming the EC2 key pair of the manager that made a volume or snapshot."""

Kind = Literal["server", "volume", "snapshot"]

log = logging.getLogger("asyncstage")

R = TypeVar("R", bound=Mapping[str, Any])


def owner_tags(key_name: str | None) -> dict[str, str]:
    """The owner tag a manager with this key pair writes into its create calls."""
    return {OWNER_TAG: key_name} if key_name else {}


extra_tags: ContextVar[Mapping[str, str] | None] = ContextVar("asyncstage_extra_tags", default=None)
"""Tags that volumes and snapshots made in this context carry from their create call on.

A backup run sets its run tags here, so that a work volume or snapshot is marked as its
own atomically: a controller killed right after the create leaves nothing unmarked."""


def creation_tags(key_name: str | None) -> dict[str, str]:
    """The owner tag and this context's :data:`extra_tags`, for a create call."""
    return {**(extra_tags.get() or {}), **owner_tags(key_name)}


def _owner_of(kind: Kind, resource: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    if kind == "server":
        return str(resource.get("KeyName") or "")
    return tags.get(OWNER_TAG, "")


def refusal(
    kind: Kind,
    resource: Mapping[str, Any],
    *,
    keys: Collection[str],
    fstypes: Collection[str] = (),
) -> str | None:
    """Why ``resource`` (an EC2 description) must not be adopted, or None when it may.

    ``keys`` are the EC2 key pair names whose private keys this manager holds;
    ``fstypes`` the filesystem types it knows (an ``asyncstage:fstype`` tag outside
    them is refused; empty: not checked).
    """
    tags = tags_of(resource)
    rid = resource.get("InstanceId") or resource.get("VolumeId") or resource.get("SnapshotId")
    what = f"{kind} {rid}"
    if tags.get(tag("role")) != kind:
        return f"{what} does not carry the tag {tag('role')}={kind}"
    owner = _owner_of(kind, resource, tags)
    if owner not in keys:
        by = "its key pair" if kind == "server" else f"its tag {OWNER_TAG}"
        return (
            f"{what} is not ours: {by} is {owner or 'missing'!r}, not a key of this "
            "manager's dot directory"
        )
    try:
        if tag("name") in tags:
            check_name(tags[tag("name")], kind)
        if kind == "server" and tag("user") in tags:
            check_user(tags[tag("user")])
        if kind == "volume" and tags.get(tag("mtpt")):
            check_mount_point(tags[tag("mtpt")])
    except InvalidArgument as e:
        return f"{what} has a tag that breaks the naming rules: {e}"
    fstype = tags.get(tag("fstype"))
    if fstypes and fstype and fstype not in fstypes:
        return f"{what} has an unknown filesystem type tag {fstype[:40]!r}"
    return None


def ours(
    kind: Kind,
    resources: Iterable[R],
    *,
    keys: Collection[str],
    fstypes: Collection[str] = (),
    level: int = logging.WARNING,
) -> list[R]:
    """The resources that may be adopted; each refused one is logged (at ``level``) with why."""
    found: list[R] = []
    for resource in resources:
        why = refusal(kind, resource, keys=keys, fstypes=fstypes)
        if why is None:
            found.append(resource)
        else:
            log.log(level, "not adopted: %s", why)
    return found
