"""The EC2 client the rest of asyncstage uses.

:class:`EC2` wraps one aioboto3 client for one region: botocore's adaptive
retry mode for throttling, every ``ClientError`` mapped to
:class:`~asyncstage.errors.EC2Error` (or a ``NotFound`` subclass), describes
batched by id, and waits that poll fast at first (about 1 s) and back off.
Concurrent waits on instances share their poll rounds: one DescribeInstances
call per round covers every instance anybody is waiting for.

Creating calls are idempotent: RunInstances and CreateVolume carry a
``ClientToken`` (one per logical create, :func:`new_client_token`), which is also
written as the ``asyncstage:client-token`` tag in the create call itself. A call
repeated with the same token returns what the first one made instead of making
it twice, also after a timeout or a cancellation left its outcome unknown (then
the token's tag finds it), and :meth:`EC2.created_with` finds what a token made
so that an owner can clean it up. Tags always go into the create call
(``TagSpecifications``), so nothing exists untagged even for a moment.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from asyncstage.ec2 import listings, waits
from asyncstage.ec2.client import Client, Resource
from asyncstage.ec2.creates import CreatedKind, Tokens
from asyncstage.ec2.tags import CLIENT_TOKEN_TAG, tag_list
from asyncstage.errors import EC2Error, InsufficientCapacity

__all__ = ["EC2"]

log = logging.getLogger("asyncstage")

_CAPACITY = re.compile(
    r"sufficient (\S+) capacity in the Availability Zone you requested \(([^)]+)\)"
)
_SNAPSHOT_RATE = "SnapshotCreationPerVolumeRateExceeded"
_RATE_WAIT = 120.0  # seconds a snapshot refused for the per-volume rate is retried


def groups_of(instance: Resource) -> list[dict[str, Any]]:
    """An instance's security groups (``GroupId``, ``GroupName``): its own and its network
    interfaces' (an instance launched with interfaces lists them there), once each."""
    found = [*(instance.get("SecurityGroups") or [])]
    for nic in instance.get("NetworkInterfaces") or []:
        found += nic.get("Groups") or []
    seen: dict[str, dict[str, Any]] = {}
    for group in found:
        if isinstance(group, dict) and group.get("GroupId"):
            seen.setdefault(str(group["GroupId"]), group)
    return list(seen.values())


def _capacity_error(
    e: EC2Error, operation: str, zone: str | None, instance_type: str | None
) -> EC2Error:
    """``InsufficientInstanceCapacity`` as :class:`InsufficientCapacity` (zone and type from
    EC2's message, else those asked for); any other error as it is."""
    if e.code != "InsufficientInstanceCapacity":
        return e
    m = _CAPACITY.search(str(e))
    if m:
        instance_type, zone = m.group(1), m.group(2)
    return InsufficientCapacity(
        f"no {instance_type or 'instance'} capacity in {zone or 'the region'} ({e})",
        zone=zone,
        instance_type=instance_type,
        operation=operation,
    )


class EC2(Client):
    """An EC2 client for one region (``async with EC2(region=...) as ec2``): the calls
    of :class:`~asyncstage.ec2.client.Client` and the changes asyncstage makes.

    ``endpoint_url`` points it at another endpoint (the local cloud, moto).
    Credentials come from the standard AWS chain unless given.
    ``poll_interval`` is the first pause between two polls of a wait; pauses grow
    by ``poll_backoff`` up to ``poll_max_interval``.
    """

    # The waits (asyncstage/ec2/waits.py), as methods of this client.
    _poll = waits.poll
    wait_for_instances = waits.wait_for_instances
    wait_for_instance = waits.wait_for_instance
    wait_for_volume = waits.wait_for_volume
    describe_tagged_shared = listings.describe_tagged_shared
    wait_for_snapshot = waits.wait_for_snapshot
    wait_for_image = waits.wait_for_image

    @functools.cached_property
    def _tokens(self) -> Tokens:
        return Tokens(self)

    # -- changes ----------------------------------------------------------------------

    async def create_tags(self, ids: Sequence[str], tags: Mapping[str, str]) -> None:
        """Set these tags on every resource listed (one call)."""
        if ids and tags:
            await self.call("CreateTags", Resources=list(ids), Tags=tag_list(tags))

    async def delete_tags(self, ids: Sequence[str], keys: Sequence[str]) -> None:
        """Remove these tag keys from the resources."""
        if ids and keys:
            await self.call("DeleteTags", Resources=list(ids), Tags=[{"Key": k} for k in keys])

    async def run_instances(
        self,
        *,
        image_id: str,
        count: int,
        instance_type: str,
        key_name: str | None = None,
        security_group_ids: Sequence[str] = (),
        availability_zone: str | None = None,
        tags: Mapping[str, str] = {},
        block_device_mappings: Sequence[Mapping[str, Any]] = (),
        user_data: str | None = None,
        client_token: str | None = None,
        min_count: int | None = None,
    ) -> list[Resource]:
        """Launch ``count`` instances in one RunInstances call (MaxCount = count).

        ``min_count`` (default ``count``) is EC2's MinCount: with less, EC2 may launch
        fewer than ``count`` (as many as fit) rather than none; the list says how many.
        EC2's ``InsufficientInstanceCapacity`` is raised as :class:`InsufficientCapacity`.
        With a ``client_token`` the call is idempotent: repeated with the same token
        (after a timeout, an error or a cancellation) it returns the instances the
        first call made, if it made any, rather than launching more.
        """
        params: dict[str, Any] = {
            "ImageId": image_id,
            "MinCount": count if min_count is None else max(1, min(min_count, count)),
            "MaxCount": count,
            "InstanceType": instance_type,
        }
        if key_name:
            params["KeyName"] = key_name
        if security_group_ids:
            params["SecurityGroupIds"] = list(security_group_ids)
        if availability_zone:
            params["Placement"] = {"AvailabilityZone": availability_zone}
        if client_token:
            params["ClientToken"] = client_token
            tags = {**tags, CLIENT_TOKEN_TAG: client_token}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tag_list(tags)}]
        if block_device_mappings:
            params["BlockDeviceMappings"] = [dict(m) for m in block_device_mappings]
        if user_data is not None:
            params["UserData"] = user_data

        async def create() -> list[Resource]:
            try:
                result = await self.call("RunInstances", **params)
            except EC2Error as e:
                raise _capacity_error(e, "RunInstances", availability_zone, instance_type) from e
            instances: list[Resource] = result.get("Instances", [])
            return instances

        if not client_token:
            return await create()
        made: list[Resource] = await self._tokens.once("instance", client_token, create)
        return made

    async def start_instances(self, ids: Sequence[str]) -> None:
        """Start these instances (one call); no capacity: :class:`InsufficientCapacity`."""
        if ids:
            try:
                await self.call("StartInstances", InstanceIds=list(ids))
            except EC2Error as e:
                raise _capacity_error(e, "StartInstances", None, None) from e

    async def stop_instances(self, ids: Sequence[str], *, force: bool = False) -> None:
        """Stop these instances (one call)."""
        if ids:
            await self.call("StopInstances", InstanceIds=list(ids), Force=force)

    async def terminate_instances(self, ids: Sequence[str]) -> None:
        """Terminate these instances (one call)."""
        if ids:
            await self.call("TerminateInstances", InstanceIds=list(ids))

    # -- volumes, snapshots, images ------------------------------------------------------

    async def create_volume(
        self,
        *,
        availability_zone: str,
        size: int | None = None,
        snapshot_id: str | None = None,
        volume_type: str = "gp3",
        tags: Mapping[str, str] = {},
        client_token: str | None = None,
    ) -> Resource:
        """Create an EBS volume (from a snapshot when given), tagged.

        With a ``client_token`` the call is idempotent (see :meth:`run_instances`).
        """
        params: dict[str, Any] = {"AvailabilityZone": availability_zone, "VolumeType": volume_type}
        if size is not None:
            params["Size"] = size
        if snapshot_id:
            params["SnapshotId"] = snapshot_id
        if client_token:
            params["ClientToken"] = client_token
            tags = {**tags, CLIENT_TOKEN_TAG: client_token}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "volume", "Tags": tag_list(tags)}]

        async def create() -> list[Resource]:
            return [await self.call("CreateVolume", **params)]

        if not client_token:
            return (await create())[0]
        made: list[Resource] = await self._tokens.once("volume", client_token, create)
        if not made:  # cannot happen: a volume call makes exactly one
            raise EC2Error("CreateVolume returned no volume", operation="CreateVolume")
        return made[0]

    # -- idempotent creates ------------------------------------------------------------

    @property
    def unsettled_tokens(self) -> dict[str, CreatedKind]:
        """ClientTokens of create calls whose outcome is unknown (failed, timed out, cancelled).

        Their owner looks them up with :meth:`created_with` to clean up what they made.
        """
        return self._tokens.unsettled

    def settle(self, token: str) -> None:
        """Forget a token whose resources the caller has found (and cleaned up)."""
        self._tokens.settle(token)

    async def created_with(self, kind: CreatedKind, token: str) -> list[Resource]:
        """The instances or volumes a create call with this ClientToken made (by its tag).

        Terminated instances and deleted volumes are left out.
        """
        return await self._tokens.created_with(kind, token)

    async def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        """Attach a volume to an instance under an EC2 device name (``/dev/sdf``)."""
        await self.call("AttachVolume", VolumeId=volume_id, InstanceId=instance_id, Device=device)

    async def detach_volume(self, volume_id: str, *, force: bool = False) -> None:
        """Detach a volume from its instance."""
        await self.call("DetachVolume", VolumeId=volume_id, Force=force)

    async def delete_volume(self, volume_id: str) -> None:
        """Delete a volume."""
        await self.call("DeleteVolume", VolumeId=volume_id)

    async def create_snapshot(
        self,
        volume_id: str,
        *,
        description: str = "",
        tags: Mapping[str, str] = {},
        rate_wait: float = _RATE_WAIT,
    ) -> Resource:
        """Snapshot a volume, tagged; the new snapshot (``pending``).

        EC2 refuses a snapshot of a volume snapshotted moments ago
        (``SnapshotCreationPerVolumeRateExceeded``): that is waited out and retried,
        pausing longer each time (x1.5, up to 15 s: AWS's advice), for up to ``rate_wait``
        seconds, after which the error is raised.
        """
        params: dict[str, Any] = {"VolumeId": volume_id, "Description": description}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "snapshot", "Tags": tag_list(tags)}]
        return await self._snapshot_call("CreateSnapshot", volume_id, rate_wait, params)

    async def create_snapshots(
        self, instance_id: str, description: str = "", tags: Mapping[str, str] = {}
    ) -> list[Resource]:
        """Snapshot the instance's data volumes at one instant (``CreateSnapshots``,
        boot volume excluded), tagged; the new snapshots (``pending``).

        A refusal for a volume snapshotted moments ago is waited out as in
        :meth:`create_snapshot` (for up to its default ``rate_wait``).
        """
        params: dict[str, Any] = {
            "InstanceSpecification": {"InstanceId": instance_id, "ExcludeBootVolume": True},
            "Description": description,
        }
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "snapshot", "Tags": tag_list(tags)}]
        answer = await self._snapshot_call("CreateSnapshots", instance_id, _RATE_WAIT, params)
        return list(answer.get("Snapshots", []))

    async def _snapshot_call(
        self, operation: str, of: str, rate_wait: float, params: dict[str, Any]
    ) -> Resource:
        """``operation`` retried while EC2 says the volume was snapshotted moments ago
        (x1.5 pauses, up to 15 s: AWS's advice), for up to ``rate_wait`` seconds."""
        deadline = time.monotonic() + rate_wait
        pause = self.poll_interval
        while True:
            try:
                return await self.call(operation, **params)
            except EC2Error as e:
                left = deadline - time.monotonic()
                if e.code != _SNAPSHOT_RATE or left <= 0:
                    raise
                log.info("snapshot of %s refused for now (%s): again in %.1fs", of, e, pause)
                await anyio.sleep(min(pause, left))
                pause = min(pause * 1.5, 15.0)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot."""
        self.rounds.completed.forget(snapshot_id)
        await self.call("DeleteSnapshot", SnapshotId=snapshot_id)

    async def copy_snapshot(
        self,
        snapshot_id: str,
        *,
        source_region: str,
        description: str = "",
        tags: Mapping[str, str] = {},
        **options: Any,
    ) -> str:
        """Copy a snapshot of ``source_region`` into this region, tagged; the new snapshot's id.

        ``options`` are more CopySnapshot parameters (``Encrypted``, ``KmsKeyId`` ...).
        """
        params: dict[str, Any] = {
            "SourceSnapshotId": snapshot_id,
            "SourceRegion": source_region,
            "Description": description,
            **options,
        }
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "snapshot", "Tags": tag_list(tags)}]
        result = await self.call("CopySnapshot", **params)
        return str(result["SnapshotId"])

    async def copy_image(
        self,
        image_id: str,
        *,
        source_region: str,
        name: str,
        description: str = "",
        tags: Mapping[str, str] = {},
        **options: Any,
    ) -> str:
        """Copy an image of ``source_region`` into this region, tagged; the new image's id.

        The tags go on the image and its snapshots. ``options`` are more CopyImage
        parameters (``Encrypted``, ``KmsKeyId`` ...).
        """
        if tags:
            options["TagSpecifications"] = [
                {"ResourceType": kind, "Tags": tag_list(tags)} for kind in ("image", "snapshot")
            ]
        result = await self.call(
            "CopyImage",
            SourceImageId=image_id,
            SourceRegion=source_region,
            Name=name,
            Description=description,
            **options,
        )
        return str(result["ImageId"])

    # -- key pairs and security groups ---------------------------------------------------

    async def key_pair_exists(self, name: str) -> bool:
        """Whether a key pair of this name exists."""
        result = await self.call(
            "DescribeKeyPairs", Filters=[{"Name": "key-name", "Values": [name]}]
        )
        return bool(result.get("KeyPairs"))

    async def import_key_pair(
        self,
        name: str,
        public_key: str,
        *,
        tags: Mapping[str, str] = {},
    ) -> None:
        """Import an OpenSSH public key as a key pair."""
        params: dict[str, Any] = {"KeyName": name, "PublicKeyMaterial": public_key.encode()}
        if tags:
            params["TagSpecifications"] = [{"ResourceType": "key-pair", "Tags": tag_list(tags)}]
        await self.call("ImportKeyPair", **params)

    async def delete_key_pair(self, name: str) -> None:
        """Delete a key pair."""
        await self.call("DeleteKeyPair", KeyName=name)

    async def ensure_security_group(
        self,
        name: str,
        *,
        cidrs: Sequence[str],
        port: int = 22,
        description: str = "asyncstage staging servers",
        tags: Mapping[str, str] = {},
        patience: float = 60.0,
    ) -> str:
        """The id of the security group ``name``, made if needed, letting ssh in.

        ssh is allowed from each CIDR and from members of the group itself; rules
        already there are kept, missing ones are added, one call each. Safe to run from
        many processes at once: ``InvalidGroup.Duplicate`` (another made the group first)
        means looking it up again until EC2 shows it (within ``patience`` seconds), and
        ``InvalidPermission.Duplicate`` means the rule is there already.
        """
        group = await self._group_named(name)
        if group is None:
            params: dict[str, Any] = {"GroupName": name, "Description": description}
            if tags:
                params["TagSpecifications"] = [
                    {"ResourceType": "security-group", "Tags": tag_list(tags)}
                ]
            try:
                made = await self.call("CreateSecurityGroup", **params)
                group = {"GroupId": str(made["GroupId"])}
            except EC2Error as e:
                if e.code != "InvalidGroup.Duplicate":
                    raise
                group = await self._group_named(name, patience=patience)
                if group is None:
                    raise EC2Error(
                        f"security group {name!r} exists (CreateSecurityGroup said so) but "
                        f"DescribeSecurityGroups did not show it within {patience:g}s",
                        code="InvalidGroup.NotFound",
                        operation="DescribeSecurityGroups",
                    ) from e
        group_id = str(group["GroupId"])
        have_cidrs: set[str] = set()
        have_self = False
        for perm in group.get("IpPermissions", []):
            if perm.get("FromPort") == port and perm.get("IpProtocol") == "tcp":
                have_cidrs |= {r["CidrIp"] for r in perm.get("IpRanges", [])}
                have_self |= any(
                    p.get("GroupId") == group_id for p in perm.get("UserIdGroupPairs", [])
                )
        rules: list[dict[str, Any]] = [
            {"IpRanges": [{"CidrIp": c}]} for c in dict.fromkeys(cidrs) if c not in have_cidrs
        ]
        if not have_self:
            rules.append({"UserIdGroupPairs": [{"GroupId": group_id}]})
        # one rule a call: EC2 refuses a whole call when one of its rules exists already
        for rule in rules:
            perm = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **rule}
            try:
                await self.call(
                    "AuthorizeSecurityGroupIngress", GroupId=group_id, IpPermissions=[perm]
                )
            except EC2Error as e:
                if e.code != "InvalidPermission.Duplicate":  # another process added it
                    raise
        return group_id

    async def _group_named(self, name: str, *, patience: float = 0.0) -> Resource | None:
        """The security group called ``name``, looked for again until ``patience`` is up."""
        deadline = time.monotonic() + patience
        pause = self.poll_interval
        while True:
            found = await self.call(
                "DescribeSecurityGroups", Filters=[{"Name": "group-name", "Values": [name]}]
            )
            groups: list[Resource] = found.get("SecurityGroups", [])
            if groups or time.monotonic() >= deadline:
                return groups[0] if groups else None
            await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * self.poll_backoff, self.poll_max_interval)

    async def delete_security_group(self, group_id: str) -> None:
        """Delete a security group."""
        await self.call("DeleteSecurityGroup", GroupId=group_id)
