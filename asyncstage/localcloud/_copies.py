"""CopySnapshot and CopyImage, within a region or across regions, by EC2's rules.

:class:`RegionCopies` is the part of the EC2 backend (:class:`._moto.LocalBackend`) that
copies: a copy reads its source from this region's backend or another region's (the API's
``peers``), is ``pending`` for a while, and is encrypted as EC2 encrypts it (the source's
encryption, ``Encrypted``, ``KmsKeyId`` of the destination region, the region's encryption
by default and its default key). A copy of the local image boots as the image does.

Everything here runs in the server's request threads under ``engine.lock``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from moto.ec2.models import EC2Backend
from moto.ec2.models.amis import Ami

from asyncstage.localcloud import _kms
from asyncstage.localcloud._hooks import EngineHooks
from asyncstage.localcloud._records import (
    LocalSnapshot,
    ec2_error,
    install_backend,
    retype,
    snapshot_data,
    start_snapshot,
)


class _LocalImage(Ami):
    """A copied image: ``pending`` for ``duration`` seconds, then ``available``."""

    started = 0.0
    duration = 0.0
    boots_local = False  # a copy of the local image: RunInstances boots it

    @property
    def state(self) -> str:
        if time.monotonic() < self.started + self.duration:
            return "pending"
        return str(self.__dict__.get("_state", "available"))

    @state.setter
    def state(self, value: str) -> None:
        self.__dict__["_state"] = value


def _true(value: str | None) -> bool:
    return str(value or "").lower() == "true"


def _tag_specifications(request: Mapping[str, str], kind: str) -> dict[str, str]:
    """The tags that ``TagSpecification.N`` of the request gives resources of ``kind``."""
    tags: dict[str, str] = {}
    n = 1
    while f"TagSpecification.{n}.ResourceType" in request:
        if request[f"TagSpecification.{n}.ResourceType"] == kind:
            m = 1
            while f"TagSpecification.{n}.Tag.{m}.Key" in request:
                key = request[f"TagSpecification.{n}.Tag.{m}.Key"]
                tags[key] = request.get(f"TagSpecification.{n}.Tag.{m}.Value", "")
                m += 1
        n += 1
    return tags


class RegionCopies(EC2Backend):
    """EC2's CopySnapshot and CopyImage, for the local cloud's backend."""

    # given by the backend (:class:`._moto.LocalBackend`)
    engine: EngineHooks | None
    image_id: str
    request: Mapping[str, str]
    peers: Callable[[str], RegionCopies] | None
    _launching: bool

    def copy_snapshot(
        self,
        source_snapshot_id: str,
        source_region: str,
        description: str,
        kms_key_id: str | None,
    ) -> Any:
        """EC2's CopySnapshot, within the region or from ``source_region`` into this one.

        The copy is ``pending`` for longer the more data the source holds
        (``realism.copy_per_gib``); it is encrypted when the source is or ``Encrypted``
        is asked, with ``KmsKeyId`` (a key of this region) or this region's default key.
        """
        engine = self.engine
        if engine is None:
            return super().copy_snapshot(source_snapshot_id, source_region, description, kms_key_id)
        home = self._source_backend(source_region)
        source = home.get_snapshot(source_snapshot_id)
        encrypted, key = _copy_encryption(self, source, self.request)
        image = snapshot_data(engine, source)
        install_backend(home)  # moto reads the source from its registry
        snapshot = super().copy_snapshot(
            source_snapshot_id, home.region_name, description, kms_key_id
        )
        if key is not None and _kms.key_arn(self.account_id, self.region_name, key) is None:
            # EC2 checks the key after accepting the copy, which then fails (state error)
            retype(snapshot, LocalSnapshot)
            failed: Any = snapshot
            failed.status = "error"
            failed.state_message = f"KMS key {key} does not exist in {self.region_name}"
            failed.encrypted, failed.kms_key_id = True, key
            return snapshot
        snapshot.encrypted, snapshot.kms_key_id = encrypted, key
        used = image.stat().st_blocks * 512 / (1 << 30)  # the data, not the sparse size
        start_snapshot(self, engine, snapshot, image, extra=used * engine.realism.copy_per_gib)
        return snapshot

    def _boots(self, image_id: str) -> bool:
        """Whether ``image_id`` is a copy of the local image (RunInstances boots it)."""
        image = self.amis.get(image_id)
        if not isinstance(image, _LocalImage) or not image.boots_local:
            return False
        if image.state != "available":
            raise ec2_error(
                "InvalidAMIID.Unavailable", f"Image '{image_id}' is not available (it is pending)"
            )
        return True

    def copy_image(
        self,
        source_image_id: str,
        source_region: str,
        name: str | None = None,
        description: str | None = None,
    ) -> Any:
        """EC2's CopyImage: ``pending`` for a while, then ``available``; the source's tags
        only with ``CopyImageTags=true``, plus those of ``TagSpecifications``. A copy of
        the local image (or of a copy of it) boots as the image does."""
        engine = self.engine
        if engine is None:
            return super().copy_image(source_image_id, source_region, name, description)
        home = self._source_backend(source_region)
        source = home.describe_images(ami_ids=[source_image_id])[0]
        install_backend(home)  # moto reads the source from its registry
        self._launching = True  # moto's record of a root volume and snapshot: no disk
        try:
            image = super().copy_image(source_image_id, home.region_name, name, description)
        finally:
            self._launching = False
        retype(image, _LocalImage)
        local: Any = image
        local.boots_local = source_image_id == home.image_id or bool(
            getattr(source, "boots_local", False)
        )
        local.started = time.monotonic()
        low, high = engine.realism.snapshot
        local.duration = engine.random.uniform(low, high) if high > 0 else 0.0
        tags: dict[str, str] = {}
        if _true(self.request.get("CopyImageTags")):
            tags = {str(t["key"]): str(t["value"]) for t in source.get_tags()}
        tags.update(_tag_specifications(self.request, "image"))
        if tags:
            self.create_tags([image.id], tags)
        return image

    def _source_backend(self, source_region: str) -> RegionCopies:
        """The backend a copy reads from: this one, or ``source_region``'s."""
        if not source_region or source_region == self.region_name:
            return self
        if self.peers is None:
            raise ec2_error("UnsupportedOperation", "the local cloud has no other region")
        try:
            return self.peers(source_region)
        except Exception:
            raise ec2_error(
                "InvalidParameterValue",
                f"Value ({source_region}) for parameter sourceRegion is invalid.",
            ) from None


def _copy_encryption(
    backend: RegionCopies, source: Any, request: Mapping[str, str]
) -> tuple[bool, str | None]:
    """(encrypted, key ARN) of a snapshot copy into ``backend``'s region, by EC2's rules.

    The copy of an encrypted snapshot is encrypted; ``Encrypted=true``, or encryption by
    default in the destination region, encrypts the copy of a plain one. The key is
    ``KmsKeyId`` (it needs ``Encrypted=true``, and it must be a key of the destination
    region: a key never leaves its region), else the region's default key
    (``alias/aws/ebs``). A key the region does not have is accepted here, as EC2 accepts
    it: the copy then fails (:meth:`RegionCopies.copy_snapshot`).
    """
    asked = _true(request.get("Encrypted"))
    key = request.get("KmsKeyId") or None
    region, account = backend.region_name, backend.account_id
    if key is not None and not asked:
        raise ec2_error(
            "InvalidParameterDependency",
            "The parameter KmsKeyId requires the parameter Encrypted to be set.",
        )
    encrypted = asked or bool(source.encrypted) or bool(backend.ebs_encryption_by_default)
    if not encrypted:
        return False, None
    if key is None or key == "alias/aws/ebs":  # the region's own AWS managed key
        return True, backend.default_kms_key_id or backend._create_default_encryption_key()
    if key.startswith("arn:"):
        parts = key.split(":")
        if len(parts) < 6 or parts[2] != "kms" or parts[3] != region:
            raise ec2_error(
                "InvalidParameterValue",
                f"KMS key {key} is not a key of region {region}: an encrypted snapshot "
                f"copied to {region} needs a key there",
            )
        return True, key
    if key.startswith("alias/"):
        return True, f"arn:aws:kms:{region}:{account}:{key}"
    return True, f"arn:aws:kms:{region}:{account}:key/{key}"
