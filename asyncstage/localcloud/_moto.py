"""The EC2 API of the local cloud: moto's EC2 backend, with real effects.

:class:`LocalBackend` is moto's ``EC2Backend`` with the operations that touch machines
and disks overridden: each calls moto for the records (ids, tags, filters, responses)
and the engine, seen through :class:`~asyncstage.localcloud._hooks.EngineHooks`, for the
real thing. It is installed as ``moto.ec2.models.ec2_backends[account][region]`` for an
account id of its own, so several local clouds (and plain moto tests) share one process
without sharing records. Copies within and across regions are :mod:`._copies`' part of it,
security groups :mod:`._groups`' part; the records it retypes and moto's registry of
backends are in :mod:`._records`.

Everything here runs in the server's request threads under ``engine.lock``.
"""

from __future__ import annotations

import base64
import copy
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError

from asyncstage.localcloud._copies import RegionCopies
from asyncstage.localcloud._devices import ROOT_DEVICE_NAME, attachment_refusal, xen_node
from asyncstage.localcloud._groups import GroupEffects
from asyncstage.localcloud._hooks import ApiRefusal, EngineHooks
from asyncstage.localcloud._network import Placement
from asyncstage.localcloud._pages import Page, cut
from asyncstage.localcloud._records import (
    LocalInstance,
    LocalNic,
    creating,
    ec2_error,
    install_backend,
    private_dns_name,
    retype,
    set_state,
    snapshot_data,
    start_snapshot,
)
from asyncstage.localcloud._tags import TagLookups
from asyncstage.localcloud.errors import LocalCloudError

MAX_INSTANCES = 256  # live instances per cloud: a guard against runaway launches
_MOTO_ROOT = "/dev/sda1"  # where moto attaches an instance's root volume
_BUSY_POLL = 0.1  # seconds between two looks at a busy detach's mounts
log = logging.getLogger("asyncstage.localcloud")


class LocalBackend(TagLookups, GroupEffects, RegionCopies):
    """moto's EC2 backend whose instances, volumes and snapshots are real."""

    engine: EngineHooks | None = None  # None while moto builds its own records
    image_id = ""  # the one image instances boot (set by the API)
    request: Mapping[str, str] = {}  # the parameters of the request in hand (set by the API)
    page: Page | None = None  # the page of instances it asks for (set by the API)
    next_token: str | None = None  # the token of the page after it (for the API)
    peers: Callable[[str], LocalBackend] | None = None  # region -> its backend (the API's)
    _launching = False

    def reset(self) -> None:
        """Ignore moto's global resets (``mock_aws`` in other tests): the cloud owns this."""

    # -- helpers -----------------------------------------------------------------------

    def _live(self) -> EngineHooks | None:
        """The engine, when an operation should have real effects."""
        return None if self._launching else self.engine

    def _real_volume(self, engine: EngineHooks, volume_id: str) -> Any:
        volume = self.get_volume(volume_id)
        if volume_id not in engine.disks:
            raise ec2_error(
                "UnsupportedOperation",
                f"{volume_id} is the record of an instance's root device or an image: "
                "the local cloud has no data for it",
            )
        return volume

    # -- instances ---------------------------------------------------------------------

    def describe_instances(self, filters: Any = None) -> list[Any]:
        """moto's reservations, cut down to the page of instances asked for (:mod:`._pages`)."""
        reservations: list[Any] = super().describe_instances(filters)
        if self.page is None:
            return reservations
        reservations, self.next_token = cut(reservations, self.page)
        return reservations

    def run_instances(
        self,
        image_id: str,
        count: int,
        user_data: Any,
        security_group_names: list[str],
        **kwargs: Any,
    ) -> Any:
        engine = self.engine
        if engine is None:
            return super().run_instances(image_id, count, user_data, security_group_names, **kwargs)
        if image_id != self.image_id and not self._boots(image_id):
            raise ec2_error(
                "InvalidAMIID.NotFound",
                f"The image id '[{image_id}]' does not exist: the local cloud boots only "
                f"{self.image_id} ({engine.image_name}) and its copies",
            )
        key_name = kwargs.get("key_name")
        if key_name:
            self.describe_key_pairs(key_names=[key_name])  # InvalidKeyPair.NotFound
        live = sum(1 for i in self.all_instances() if i.state != "terminated")
        if live + count > MAX_INSTANCES:
            raise ec2_error(
                "InstanceLimitExceeded",
                f"the local cloud runs at most {MAX_INSTANCES} instances ({live} now)",
            )
        instance_type = str(kwargs.get("instance_type") or "m1.small")
        if not kwargs.get("subnet_id"):
            kwargs["placement"] = self._launch_zone(engine, kwargs.get("placement"), instance_type)
        count = _fitting(engine.realism.instance_limit, live, _launch_minimum(count), count)
        self._launching = True
        try:
            reservation = super().run_instances(
                image_id, count, user_data, security_group_names, **kwargs
            )
        finally:
            self._launching = False
        public_key = None
        if key_name:
            material = self.key_pairs[key_name].material_public
            public_key = material.decode() if isinstance(material, bytes) else str(material)
        for instance in reservation.instances:
            private, public, placement = _give_addresses(
                engine, instance, _wants_public(kwargs, instance)
            )
            _move_root(instance)
            set_state(instance, "pending")
            engine.launched(
                instance.id,
                private,
                public,
                public_key,
                instance.instance_type,
                placement,
                _decoded(user_data),
            )
        return reservation

    def start_instances(self, instance_ids: list[str]) -> list[tuple[Any, Any]]:
        engine = self.engine
        if engine is None:
            return super().start_instances(instance_ids)
        instances = self.get_multi_instances_by_id(instance_ids)
        _refuse_states(instances, ("stopping", "shutting-down", "terminated"), "started")
        for instance in instances:
            if instance.state == "stopped":
                self._check_capacity(engine, str(instance.placement.zone), instance.instance_type)
        result = []
        for instance in instances:
            previous = copy.copy(instance._state)
            if instance.state == "stopped":
                instance.start()  # moto's bookkeeping (reason, nics)
                set_state(instance, "pending")
                engine.start_instance(instance.id, _new_public_address(engine, instance))
            result.append((instance, previous))
        return result

    def _zones(self) -> list[str]:
        return sorted(str(z.name) for z in self.describe_availability_zones())

    def _check_zone(self, zone: str) -> None:
        """EC2's answer to a zone this region does not have (another region's, say)."""
        if zone not in self._zones():
            raise ec2_error("InvalidParameterValue", f"Invalid availability zone: [{zone}]")

    def _has_capacity(self, engine: EngineHooks, zone: str, instance_type: str) -> bool:
        gaps = engine.realism.insufficient_capacity
        if zone not in gaps:
            return True
        types = gaps[zone]
        return types is not None and instance_type not in types

    def _check_capacity(self, engine: EngineHooks, zone: str, instance_type: str) -> None:
        """InsufficientInstanceCapacity, in EC2's words, when the zone has none of the type.

        EC2 answers it with HTTP 500, which SDKs retry several times before giving up; the
        local cloud answers 400 so that a client sees it at once (same code and message).
        """
        if self._has_capacity(engine, zone, instance_type):
            return
        others = [
            z for z in self._zones() if z != zone and self._has_capacity(engine, z, instance_type)
        ]
        hint = (
            f" You can currently get {instance_type} capacity by not specifying an "
            f"Availability Zone in your request or choosing {', '.join(others)}."
            if others
            else ""
        )
        raise ec2_error(
            "InsufficientInstanceCapacity",
            f"We currently do not have sufficient {instance_type} capacity in the Availability "
            f"Zone you requested ({zone}). Our system will be working on provisioning "
            f"additional capacity.{hint}",
        )

    def _launch_zone(self, engine: EngineHooks, asked: str | None, instance_type: str) -> str:
        """The zone asked for (if it has capacity), else the first one that has it (as EC2
        places an instance launched without a zone where there is capacity)."""
        if asked:
            self._check_zone(asked)
            self._check_capacity(engine, asked, instance_type)
            return asked
        default = f"{self.region_name}a"
        for zone in [default, *self._zones()]:
            if self._has_capacity(engine, zone, instance_type):
                return zone
        raise ec2_error(
            "InsufficientInstanceCapacity",
            f"We currently do not have sufficient {instance_type} capacity in the Region "
            f"you requested ({self.region_name}). Our system will be working on "
            "provisioning additional capacity.",
        )

    def stop_instances(self, instance_ids: list[str]) -> list[tuple[Any, Any]]:
        engine = self.engine
        if engine is None:
            return super().stop_instances(instance_ids)
        instances = self.get_multi_instances_by_id(instance_ids)
        _refuse_states(instances, ("shutting-down", "terminated"), "stopped")
        for instance in instances:
            if instance.disable_api_stop:
                raise ec2_error(
                    "OperationNotPermitted",
                    f"The instance '{instance.id}' may not be stopped (disableApiStop).",
                )
        return _moved(instances, ("pending", "running"), "stopping", engine.stop_instance)

    def terminate_instances(self, instance_ids: list[str]) -> list[tuple[Any, Any]]:
        engine = self.engine
        if engine is None:
            return super().terminate_instances(instance_ids)
        if not instance_ids:
            raise ec2_error("InvalidParameterCombination", "No instances specified")
        instances = self.get_multi_instances_by_id(instance_ids)
        for instance in instances:
            if instance.disable_api_termination:
                raise ec2_error(
                    "OperationNotPermitted",
                    f"The instance '{instance.id}' may not be terminated.",
                )
        alive = ("pending", "running", "stopping", "stopped")
        return _moved(instances, alive, "shutting-down", engine.terminate_instance)

    # -- volumes -----------------------------------------------------------------------

    def create_volume(  # type: ignore[override]
        self, size: int | None, zone_name: str, snapshot_id: str | None = None, **kw: Any
    ) -> Any:
        engine = self._live()
        if engine is None:
            return super().create_volume(size, zone_name, snapshot_id, **kw)  # type: ignore[arg-type]
        self._check_zone(zone_name)
        if self.ebs_encryption_by_default:  # the region's setting (EnableEbsEncryptionByDefault)
            kw["encrypted"] = True
        source = None
        if snapshot_id:
            source = snapshot_data(engine, self.get_snapshot(snapshot_id))
            need = -(-source.stat().st_size // (1 << 30))
            if size is not None and int(size) < need:
                raise ec2_error(
                    "InvalidParameterValue",
                    f"Volume of {size}GiB is smaller than snapshot '{snapshot_id}', "
                    f"expect size >= {need}GiB",
                )
            if size is None:
                size = need
        if size is not None and not 1 <= int(size) <= 16384:
            raise ec2_error(
                "InvalidParameterValue",
                f"Volume of {size}GiB is outside the allowed range 1-16384GiB",
            )
        volume = super().create_volume(
            None if size is None else int(size),  # type: ignore[arg-type]  # moto: snapshot's
            zone_name,
            snapshot_id,
            **kw,
        )
        try:
            if engine.volume_created(volume.id, int(volume.size), source):
                creating(volume)  # until the engine has copied the snapshot's image
        except LocalCloudError as e:
            self.volumes.pop(volume.id, None)
            raise ec2_error("InternalError", str(e)) from e
        return volume

    def attach_volume(
        self,
        volume_id: str,
        instance_id: str,
        device_path: str,
        delete_on_termination: bool = False,
    ) -> Any:
        engine = self._live()
        if engine is None:
            return super().attach_volume(volume_id, instance_id, device_path, delete_on_termination)
        self._real_volume(engine, volume_id)
        # a snapshot of it being copied: no instance may write to it until that is done
        engine.wait_copied([volume_id])
        volume = self._real_volume(engine, volume_id)  # as it is now (deleted meanwhile?)
        instance = self.get_instance(instance_id)
        if volume.status in ("creating", "error"):
            raise ec2_error(
                "IncorrectState", f"The volume '{volume_id}' is not in the 'available' state."
            )
        if volume.attachment is not None:
            raise ec2_error(
                "VolumeInUse",
                f"{volume_id} is already attached to an instance ({volume.attachment.instance.id})",
            )
        if instance.state not in ("pending", "running", "stopped"):
            raise ec2_error(
                "IncorrectState",
                f"The instance '{instance_id}' is {instance.state}: "
                "volumes attach to pending, running or stopped instances",
            )
        if volume.zone.name != instance.placement.zone:
            raise ec2_error(
                "InvalidVolume.ZoneMismatch",
                f"The volume '{volume_id}' is not in the same availability zone as "
                f"instance '{instance_id}'",
            )
        name = xen_node(device_path or "")
        if name is None:
            raise ec2_error(
                "InvalidParameterValue",
                f"Value ({device_path}) for parameter device is invalid. "
                f"{device_path} is not a valid EBS device name.",
            )
        taken = {xen_node(d) for d in instance.block_device_mapping}
        if name in taken:
            raise ec2_error(
                "InvalidParameterValue",
                f"Invalid value '{device_path}' for unixDevice. "
                f"Attachment point {device_path} is already in use",
            )
        refusal = attachment_refusal(
            instance.instance_type, len(instance.block_device_mapping), len(instance.nics)
        )
        if refusal is not None:
            raise ec2_error("AttachmentLimitExceeded", refusal)
        try:
            attaching = engine.volume_attached(volume_id, instance_id, device_path)
        except LocalCloudError as e:
            raise ec2_error("InternalError", str(e)) from e
        done = super().attach_volume(volume_id, instance_id, device_path, delete_on_termination)
        if attaching and done is not None:  # until the node is there (attachment_done)
            done.status = "attaching"
        return done

    def detach_volume(self, volume_id: str, instance_id: str, device_path: str) -> Any:
        """Detach (``instance_id`` and ``device_path`` may be empty, as EC2 allows).

        A volume still mounted inside its instance stays ``busy`` until it is unmounted
        there (then it detaches) or the detach is forced (``Force``), as on EC2.
        """
        engine = self.engine
        volume = self.get_volume(volume_id)
        if engine is None or volume_id not in engine.disks:
            return super().detach_volume(volume_id, instance_id, device_path)
        if volume.attachment is None:
            raise ec2_error("IncorrectState", f"Volume '{volume_id}' is in the 'available' state.")
        instance_id = instance_id or volume.attachment.instance.id
        if instance_id != volume.attachment.instance.id:
            raise ec2_error(
                "InvalidAttachment.NotFound",
                f"The volume '{volume_id}' is not attached to instance '{instance_id}'",
            )
        request = self.request if self.request.get("Action") == "DetachVolume" else {}
        force = str(request.get("Force", "")).lower() == "true"
        try:
            where = engine.volume_detaching(volume_id, force=force)
        except ApiRefusal as e:  # mounted, and the cloud plays no busy state
            raise ec2_error(e.code, str(e)) from e
        if where is not None:
            if volume.attachment.status != "busy":
                volume.attachment.status = "busy"
                self._busy_later(volume_id)
            return volume.attachment
        return super().detach_volume(volume_id, instance_id, device_path)

    def _busy_later(self, volume_id: str, pause: float = _BUSY_POLL) -> None:
        timer = threading.Timer(pause, self._busy_check, (volume_id, pause))
        timer.daemon = True
        timer.start()

    def _busy_check(self, volume_id: str, pause: float = _BUSY_POLL) -> None:
        """A busy detach: done once the volume is unmounted inside its instance."""
        engine = self.engine
        if engine is None:
            return
        with engine.lock:
            volume = self.volumes.get(volume_id)
            attachment = None if volume is None else volume.attachment
            if self.engine is None or attachment is None or attachment.status != "busy":
                return  # closed, forced or detached since
            try:
                if engine.volume_detaching(volume_id) is not None:
                    # still mounted: look again, less often the longer it stays (up to 1 s)
                    self._busy_later(volume_id, min(pause * 1.5, 1.0))
                    return
                super().detach_volume(volume_id, attachment.instance.id, attachment.device)
            except Exception:
                log.exception("local cloud: busy detach of %s", volume_id)

    def delete_volume(self, volume_id: str) -> Any:
        volume = super().delete_volume(volume_id)
        if self.engine is not None:
            self.engine.volume_deleted(volume_id)
        return volume

    # -- snapshots ---------------------------------------------------------------------

    def create_snapshot(
        self,
        volume_id: str,
        description: str,
        owner_id: str | None = None,
        from_ami: str | None = None,
    ) -> Any:
        engine = self._live()
        if engine is None or from_ami is not None:
            return super().create_snapshot(volume_id, description, owner_id, from_ami)
        if self._real_volume(engine, volume_id).status in ("creating", "error"):
            raise ec2_error(
                "IncorrectState", f"The volume '{volume_id}' is not 'available' or 'in-use'."
            )
        last = self._last_snapshot.get(volume_id)
        interval = engine.realism.snapshot_interval
        if last is not None and interval > 0 and time.monotonic() - last < interval:
            raise ec2_error(
                "SnapshotCreationPerVolumeRateExceeded",
                "The maximum per volume CreateSnapshot request rate has been exceeded. "
                "Use an increasing or variable sleep interval between requests.",
            )
        snapshot = super().create_snapshot(volume_id, description, owner_id, from_ami)
        start_snapshot(self, engine, snapshot, engine.disks[volume_id].image)
        self._last_snapshot[volume_id] = time.monotonic()
        return snapshot

    def create_snapshots(
        self, instance_spec: dict[str, Any], description: str, tags: dict[str, str]
    ) -> list[Any]:
        """Snapshots of every data volume of an instance at one instant: the instance's
        processes are stopped (and their writes synced) in the call, and stay stopped
        until every image is copied (in the engine's threads, after the call)."""
        engine = self._live()
        if engine is None:
            return list(super().create_snapshots(instance_spec, description, tags))
        instance_id = str(instance_spec.get("InstanceId", ""))
        instance = self.get_instance(instance_id)
        root = instance.root_device_name
        exclude = str(instance_spec.get("ExcludeBootVolume", False)).lower() == "true"
        volumes = [
            m.volume_id
            for device, m in instance.get_block_device_mapping
            if not (exclude and device == root)
        ]
        for volume_id in volumes:  # every one must have data, before any is taken
            self._real_volume(engine, volume_id)
        with engine.lock, engine.instance_frozen(instance_id):
            snapshots = [self.create_snapshot(v, description=description) for v in volumes]
        for snapshot in snapshots:
            snapshot.add_tags(tags)
        return snapshots

    @property
    def _last_snapshot(self) -> dict[str, float]:
        """Volume id -> when it was last snapshotted (for EC2's per-volume rate)."""
        found: dict[str, float] | None = self.__dict__.get("_snapshotted")
        if found is None:
            found = self.__dict__["_snapshotted"] = {}
        return found

    def delete_snapshot(self, snapshot_id: str) -> Any:
        snapshot = super().delete_snapshot(snapshot_id)
        if self.engine is not None:
            self.engine.snapshot_deleted(snapshot_id)
        return snapshot


def ec2_regions() -> frozenset[str]:
    """The regions of EC2 in the aws partition (botocore's endpoint data)."""
    return _regions()


@functools.cache
def _regions() -> frozenset[str]:
    import botocore.session

    return frozenset(botocore.session.get_session().get_available_regions("ec2"))


def find_record(backends: Iterable[LocalBackend], getter: str, resource_id: str) -> Any:
    """The record of ``resource_id`` in whichever region's backend holds it."""
    error: EC2ClientError | None = None
    for backend in backends:
        try:
            return getattr(backend, getter)(resource_id)
        except EC2ClientError as e:
            error = e
    if error is None:
        raise LocalCloudError(f"no region holds {resource_id}")
    raise error


LAUNCH_REQUEST = threading.local()
"""``min_count``: the MinCount of the RunInstances request this thread serves, when the API
raised it to MaxCount for moto (moto launches MinCount); the backend launches what fits."""


def _launch_minimum(count: int) -> int:
    minimum = LAUNCH_REQUEST.__dict__.pop("min_count", None)
    try:
        return count if minimum is None else max(1, min(int(minimum), count))
    except ValueError:  # moto has refused it already; never more than asked
        return count


def _fitting(limit: int | None, live: int, minimum: int, maximum: int) -> int:
    """How many of MinCount..MaxCount instances fit under the account's instance limit."""
    if limit is None or live + maximum <= limit:
        return maximum
    if live + minimum > limit:
        raise ec2_error(
            "InstanceLimitExceeded",
            f"You have requested more instances ({minimum}) than your current instance limit "
            f"of {limit} allows for the specified instance type. Please visit "
            "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this "
            "limit.",
        )
    return limit - live


def ec2_now(engine: EngineHooks) -> datetime:
    """The time on the cloud's own clock (``realism.clock_offset`` off this machine's)."""
    return utcnow() + timedelta(seconds=engine.realism.clock_offset)


def _wants_public(kwargs: dict[str, Any], instance: Any) -> bool:
    """EC2's rule: the first network interface's AssociatePublicIpAddress if given, else
    the subnet's MapPublicIpOnLaunch (true in a default VPC's subnets)."""
    for nic in kwargs.get("nics") or []:
        if str(nic.get("DeviceIndex", "0")) == "0" and "AssociatePublicIpAddress" in nic:
            return str(nic["AssociatePublicIpAddress"]).lower() == "true"
    subnet = getattr(instance.nics[0], "subnet", None)
    return bool(getattr(subnet, "map_public_ip_on_launch", True))


def _give_addresses(
    engine: EngineHooks, instance: Any, public_wanted: bool
) -> tuple[str, str, Placement | None]:
    """A new instance's (private, public, placement), set on its network interface.

    On the cloud's network (``engine.network == "vpc"``) the private address is moto's,
    from the subnet's CIDR, and lives only inside the instance's namespace; the public
    one comes from the cloud's range of 198.18.0.0/15. Else both are loopback
    addresses. Never moto's 54.x: nothing may ever leave the machine.
    """
    nic = instance.nics[0]
    placement = None
    if engine.network == "vpc":
        subnet = nic.subnet
        private = str(nic.private_ip_address)
        if ipaddress.ip_address(private) not in subnet.cidr:
            # moto draws a default-VPC instance's address at random (EC2-Classic's way):
            # EC2 takes it from the subnet, as moto does for a subnet named in the call
            private = subnet.get_available_subnet_ip(instance=instance)
            instance._private_ips.add(private)  # freed by moto at termination
        vpc = instance.ec2_backend.get_vpc(subnet.vpc_id)
        placement = Placement(str(subnet.vpc_id), str(vpc.cidr_block), str(subnet.cidr_block))
        public = engine.new_public_address() if public_wanted else ""
    else:
        private = engine.new_address()
        public = engine.new_address() if public_wanted else ""
    instance.launch_time = ec2_now(engine)
    dns = private_dns_name(engine.region, private)
    nic.private_ip_address = private
    nic.private_ip_addresses = [
        {"Primary": True, "PrivateIpAddress": private, "PrivateDnsName": dns}
    ]
    nic.private_dns_name = dns
    nic.public_ip = public or None
    nic.public_ip_auto_assign = False  # moto's stop/start would hand out 54.x
    nic.public_wanted = public_wanted  # a start gives a new one only then
    retype(nic, LocalNic)
    retype(instance, LocalInstance)
    return private, public, placement


def _new_public_address(engine: EngineHooks, instance: Any) -> str | None:
    """At a start: EC2 gives a new public address (None: it keeps its one, realism off;
    "": it has none)."""
    instance.launch_time = ec2_now(engine)  # EC2's LaunchTime is the last start's
    if not engine.realism.moving_public_address:
        return None
    if not getattr(instance.nics[0], "public_wanted", True):
        return ""
    public = engine.new_public_address()
    instance.nics[0].public_ip = public
    return public


def release_public_address(engine: EngineHooks, instance: Any) -> None:
    """A stopped instance has no public address on EC2 (a new one comes at its start)."""
    if engine.realism.moving_public_address:
        instance.nics[0].public_ip = None


def _refuse_states(instances: list[Any], refused: tuple[str, ...], done: str) -> None:
    """EC2's answer when one of the instances is in a state it cannot be ``done`` from."""
    for instance in instances:
        if instance.state in refused:
            raise ec2_error(
                "IncorrectInstanceState",
                f"The instance '{instance.id}' is not in a state from which it can be "
                f"{done} (it is {instance.state}).",
            )


def _moved(
    instances: list[Any], start: tuple[str, ...], to: str, tell: Callable[[str], None]
) -> list[tuple[Any, Any]]:
    """Each instance with its previous state; those in a ``start`` state are set to ``to``
    and told to the engine (``tell(instance_id)``)."""
    result = []
    for instance in instances:
        previous = copy.copy(instance._state)
        if instance.state in start:
            set_state(instance, to)
            tell(instance.id)
        result.append((instance, previous))
    return result


def _move_root(instance: Any) -> None:
    """moto attaches the root volume as /dev/sda1; EC2 names it as the image does."""
    mapping = instance.block_device_mapping.pop(_MOTO_ROOT, None)
    if mapping is not None:
        instance.block_device_mapping[ROOT_DEVICE_NAME] = mapping
        volume = instance.ec2_backend.get_volume(mapping.volume_id)
        if volume.attachment is not None:
            volume.attachment.device = ROOT_DEVICE_NAME


def make_backend(region: str, account: str) -> LocalBackend:
    """A new backend, installed for ``account`` in moto's registry of EC2 backends."""
    backend = LocalBackend(region, account)
    install_backend(backend)
    return backend


def _decoded(user_data: Any) -> bytes | None:
    """The bytes of a RunInstances ``UserData`` (moto keeps it base64-encoded)."""
    if user_data is None:
        return None
    try:
        return base64.b64decode(
            user_data.as_bytes() if hasattr(user_data, "as_bytes") else user_data
        )
    except (ValueError, TypeError):
        return None
