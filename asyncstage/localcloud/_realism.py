"""How much of EC2's behaviour a local cloud plays: the parameters, in one place.

``LocalCloud(realism="aws")`` (the default) plays what real EC2 does that a kinder cloud
would hide: eventual consistency (some new ids unknown for a moment), throttling, missing
capacity, a late console, public addresses that change at every start, busy detaches,
slow snapshots, device nodes that come a moment after AttachVolume (on Nitro even after
``attached``). AWS's times (minutes) are scaled down to seconds so that tests stay fast;
each is a field of :class:`Realism` (a ``(low, high)`` pair is drawn uniformly from the
cloud's seeded generator). ``realism="harsh"`` is ``aws`` with every new id hidden for a while (for
tests of retries); ``realism="off"`` is the instant cloud.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from asyncstage.errors import InvalidArgument

Span = tuple[float, float]
"""Seconds, drawn uniformly between low and high."""

CapacityGaps = Mapping[str, frozenset[str] | None]
"""Zone -> the instance types without capacity there (None: every type)."""


@dataclass(frozen=True)
class Bucket:
    """EC2's token bucket of each action of a category at ``api_rate=1.0``: ``burst`` tokens,
    ``refill`` per second.

    Request buckets take one token per call; resource buckets (RunInstances,
    StartInstances, StopInstances, TerminateInstances) one per instance named.
    """

    burst: float
    refill: float
    per_instance: bool = False


# AWS "Request throttling for the Amazon EC2 API" (account-level defaults).
BUCKETS: Mapping[str, Bucket] = {
    "describe": Bucket(100, 20),  # non-mutating Describe*/Get*
    "describe-unfiltered": Bucket(50, 10),  # DescribeInstances/Volumes/Snapshots, no filter/ids
    "mutating": Bucket(50, 5),  # every other mutating action
    "CreateTags": Bucket(100, 10),
    "volumes": Bucket(100, 5),  # CreateVolume, DeleteVolume, CreateSnapshot
    "launch": Bucket(1000, 2, per_instance=True),  # RunInstances, StartInstances
    "halt": Bucket(1000, 20, per_instance=True),  # StopInstances, TerminateInstances
}


def bucket_of(action: str, *, unfiltered: bool = False) -> str:
    """The :data:`BUCKETS` category whose bucket size an API action's own bucket has."""
    if action in ("RunInstances", "StartInstances"):
        return "launch"
    if action in ("StopInstances", "TerminateInstances"):
        return "halt"
    if action in ("CreateVolume", "DeleteVolume", "CreateSnapshot"):
        return "volumes"
    if action == "CreateTags":
        return "CreateTags"
    if action.startswith(("Describe", "Get")):
        if unfiltered and action in (
            "DescribeInstances",
            "DescribeVolumes",
            "DescribeSnapshots",
        ):
            return "describe-unfiltered"
        return "describe"
    return "mutating"


@dataclass(frozen=True)
class Realism:
    """What the local cloud plays of EC2, and how fast (seconds, scaled down from AWS).

    ============================  =============  ==========================================
    field                         ``aws``        on AWS
    ============================  =============  ==========================================
    ``consistency``               0.1 - 0.5 s    a new id is ``...NotFound`` for seconds
    ``consistency_share``         0.1            the share of new ids hidden so (``harsh``:
                                                 all of them); most are seen at once
    ``console``                   0.5 - 1.5 s    GetConsoleOutput empty for 2 - 20 minutes
    ``console_latest``            0 - 0.1 s      ``Latest=True`` on Nitro: current output
    ``device``                    0.05 - 0.3 s   the volume's node comes after AttachVolume:
                                                 Nitro (NVMe hotplug) after ``attached``;
                                                 Xen ``attaching`` until it is there
    ``snapshot``                  0.5 - 1.5 s    ``pending`` with rising Progress, minutes+
    ``copy_per_gib``              2.0 s          a CopySnapshot is ``pending`` for longer
                                                 the more data it copies (per GiB used,
                                                 after ``snapshot``)
    ``snapshot_interval``         1.0 s          SnapshotCreationPerVolumeRateExceeded
    ``busy_detach``               True           a mounted volume's detach stays ``busy``
    ``moving_public_address``     True           a new public address at every start
    ``api_rate``                  1.0            AWS's token buckets (:data:`BUCKETS`)
    ``insufficient_capacity``     none           InsufficientInstanceCapacity there
    ``launch_failure``            0.0            pending -> terminated, Server.InternalError
    ``instance_limit``            none           InstanceLimitExceeded past it (live
                                                 instances); MinCount..MaxCount launches
                                                 what fits
    ``clock_offset``              0 s            EC2's clock is not this machine's: the
                                                 API's ``Date`` header and ``LaunchTime``
                                                 run this many seconds off it (botocore
                                                 corrects its signatures, nothing else)
    ``pending``                   0 s            10 - 40 s ``pending`` from the launch, on
                                                 hardware of its own: the host's boot here
                                                 runs inside it (``boot_delay`` comes after)
    ``cloud_init``                True           the image's cloud-init honours the
                                                 cloud-config ``ssh_keys`` of the user
                                                 data at the first boot (False: an image
                                                 without cloud-init)
    ``terminated_visible``        60 s           a terminated instance stays listed for
                                                 about an hour, then is gone (``None``:
                                                 listed for the cloud's whole life)
    ============================  =============  ==========================================
    """

    name: Literal["aws", "off", "harsh", "custom"] = "aws"
    consistency: Span = (0.1, 0.5)
    consistency_share: float = 0.1
    console: Span = (0.5, 1.5)
    console_latest: Span = (0.0, 0.1)
    device: Span = (0.05, 0.3)
    snapshot: Span = (0.5, 1.5)
    copy_per_gib: float = 2.0
    snapshot_interval: float = 1.0
    busy_detach: bool = True
    moving_public_address: bool = True
    api_rate: float | None = 1.0
    insufficient_capacity: CapacityGaps = field(default_factory=dict)
    launch_failure: float = 0.0
    instance_limit: int | None = None
    clock_offset: float = 0.0
    pending: float = 0.0
    terminated_visible: float | None = 60.0
    cloud_init: bool = True

    @classmethod
    def off(cls) -> Realism:
        """The instant cloud: everything at once, nothing throttled or refused."""
        return cls(
            name="off",
            consistency=(0.0, 0.0),
            console=(0.0, 0.0),
            console_latest=(0.0, 0.0),
            device=(0.0, 0.0),
            snapshot=(0.0, 0.0),
            copy_per_gib=0.0,
            snapshot_interval=0.0,
            busy_detach=False,
            moving_public_address=False,
            api_rate=None,
        )

    @classmethod
    def harsh(cls) -> Realism:
        """``aws``, but every new id is hidden for 0 - 0.5 s (the tests of retries)."""
        return cls(name="harsh", consistency=(0.0, 0.5), consistency_share=1.0)

    def consistency_window(self, draw: Callable[[], float]) -> float:
        """How long a new id stays hidden: 0 (seen at once) or a window of
        :attr:`consistency`, for :attr:`consistency_share` of the ids; ``draw`` gives
        uniform numbers in [0, 1) (the cloud's seeded generator)."""
        low, high = self.consistency
        if high <= 0 or draw() >= self.consistency_share:
            return 0.0
        return low + (high - low) * draw()


def capacity_gaps(spec: Iterable[str] | Mapping[str, Iterable[str] | None] | None) -> CapacityGaps:
    """``{"us-east-1b"}`` or ``{"us-east-1b": ["t3.micro"]}`` as :data:`CapacityGaps`."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        raise InvalidArgument("insufficient_capacity: a set of zones or a zone -> types mapping")
    if isinstance(spec, Mapping):
        return {
            str(zone): None if types is None else frozenset(map(str, types))
            for zone, types in spec.items()
        }
    return {str(zone): None for zone in spec}


def resolve(
    realism: Literal["aws", "off", "harsh"] | Realism,
    *,
    api_rate: float | Literal["default"] | None = "default",
    insufficient_capacity: Iterable[str] | Mapping[str, Iterable[str] | None] | None = None,
) -> Realism:
    """The :class:`Realism` that ``LocalCloud(realism=..., api_rate=..., ...)`` asks for."""
    if isinstance(realism, Realism):
        base = realism
    elif realism == "aws":
        base = Realism()
    elif realism == "off":
        base = Realism.off()
    elif realism == "harsh":
        base = Realism.harsh()
    else:
        raise InvalidArgument(f"realism: 'aws', 'harsh', 'off' or a Realism, not {realism!r}")
    changes: dict[str, object] = {}
    if api_rate != "default":
        if api_rate is not None and not api_rate > 0:
            raise InvalidArgument(f"api_rate must be positive or None, not {api_rate!r}")
        changes["api_rate"] = api_rate
    if insufficient_capacity is not None:
        changes["insufficient_capacity"] = capacity_gaps(insufficient_capacity)
    return dataclasses.replace(base, **changes) if changes else base  # type: ignore[arg-type]
