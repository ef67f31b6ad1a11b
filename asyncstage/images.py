"""Images: finding the image servers launch from, and copies of images and snapshots
to other regions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol

import anyio

from asyncstage.ec2 import EC2, Resource, tag, tag_filters, tags_of
from asyncstage.errors import EC2Error, UnknownImage, UnknownSnapshot
from asyncstage.names import is_valid_user

__all__ = ["UBUNTU_OWNER", "UBUNTU_PATTERN", "Images", "user_for_image"]

UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_PATTERN = "ubuntu/images/hvm-ssd*/ubuntu-*-24.04-*-server-*"


class _HasEC2(Protocol):
    """A Manager, as a copy's destination."""

    @property
    def ec2(self) -> EC2: ...


def user_for_image(image: Resource) -> str:
    """The login user an image's name suggests (``ubuntu``, ``admin``, ``ec2-user`` ...)."""
    user = tags_of(image).get(tag("user"))
    if user and is_valid_user(user):  # a tag anybody may write never reaches ssh unchecked
        return user
    name = f"{image.get('Name', '')} {image.get('Description', '')}".lower()
    for word, login in (
        ("ubuntu", "ubuntu"),
        ("debian", "admin"),
        ("amzn", "ec2-user"),
        ("amazon", "ec2-user"),
        ("al20", "ec2-user"),
        ("centos", "centos"),
        ("fedora", "fedora"),
        ("rhel", "ec2-user"),
        ("suse", "ec2-user"),
    ):
        if word in name:
            return login
    return "ubuntu"


class Images:
    """Image lookups of one region (cached per pattern), and cross-region copies.

    ``ec2_options`` are the EC2 client options a copy to another region uses.
    """

    def __init__(
        self,
        ec2: EC2,
        image: str | None,
        image_owners: Sequence[str] | None,
        root_type: str | None,
        ec2_options: dict[str, Any],
    ) -> None:
        self.ec2 = ec2
        self.image = image
        self.image_owners = list(image_owners) if image_owners is not None else None
        self.root_type = root_type
        self._ec2_options = ec2_options
        self._found: dict[tuple[str, str | None, str | None], Resource] = {}

    async def find(self, image: str | None, architecture: str | None) -> Resource:
        """The description of ``image`` (an id or name pattern; default: the manager's
        image, else the newest Ubuntu 24.04) for this architecture (UnknownImage if none)."""
        pattern = image or self.image
        owners: Sequence[str] = self.image_owners or ()
        if pattern is None:
            pattern = UBUNTU_PATTERN
            owners = self.image_owners if self.image_owners is not None else [UBUNTU_OWNER]
        key = (pattern, architecture, self.root_type)
        if key not in self._found:
            try:
                self._found[key] = await self.ec2.find_image(
                    pattern, owners=owners, architecture=architecture, root_type=self.root_type
                )
            except EC2Error as e:
                if e.code != "InvalidAMIID.NotFound" or isinstance(e, UnknownImage):
                    raise
                raise UnknownImage(str(e), code=e.code, operation=e.operation) from e
        return self._found[key]

    async def snapshots(self, name: str | None = None) -> list[Resource]:
        """The staging snapshots (of volumes named ``name``), newest first, failed ones left out."""
        role = tag_filters({tag("role"): "snapshot"})
        if name:  # a fleet's backups list theirs at once: one call for all
            snaps = await self.ec2.describe_tagged_shared(
                "snapshots", tag("name"), name, filters=role
            )
        else:
            snaps = await self.ec2.describe_snapshots(filters=role)
        # StartTime has whole seconds at best: our own tag breaks ties
        return sorted(
            (s for s in snaps if s.get("State") != "error"),
            key=lambda s: (str(s.get("StartTime", "")), tags_of(s).get(tag("created"), "")),
            reverse=True,
        )

    @contextlib.asynccontextmanager
    async def _destination(self, region_or_manager: str | _HasEC2) -> AsyncIterator[EC2]:
        """The destination's EC2 client, open; closed afterwards when it was made here."""
        own = isinstance(region_or_manager, str)
        if isinstance(region_or_manager, str):
            dest = EC2(region=region_or_manager, **self._ec2_options)
        else:
            dest = region_or_manager.ec2
        try:
            await dest.open()
            yield dest
        finally:
            if own:
                with anyio.CancelScope(shield=True):
                    await dest.close()

    async def copy_snapshot(
        self,
        snapshot: str,
        region_or_manager: str | _HasEC2,
        *,
        description: str | None,
        timeout: float,
    ) -> str:
        """Copy a snapshot to another region (or manager); the copy's id, completed."""
        missing = UnknownSnapshot(f"snapshot {snapshot} does not exist")
        snap = await _first(self.ec2.describe_snapshots([str(snapshot)]), missing)
        async with self._destination(region_or_manager) as dest:
            new_id = await dest.copy_snapshot(
                str(snapshot),
                source_region=self.ec2.region,
                description=description or str(snap.get("Description", "")),
                tags=tags_of(snap),  # in the copy call: no CreateTags racing the new id
            )
            await dest.wait_for_snapshot(new_id, timeout=timeout)
        return new_id

    async def copy_image(
        self,
        image: str,
        region_or_manager: str | _HasEC2,
        *,
        name: str | None,
        description: str | None,
        timeout: float,
        **register_options: Any,
    ) -> str:
        """Copy an image to another region (or manager); the copy's id, once available."""
        missing = UnknownImage(f"image {image} does not exist", code="InvalidAMIID.NotFound")
        found = await _first(self.ec2.describe_images([str(image)]), missing)
        async with self._destination(region_or_manager) as dest:
            new_id = await dest.copy_image(
                str(image),
                source_region=self.ec2.region,
                name=name or str(found.get("Name", image)),
                description=description or str(found.get("Description", "")),
                **register_options,
            )
            await dest.wait_for_image(new_id, timeout=timeout)
        return new_id


async def _first(described: Awaitable[list[Resource]], missing: Exception) -> Resource:
    """The first of EC2's descriptions; ``missing`` raised when there is none."""
    found = await described
    if not found:
        raise missing
    return found[0]
