"""Choices a Manager is configured with, each with its values and its check in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, cast, get_args

from asyncstage.errors import InvalidArgument
from asyncstage.timeouts import Timeouts, timeouts_from

if TYPE_CHECKING:
    from asyncstage.ec2 import RetryMode
    from asyncstage.ssh.known_hosts import HostKeyPolicy

__all__ = [
    "HOST_KEY_SOURCES",
    "LOCAL_CREDENTIALS",
    "ON_EXIT",
    "TIMING_KEYWORDS",
    "Access",
    "Connection",
    "HostKeySource",
    "Launch",
    "ManagerKeywords",
    "OnExit",
    "Settings",
    "Storage",
    "check_host_keys",
    "check_on_exit",
    "local_credentials",
    "settings_from",
]

_S = TypeVar("_S", "Connection", "Launch", "Access", "Storage")

OnExit = Literal["stop", "terminate", "run"]
"""What a Manager does with the servers it started when it closes."""

ON_EXIT: tuple[str, ...] = get_args(OnExit)


def check_on_exit(value: str, where: str = "on_exit") -> OnExit:
    """``value`` if it is an :data:`OnExit`, else InvalidArgument naming ``where``."""
    if value in ON_EXIT:
        return cast(OnExit, value)
    raise InvalidArgument(f"{where} must be one of {', '.join(ON_EXIT)}, not {value!r}")


HostKeySource = Literal["console", "user-data"]
"""Where a new server's host key is learned before the first contact: ``console`` (its
console's fingerprints), ``user-data`` (a key made here and given in its cloud-init user
data, replaced at the first contact; see :mod:`asyncstage.hostkeys`)."""

HOST_KEY_SOURCES: tuple[str, ...] = get_args(HostKeySource)


def check_host_keys(value: str, where: str = "host_keys") -> HostKeySource:
    """``value`` if it is a :data:`HostKeySource`, else InvalidArgument naming ``where``."""
    if value in HOST_KEY_SOURCES:
        return cast(HostKeySource, value)
    raise InvalidArgument(f"{where} must be one of {', '.join(HOST_KEY_SOURCES)}, not {value!r}")


LOCAL_CREDENTIALS = {
    "aws_access_key_id": "asyncstage-local",
    "aws_secret_access_key": "asyncstage-local",
}
"""The fixed credentials of a local cloud that does not check signatures (a test's)."""


def local_credentials(found: Mapping[str, Any]) -> dict[str, str]:
    """A local cloud's credentials: those ``found`` in its session or record (the cloud
    checks every request's signature), else :data:`LOCAL_CREDENTIALS`."""
    return {key: str(found.get(key, default)) for key, default in LOCAL_CREDENTIALS.items()}


# -- the settings objects of a Manager (as httpx's Timeout and Limits) -----------------------


@dataclass(frozen=True)
class Connection:
    """How a Manager reaches EC2: the endpoint, the credentials, the retry mode.

    Left out (None): botocore's own lookup (environment, profile, instance role).
    """

    endpoint_url: str | None = None
    """Another endpoint than AWS's (the local cloud ...)."""
    profile: str | None = None
    """A named profile of the AWS configuration files."""
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    retry_mode: RetryMode = "adaptive"
    """botocore's retry mode: ``adaptive`` also paces calls after throttling."""
    request_rate: float | None = 1.0
    """Non-mutating calls (``Describe*``, ``Get*``) and ``CreateTags`` go out at this
    multiple of EC2's default request rate (:mod:`asyncstage.ec2.rate`): more for an
    account whose limits AWS raised, ``None`` not paced at all."""


@dataclass(frozen=True)
class Launch:
    """What new servers are launched from and as (None: the default named)."""

    instance_type: str | None = None
    """None: ``t3.micro``, or ``t4g.micro`` for ``arm64``."""
    image: str | None = None
    """An image id or a name pattern; None: the newest Ubuntu LTS of the architecture."""
    image_owners: Sequence[str] | None = None
    """Whose images a name pattern may match (account ids or aliases)."""
    architecture: str = "x86_64"
    root_type: str | None = "ebs"
    """The root device type images must have (None: any)."""
    availability_zone: str | None = None
    """None: where EC2 puts them."""
    username: str | None = None
    """The login user; None: the one the image's name implies."""

    @property
    def effective_instance_type(self) -> str:
        """``instance_type``, else ``t3.micro`` (``t4g.micro`` for ``arm64``)."""
        default = "t4g.micro" if self.architecture == "arm64" else "t3.micro"
        return self.instance_type or default


@dataclass(frozen=True)
class Access:
    """How this machine gets in: the key pair, the security group, host key checking."""

    ssh_cidr: str | Sequence[str] | None = None
    """Who the security group lets in on port 22; None: this machine's address as EC2
    sees it (a /32)."""
    security_group: str = "asyncstage"
    reuse_key: bool = True
    """Use the dot directory's key pair again (False: a new one for this manager)."""
    host_key_policy: HostKeyPolicy = "strict"
    """When a new server's console shows no fingerprints in time: ``strict`` refuses,
    ``accept-new`` pins the first key seen."""
    host_keys: HostKeySource = "console"
    """Where a new server's host key comes from: ``console`` (its console's fingerprints:
    no secret leaves this machine) or ``user-data`` (a key made here, given in its
    cloud-init user data and replaced at the first contact: no wait for the console)."""
    checkip_url: str | None = None
    """Where this machine asks its own public address when ``ssh_cidr`` is None (EC2's
    checkip service by default; a local endpoint without one: 127.0.0.1/32)."""


@dataclass(frozen=True)
class Storage:
    """How volumes are made and mounted."""

    reuse_volumes: bool = True
    """``provision_volume(name)`` takes an existing volume (or the newest snapshot) of
    that name."""
    mount_options: str = "nosuid,nodev"
    """The ``mount -o`` options of every volume mount."""
    install_packages: bool = True
    """Install a missing ``mkfs`` program on a server with apt-get."""


class ManagerKeywords(TypedDict, total=False):
    """The settings a Manager also takes one by one, as keyword arguments (each one
    overrides its field of the settings object passed)."""

    endpoint_url: str | None
    profile: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    retry_mode: RetryMode
    request_rate: float | None
    instance_type: str | None
    image: str | None
    image_owners: Sequence[str] | None
    availability_zone: str | None
    username: str | None
    architecture: str
    root_type: str | None
    ssh_cidr: str | Sequence[str] | None
    security_group: str
    reuse_key: bool
    host_key_policy: HostKeyPolicy
    host_keys: HostKeySource
    checkip_url: str | None
    reuse_volumes: bool
    mount_options: str
    install_packages: bool
    server_timeout: float | None
    volume_timeout: float | None
    snapshot_timeout: float | None
    exit_timeout: float | None
    console_timeout: float | None
    poll_interval: float | None
    launch_window: float | None


@dataclass(frozen=True)
class Settings:
    """A Manager's settings objects, each with the keywords given one by one put in."""

    connection: Connection
    launch: Launch
    access: Access
    storage: Storage
    timeouts: Timeouts


TIMING_KEYWORDS = {
    "server_timeout": "server",
    "volume_timeout": "volume",
    "snapshot_timeout": "snapshot",
    "exit_timeout": "exit",
    "console_timeout": "console",
    "poll_interval": "poll_interval",
    "launch_window": "launch_window",
}
"""The timing keywords of a Manager and the field of :class:`Timeouts` each one sets."""


def settings_from(
    connection: Connection | None,
    launch: Launch | None,
    access: Access | None,
    storage: Storage | None,
    timeouts: Timeouts | None,
    keywords: Mapping[str, Any],
) -> Settings:
    """The settings objects given (their defaults where None) with the ``keywords``
    (:class:`ManagerKeywords`) put in; TypeError names a keyword that is none of them.

    A keyword given as None where None is the field's default leaves the object's field
    as it is (None says "not given", as it did for the timings)."""
    unknown = set(keywords) - set(ManagerKeywords.__annotations__)
    if unknown:
        raise TypeError(f"Manager() got unexpected keyword arguments: {', '.join(sorted(unknown))}")

    def put(obj: _S) -> _S:
        unset = {f.name: f.default is None for f in fields(obj)}
        given = {k: v for k, v in keywords.items() if k in unset}
        return replace(obj, **{k: v for k, v in given.items() if v is not None or not unset[k]})

    timings = {TIMING_KEYWORDS[k]: v for k, v in keywords.items() if k in TIMING_KEYWORDS}
    return Settings(
        put(connection or Connection()),
        put(launch or Launch()),
        put(access or Access()),
        put(storage or Storage()),
        timeouts_from(timeouts, **timings),
    )
