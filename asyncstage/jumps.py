"""Jump hosts (bastions): how a Manager's servers are reached when they have no public address.

A jump host is named by a :data:`JumpSpec`: a managed :class:`~asyncstage.Server` (or its
name or instance id, looked up when first needed), an ``"user@host[:port]"`` ssh host
that is not managed, or an :class:`~asyncstage.ssh.SSHHost` made by the caller (its own
key, known_hosts and policy). An unmanaged ``user@host[:port]`` is reached with the
manager's key, its known_hosts and its host key policy, like its servers.

Which way a server is reached (:func:`route_for`):

* a jump host set for the server itself: through it, to the server's private address
  (a bastion sits in the VPC);
* else a public address: directly;
* else the manager's jump host: through it, to the private address;
* else :class:`~asyncstage.errors.NoRoute`, naming the fix.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol, Union

from asyncstage import shell
from asyncstage.errors import InvalidArgument, NoRoute, UnknownServer
from asyncstage.ssh import SSHHost

if TYPE_CHECKING:
    from asyncstage.account import Account
    from asyncstage.refs import ServerRef
    from asyncstage.registry import Registry
    from asyncstage.ssh import KnownHosts
    from asyncstage.ssh.known_hosts import HostKeyPolicy

__all__ = [
    "JumpContext",
    "JumpSpec",
    "check_jump",
    "jump_of",
    "remember",
    "route_for",
    "set_jump",
    "ssh_target",
]

JumpSpec = Union["ServerRef", SSHHost, str]
"""A jump host: a managed server (object, name or instance id), ``"user@host[:port]"``,
or an :class:`~asyncstage.ssh.SSHHost`."""

_UNMANAGED = re.compile(
    r"(?P<user>[^@]+)@(?P<host>[^@:\[\]]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?"
)


def _unmanaged(spec: str) -> tuple[str, str, int] | None:
    """(user, host, port) of ``"user@host[:port]"``; None for a server's name or id."""
    if "@" not in spec:
        return None
    found = _UNMANAGED.fullmatch(spec)
    if found is None:
        raise InvalidArgument(f"jump_host: 'user@host[:port]' or a server, not {spec!r}")
    user = shell.check_login_user(found["user"])
    host = shell.check_address(found["host"].strip("[]"))
    port = int(found["port"] or 22)
    if not 0 < port < 65536:
        raise InvalidArgument(f"jump_host: port {port} of {spec!r} is out of range")
    return user, host, port


def check_jump(spec: object) -> JumpSpec | None:
    """``spec`` if it names a jump host (or is None); InvalidArgument otherwise."""
    spec = getattr(spec, "_async", spec)  # a blocking twin: the Server it wraps
    if spec is None or isinstance(spec, SSHHost):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise InvalidArgument("jump_host: an empty name")
        _unmanaged(spec)
        return spec
    if hasattr(spec, "instance_id") and hasattr(spec, "host"):
        return spec  # type: ignore[return-value]  # a Server (a class of the caller's)
    raise InvalidArgument(f"jump_host: a Server, 'user@host[:port]' or an SSHHost, not {spec!r}")


class JumpContext(Protocol):
    """What the jump host lookups use of a manager's context."""

    @property
    def jump_host(self) -> JumpSpec | None: ...
    @property
    def server_jump_hosts(self) -> dict[str, JumpSpec]: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def account(self) -> Account: ...
    @property
    def known_hosts(self) -> KnownHosts: ...
    @property
    def host_key_policy(self) -> HostKeyPolicy: ...


def _resolve(ctx: JumpContext, spec: JumpSpec, server: ServerRef) -> SSHHost:
    """The ssh host that ``spec`` names, for reaching ``server``."""
    if isinstance(spec, SSHHost):
        return spec
    if isinstance(spec, str):
        unmanaged = _unmanaged(spec)
        if unmanaged is not None:
            return _unmanaged_host(ctx, spec, *unmanaged)
        jump = server.manager.find_server_by_name(spec)
        if jump is None:
            try:
                jump = server.manager.find_server_by_instance(spec)
            except UnknownServer as e:
                raise UnknownServer(
                    f"jump host {spec!r} (for {server.name}): no managed server of that name or "
                    "id; give a Server, 'user@host[:port]' or an SSHHost"
                ) from e
    else:
        jump = spec
    if jump is server or jump.instance_id in _resolving:
        raise InvalidArgument(f"{server.name}: its jump hosts loop back to {jump.name}")
    _resolving.add(server.instance_id)
    try:
        return jump.host
    finally:
        _resolving.discard(server.instance_id)


_resolving: set[str] = set()
"""The servers whose jump host is being looked up (a chain that loops ends there)."""


def _unmanaged_host(ctx: JumpContext, spec: str, user: str, host: str, port: int) -> SSHHost:
    """One SSHHost per ``user@host[:port]`` and manager (closed with the manager)."""
    made = ctx.registry.jump_hosts
    if spec not in made:
        made[spec] = SSHHost(
            host,
            port=port,
            username=user,
            client_keys=[ctx.account.local_key().private_key],
            known_hosts=ctx.known_hosts,
            host_key_policy=ctx.host_key_policy,
            label=f"jump host {spec}",
        )
    return made[spec]


def jump_of(server: ServerRef, ctx: JumpContext) -> JumpSpec | None:
    """``server``'s own jump host, else the manager's when it has no public address."""
    own = ctx.server_jump_hosts.get(server.name)
    if own is not None:
        return own
    return None if server.instance.get("PublicIpAddress") else ctx.jump_host


def set_jump(ctx: JumpContext, name: str, spec: object) -> None:
    """Give the server ``name`` a jump host of its own (also before it exists: waiting for
    a launched server goes through it); None: back to the default."""
    checked = check_jump(spec)
    if checked is None:
        ctx.server_jump_hosts.pop(name, None)
    else:
        ctx.server_jump_hosts[name] = checked


def remember(ctx: JumpContext, spec: JumpSpec | None, *names: str) -> None:
    """Jump host ``spec`` for the servers ``names`` about to be launched (None: none)."""
    if spec is not None:
        for name in names:
            set_jump(ctx, name, spec)


def ssh_target(server: ServerRef, ctx: JumpContext) -> tuple[str, JumpSpec | None]:
    """(the address ssh connects to, the jump host it goes through) for ``server``
    (see the module docstring); NoRoute when there is none. Nothing is looked up."""
    public = server.instance.get("PublicIpAddress")
    private = server.instance.get("PrivateIpAddress")
    own = ctx.server_jump_hosts.get(server.name)
    if own is not None and (private or public):
        return str(private or public), own
    if public:
        return str(public), None
    default = ctx.jump_host
    if private and default is not None:
        return str(private), default
    raise NoRoute(
        "it has no public address and no jump host is set: pass jump_host= (a server "
        "with a public address in its VPC, or 'user@bastion') to the Manager, to "
        "provision_server/get_server, or set server.jump_host",
        host=f"{server.name} ({server.instance_id})",
    )


def route_for(server: ServerRef, ctx: JumpContext) -> tuple[str, SSHHost | None]:
    """:func:`ssh_target` with the jump host resolved to the ssh host it names."""
    address, spec = ssh_target(server, ctx)
    return address, None if spec is None else _resolve(ctx, spec, server)
