"""moto's EC2 records as the local cloud keeps them, and moto's registry of backends.

Some of moto's records are retyped to subclasses of ours (:func:`retype`): the same data,
with the properties EC2 has and moto lacks (DNS names that are addresses, a snapshot that
stays ``pending`` and a volume ``creating`` while its copy is made). The backends
(:mod:`._moto`, :mod:`._copies`) make them; nothing here calls the engine but
:func:`start_snapshot`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import EC2Backend, ec2_backends
from moto.ec2.models.elastic_block_store import Snapshot, Volume
from moto.ec2.models.elastic_network_interfaces import NetworkInterface
from moto.ec2.models.instances import Instance, StateReason

from asyncstage.localcloud._hooks import EngineHooks
from asyncstage.localcloud.errors import LocalCloudError

STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
}


def set_state(instance: Any, name: str) -> None:
    """Set an instance's state as DescribeInstances reports it."""
    instance._state.name = name
    instance._state.code = STATE_CODES[name]


def set_reason(instance: Any, code: str, message: str) -> None:
    """Set an instance's StateReason (and StateTransitionReason) as EC2 gives them."""
    instance._reason = f"{code}: {message}"
    instance.state_reason = StateReason(instance._reason, code)


def ec2_error(code: str, message: str) -> EC2ClientError:
    return EC2ClientError(code, message)


def retype(obj: Any, cls: type) -> None:
    """Make one of moto's records an instance of our subclass (same data, our properties)."""
    obj.__class__ = cls


class LocalNic(NetworkInterface):
    @property
    def association(self) -> dict[str, Any]:
        association: dict[str, Any] = super().association
        if association and self.public_ip:  # moto names it as a private one
            region = self.ec2_backend.region_name
            association["publicDnsName"] = public_dns_name(region, self.public_ip)
        return association


# EC2 names instances ip-1-2-3-4.ec2.internal / ec2-1-2-3-4.compute-1.amazonaws.com. Here
# the names are the loopback addresses themselves: clients connect by DNS name (the Perl
# VM::EC2::Staging does), and a name under amazonaws.com would send a DNS query off this
# machine (nothing may leave 127.0.0.0/8) and then fail to resolve.


def private_dns_name(region: str, address: str) -> str:
    """The private DNS name of an instance at ``address``: the address itself (see above)."""
    return address


def public_dns_name(region: str, address: str) -> str:
    """The public DNS name of an instance at ``address``: the address itself (see above)."""
    return address


class LocalInstance(Instance):
    """An instance whose DNS names are its addresses (see :func:`private_dns_name`)."""

    @property
    def private_dns_name(self) -> str:
        return private_dns_name(self.region_name, str(self.private_ip))

    @property
    def public_dns_name(self) -> str | None:
        return public_dns_name(self.region_name, self.public_ip) if self.public_ip else None


class LocalSnapshot(Snapshot):
    """A snapshot that stays ``pending`` while its Progress rises over ``duration`` seconds.

    It is ``completed`` once both that time is over and the engine has its copy of the
    image (the engine sets ``status`` to ``completed`` when the copy is done).
    """

    started = 0.0  # time.monotonic() of CreateSnapshot
    duration = 0.0
    state_message: str | None = None  # why it is ``error``

    @property
    def status(self) -> str:
        state = str(self.__dict__.get("_status", "pending"))
        if state == "completed" and time.monotonic() < self.started + self.duration:
            return "pending"
        return state

    @status.setter
    def status(self, value: str) -> None:
        self.__dict__["_status"] = value

    @property
    def progress(self) -> str:
        if self.status == "completed":
            return "100%"
        if self.duration <= 0:
            return "99%"  # only the copy is left
        done = (time.monotonic() - self.started) / self.duration
        return f"{max(0, min(99, int(done * 100)))}%"


class LocalVolume(Volume):
    """A volume from a snapshot: ``creating`` until its image is made (then moto's states),
    ``error`` if that failed."""

    @property
    def status(self) -> str:
        made = self.__dict__.get("_made", "available")
        return str(made) if made != "available" else str(super().status)


def creating(volume: Any) -> None:
    """Make ``volume`` a :class:`LocalVolume`, ``creating`` until :func:`copy_done`."""
    retype(volume, LocalVolume)
    volume.__dict__["_made"] = "creating"


def copy_done(record: Any, error: str | None) -> None:
    """The engine's copy for a snapshot or volume record is over (``error``: it failed)."""
    if isinstance(record, LocalVolume):
        record.__dict__["_made"] = "available" if error is None else "error"
    elif isinstance(record, LocalSnapshot):
        record.status = "completed" if error is None else "error"
        if error is not None:
            record.state_message = error


def start_snapshot(
    backend: EC2Backend, engine: EngineHooks, record: Snapshot, image: Any, extra: float = 0.0
) -> None:
    """Make ``record`` a :class:`LocalSnapshot`, ``pending`` for the realism's snapshot time
    plus ``extra`` seconds, and have the engine copy ``image`` for it."""
    retype(record, LocalSnapshot)
    snapshot: Any = record
    snapshot.status = "pending"
    snapshot.started = time.monotonic()
    low, high = engine.realism.snapshot
    snapshot.duration = (engine.random.uniform(low, high) if high > 0 else 0.0) + extra
    try:
        engine.snapshot_created(snapshot.id, image)
    except LocalCloudError as e:
        backend.snapshots.pop(snapshot.id, None)
        raise ec2_error("InternalError", str(e)) from e


def snapshot_data(engine: EngineHooks, snapshot: Any) -> Path:
    """The engine's image of ``snapshot``, which must be completed (EC2's errors else)."""
    if snapshot.status != "completed":
        raise ec2_error("IncorrectState", f"Snapshot '{snapshot.id}' is not completed.")
    image = engine.snapshots.get(snapshot.id)
    if image is None:
        raise ec2_error(
            "UnsupportedOperation", f"{snapshot.id} is a record without data in the local cloud"
        )
    return image


def install_backend(backend: EC2Backend) -> None:
    """(Re)install ``backend`` unless it is in place (moto's resets clear the registry)."""
    accounts = ec2_backends[backend.account_id]
    if dict.get(accounts, backend.region_name) is not backend:
        dict.__setitem__(accounts, backend.region_name, backend)


def uninstall_backend(backend: EC2Backend) -> None:
    accounts = dict.get(ec2_backends, backend.account_id)
    if accounts is not None and dict.get(accounts, backend.region_name) is backend:
        dict.__delitem__(accounts, backend.region_name)
