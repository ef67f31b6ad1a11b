"""Launching where EC2 has capacity: fallback choices, partial launches, capacity on start.

``provision_servers(..., zones=[...], instance_types=[...])`` tries each choice of
``zones × instance_types`` in the order given (every type in the first zone, then every
type in the second ...) until the fleet is complete. A choice without capacity
(:class:`~asyncstage.errors.InsufficientCapacity`) or over the account's instance limit
(``InstanceLimitExceeded``, often per instance type) passes to the next; any other error
ends the launch. With several choices (or ``partial="keep"``) each RunInstances asks for
``MinCount=1``: EC2 launches as many as fit and the next choice launches the rest.

When every choice has been tried and the fleet is still short, ``partial`` decides:

- ``"terminate"`` (the default): every server launched for the fleet is terminated and
  :class:`~asyncstage.errors.InsufficientCapacity` raised (the caller has nothing to
  clean up);
- ``"keep"``: the servers that launched are kept (waited for until up, registered with
  the manager) and a :class:`~asyncstage.errors.FleetError` names the missing ones, the
  kept servers in its ``succeeded``.

A stopped server cannot move: its root volume is in its zone. Starting it where EC2 has
no capacity raises :class:`~asyncstage.errors.InsufficientCapacity` naming the server,
its zone and type; the others of a fleet start are started all the same.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

import anyio

from asyncstage import hostkeys
from asyncstage.ec2 import Resource, new_client_token, tag
from asyncstage.errors import EC2Error, InsufficientCapacity, InvalidArgument

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.refs import ServerRef

__all__ = [
    "PARTIAL",
    "LaunchChoices",
    "LaunchOptions",
    "LaunchSpec",
    "Launcher",
    "Partial",
    "check_choices",
    "choices",
    "launch_many",
    "launch_one",
    "register_launch",
    "start_where_able",
]

log = logging.getLogger("asyncstage")

Partial = Literal["keep", "terminate"]
"""What a fleet launch that falls short of its count does with what launched."""
PARTIAL: tuple[Partial, ...] = ("keep", "terminate")


@dataclass(frozen=True)
class LaunchOptions:
    """What a caller asked of new servers (None: the manager's default).

    ``zones`` and ``instance_types`` are the choices to fall back on when EC2 has no
    capacity, tried in order; ``partial`` what a fleet that stays short does with the
    servers that launched.
    """

    instance_type: str | None = None
    image: str | None = None
    availability_zone: str | None = None
    username: str | None = None
    architecture: str | None = None
    zones: tuple[str, ...] = ()
    instance_types: tuple[str, ...] = ()
    partial: Partial = "terminate"


@dataclass(frozen=True)
class LaunchSpec:
    """What one RunInstances call launches: servers with equal specs launch together."""

    image_id: str
    instance_type: str
    availability_zone: str | None
    username: str


class Launcher(Protocol):
    """What the choices here ask of the fleet that launches (:class:`~asyncstage.fleet.Fleet`)."""

    @property
    def ctx(self) -> Context: ...
    async def spec(self, options: LaunchOptions) -> LaunchSpec: ...
    async def launch_coalesced(self, spec: LaunchSpec, name: str) -> ServerRef: ...
    async def launch(
        self, spec: LaunchSpec, names: list[str], *, min_count: int | None = None
    ) -> dict[str, ServerRef]: ...
    async def cleanup_failed(self, servers: list[ServerRef]) -> None: ...
    def adopt(self, instance: Resource) -> ServerRef: ...


class LaunchChoices(TypedDict, total=False):
    """The fallback keywords of ``provision_server(s)``."""

    zones: Sequence[str]
    """Zones to try in order, instead of one ``availability_zone``."""
    instance_types: Sequence[str]
    """Instance types to try in order (in each zone), instead of one ``instance_type``."""
    partial: Partial
    """A fleet still short after the last choice: ``"terminate"`` (default) or ``"keep"``."""


def check_choices(
    zone: str | None,
    zones: Sequence[str] | None,
    instance_type: str | None,
    instance_types: Sequence[str] | None,
    partial: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fallback choices of a provision call, checked (InvalidArgument otherwise)."""
    if partial not in PARTIAL:
        raise InvalidArgument(f"partial must be 'keep' or 'terminate', not {partial!r}")
    if isinstance(zones, str) or isinstance(instance_types, str):
        raise InvalidArgument("zones and instance_types are lists (of names)")
    if zones and zone:
        raise InvalidArgument("give availability_zone or zones, not both")
    if instance_types and instance_type:
        raise InvalidArgument("give instance_type or instance_types, not both")
    if (zones is not None and not zones) or (instance_types is not None and not instance_types):
        raise InvalidArgument("zones and instance_types need at least one name each")
    return tuple(zones or ()), tuple(instance_types or ())


def choices(spec: LaunchSpec, options: LaunchOptions) -> list[LaunchSpec]:
    """The launch specs to try, in order: zones × instance types."""
    zones: Sequence[str | None] = options.zones or (spec.availability_zone,)
    types = options.instance_types or (spec.instance_type,)
    return [
        dataclasses.replace(spec, availability_zone=zone, instance_type=itype)
        for zone in zones
        for itype in types
    ]


_NO_ROOM = ("InsufficientInstanceCapacity", "InstanceLimitExceeded")


def _exhausted(tried: list[EC2Error], wanted: int, got: int) -> EC2Error:
    """The error of a launch that found too little room in every choice: the one error,
    or InsufficientCapacity summing them up (EC2Error when an instance limit was in it)."""
    last = tried[-1]
    if len(tried) == 1 and not got:
        return last
    short = f"{got} of {wanted} launched; " if got else ""
    message = f"no room for {wanted - got} server(s): {short}" + "; ".join(map(str, tried))
    if all(isinstance(e, InsufficientCapacity) for e in tried):
        return InsufficientCapacity(
            message,
            zone=getattr(last, "zone", None),
            instance_type=getattr(last, "instance_type", None),
            operation="RunInstances",
        )
    return EC2Error(message, code=last.code, operation="RunInstances")


async def launch_one(fleet: Launcher, options: LaunchOptions, name: str) -> ServerRef:
    """One server, in the first choice with capacity (sharing concurrent equal launches)."""
    tried: list[EC2Error] = []
    for spec in choices(await fleet.spec(options), options):
        try:
            return await fleet.launch_coalesced(spec, name)
        except EC2Error as e:
            if e.code not in _NO_ROOM:
                raise
            tried.append(e)
            log.info("server %s: %s; trying the next choice", name, e)
    raise _exhausted(tried, 1, 0)


async def launch_many(
    fleet: Launcher, options: LaunchOptions, names: list[str]
) -> tuple[dict[str, ServerRef], EC2Error | None]:
    """The servers of ``names`` launched across the choices, by name, and (``partial="keep"``
    only) the error naming those that found no capacity anywhere.

    With ``partial="terminate"`` a short fleet is terminated and the error raised. Whatever
    fails or is cancelled midway, the servers launched so far are terminated.
    """
    specs = choices(await fleet.spec(options), options)
    least = 1 if len(specs) > 1 or options.partial == "keep" else None
    launched: dict[str, ServerRef] = {}
    tried: list[EC2Error] = []
    try:
        for spec in specs:
            rest = [n for n in names if n not in launched]
            if not rest:
                break
            try:
                got = await fleet.launch(spec, rest, min_count=least)
            except EC2Error as e:
                if e.code not in _NO_ROOM:
                    raise
                tried.append(e)
                log.info("fleet: %s; trying the next choice", e)
                continue
            launched |= got
            if len(got) < len(rest):
                tried.append(
                    InsufficientCapacity(
                        f"only {len(got)} of {len(rest)} {spec.instance_type} server(s) "
                        f"launched in {spec.availability_zone or 'the region'}",
                        zone=spec.availability_zone,
                        instance_type=spec.instance_type,
                        operation="RunInstances",
                    )
                )
        if len(launched) == len(names):
            return launched, None
        error = _exhausted(tried, len(names), len(launched))
        if options.partial == "keep" and launched:
            return launched, error
        raise error
    except BaseException:
        if launched:
            with anyio.CancelScope(shield=True):
                await fleet.cleanup_failed(list(launched.values()))
        raise


async def start_where_able(
    fleet: Launcher, servers: Sequence[ServerRef]
) -> dict[ServerRef, Exception]:
    """StartInstances for these stopped servers (one call); those in a zone where EC2 has
    no capacity for their type get an :class:`InsufficientCapacity` naming them, and the
    others are started with one more call."""
    ec2 = fleet.ctx.ec2
    errors: dict[ServerRef, Exception] = {}
    todo = list(servers)
    while todo:
        try:
            await ec2.start_instances([s.instance_id for s in todo])
            return errors
        except InsufficientCapacity as e:
            stuck = [s for s in todo if _matches(s, e)] or todo
            for server in stuck:
                errors[server] = _cannot_start(server, e)
            todo = [s for s in todo if s not in stuck]
    return errors


def _matches(server: ServerRef, e: InsufficientCapacity) -> bool:
    itype = str(server.instance.get("InstanceType", ""))
    return (e.zone in (None, server.availability_zone)) and (e.instance_type in (None, itype))


def _cannot_start(server: ServerRef, e: InsufficientCapacity) -> InsufficientCapacity:
    itype = str(server.instance.get("InstanceType", "")) or e.instance_type
    return InsufficientCapacity(
        f"server {server.name} ({server.instance_id}) cannot start: EC2 has no {itype} "
        f"capacity in {server.availability_zone} now, and a stopped server stays in its zone "
        "(its volumes are there); start it again later",
        zone=server.availability_zone,
        instance_type=itype,
        operation="StartInstances",
    )


async def register_launch(
    fleet: Launcher,
    spec: LaunchSpec,
    names: list[str],
    common: dict[str, str],
    min_count: int | None,
) -> dict[str, ServerRef]:
    """RunInstances (with a ClientToken) and the registration of what it made: the first
    names get the instances when fewer than all launched (``min_count``)."""
    m = fleet.ctx
    token = new_client_token()
    # one user data for every instance of the call (and for its retries: one launch)
    key = hostkeys.LaunchKey.new() if m.host_keys == "user-data" else None
    deadline = time.monotonic() + m.account.patience
    while True:
        pair, group_id = await m.account.ensure()  # known already: no call
        try:
            instances = await m.ec2.run_instances(
                image_id=spec.image_id,
                count=len(names),
                min_count=min_count,
                instance_type=spec.instance_type,
                key_name=pair.name,
                security_group_ids=[group_id],
                availability_zone=spec.availability_zone,
                tags=common,
                client_token=token,
                user_data=key.user_data if key is not None else None,
            )
            break
        except EC2Error as e:
            # another manager's on_exit="terminate" removed the key pair or group, or
            # another process made them a moment ago and EC2 does not show them yet: look
            # again (the client token keeps the retries one launch)
            if e.code not in ("InvalidKeyPair.NotFound", "InvalidGroup.NotFound"):
                raise
            if time.monotonic() >= deadline:
                raise
            m.account.forget()
            await anyio.sleep(m.ec2.poll_interval)
    servers: dict[str, ServerRef] = {}
    for name, inst in zip(names, instances, strict=False):
        inst["Tags"] = _named_tags(inst.get("Tags", []), name, common)
        server = fleet.adopt(inst)
        server._expect_new_host_key(key.public if key is not None else None)
        servers[name] = server
    m.registry.mark_started(servers.values())
    return servers


def _named_tags(
    tags: list[dict[str, str]], name: str, common: dict[str, str]
) -> list[dict[str, str]]:
    """A launched instance's tags as they will be: its own name, and the launch's tags."""
    keys_there = {t["Key"] for t in tags}
    return [
        *(t for t in tags if t["Key"] not in (tag("name"), "Name")),
        {"Key": tag("name"), "Value": name},
        {"Key": "Name", "Value": name},
        *({"Key": k, "Value": v} for k, v in common.items() if k not in keys_there),
    ]
