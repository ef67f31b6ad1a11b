"""Context: the one small object a Manager's parts and handles receive instead of it.

A :class:`Context` holds what the parts use: the EC2 client, the registry, the timings,
the known hosts, the account set-up (key pair and security group), the images, and the
few settings they read. The :class:`~asyncstage.Manager` makes one and hands it to its
:class:`~asyncstage.fleet.Fleet`, and through itself (:class:`ManagerRef`) to every
:class:`~asyncstage.Server` and :class:`~asyncstage.Volume`; no part holds the Manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from asyncstage import keys
from asyncstage.account import Account
from asyncstage.ec2 import EC2, Resource
from asyncstage.images import Images
from asyncstage.refs import FleetRef, LookupRef, ServerRef
from asyncstage.registry import Registry
from asyncstage.settings import HostKeySource, Launch, Storage
from asyncstage.ssh import KnownHosts
from asyncstage.ssh.known_hosts import HostKeyPolicy
from asyncstage.timeouts import Timeouts

if TYPE_CHECKING:
    from asyncstage.jumps import JumpSpec

__all__ = ["Context", "ManagerRef", "ServerFactory"]

ServerFactory = Callable[[Resource, Path | None, str], ServerRef]
"""Makes the handle of an EC2 instance: (description, key file, login user name)."""


@dataclass(eq=False)
class Context:
    """What the parts of one Manager share (see the module's docstring)."""

    ec2: EC2
    registry: Registry
    timeouts: Timeouts
    known_hosts: KnownHosts
    account: Account
    images: Images
    region: str
    dotdir: Path
    make_server: ServerFactory
    launch: Launch
    storage: Storage
    host_key_policy: HostKeyPolicy = "strict"
    host_keys: HostKeySource = "console"
    """Where new servers' host keys come from (:data:`~asyncstage.settings.HostKeySource`)."""
    verbosity: int = 1
    jump_host: JumpSpec | None = None
    """The jump host of servers without a public address (:mod:`asyncstage.jumps`)."""
    server_jump_hosts: dict[str, JumpSpec] = field(default_factory=dict)
    """Jump hosts set for single servers, by server name (``Server.jump_host``)."""
    fleet: FleetRef = field(init=False)
    """The manager's fleet (set by the Manager once it is made: the fleet takes this
    context)."""

    def known_key_names(self) -> set[str]:
        """The EC2 key pairs whose private keys this manager holds (its dot directory's):
        only servers launched with one, and volumes and snapshots whose owner tag names
        one, are adopted."""
        names = set(keys.keyfiles(self.dotdir, self.region))
        pair = self.account.key_pair  # a key made with reuse_key=False, once there is one
        return names | ({pair.name} if pair else set())


class ManagerRef(LookupRef, Protocol):
    """What a server or volume holds of its manager: the lookups and the context."""

    @property
    def context(self) -> Context: ...
