"""Fleet: launching servers (concurrent equal launches share one RunInstances call),
waiting for them, starting, stopping and terminating them at once, and fleet results."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import anyio

from asyncstage import capacity, keys
from asyncstage.account import LIVE_STATES, reading_only
from asyncstage.adoption import ours, owner_tags
from asyncstage.capacity import LaunchOptions, LaunchSpec
from asyncstage.disks import FSTYPES
from asyncstage.ec2 import Resource, tag, tag_filters, tags_of
from asyncstage.errors import (
    AsyncstageError,
    FleetError,
    InvalidArgument,
    NameTaken,
    UnknownServer,
    UnknownVolume,
)
from asyncstage.images import user_for_image
from asyncstage.transfer import sweep_stale_keys

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.refs import ServerRef, VolumeRef

__all__ = ["Fleet"]

log = logging.getLogger("asyncstage")

_Errors: TypeAlias = "dict[ServerRef, Exception]"
"""What failed, by server."""

_SSH_SLOTS = 32
"""How many servers of a wait may be reaching theirs (ssh handshakes) at once."""


@dataclass
class _Batch:
    names: list[str] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    servers: dict[str, ServerRef] = field(default_factory=dict)
    error: BaseException | None = None


def fleet_result(
    action: str, servers: Sequence[ServerRef], errors: dict[ServerRef, Exception]
) -> list[ServerRef]:
    """The servers; a FleetError when any of them failed (``succeeded``: the others)."""
    ok = [s for s in servers if s not in errors]
    if errors:
        names = ", ".join(f"{s.name} ({s.instance_id})" for s in errors)
        raise FleetError(
            f"{len(errors)} of {len(servers)} server(s) failed to {action}: {names}",
            list(errors.values()),
            succeeded=ok,
        )
    return ok


def one_result(errors: dict[ServerRef, Exception]) -> None:
    """Raise the error of the one server an action was for, if it failed."""
    for error in errors.values():
        raise error


class Fleet:
    """The servers of one Manager as a fleet: one EC2 call for many servers. Its
    :class:`~asyncstage.context.Context` gives the settings, the registry and the account
    set-up (the key pair and group are made sure of at each launch: another manager may
    have removed them)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._batches: dict[LaunchSpec, _Batch] = {}
        self._zone_locks: dict[str, anyio.Lock] = {}

    def names_for(self, names_or_count: int | Sequence[str] | None, count: int | None) -> list[str]:
        """The names of a fleet to launch: given, or so many fresh ones."""
        if (names_or_count is None) == (count is None):
            raise InvalidArgument("provision_servers needs names, a number, or count=")
        what: int | Sequence[str] = names_or_count if names_or_count is not None else count or 0
        if isinstance(what, int):
            names = [self.ctx.registry.new_server_name() for _ in range(what)]
        else:
            names = list(what)
        if not names:
            raise InvalidArgument("provision_servers needs at least one server")
        return names

    async def get(self, name: str | None, options: LaunchOptions, timeout: float) -> ServerRef:
        """The server of that name, started if stopped; a new one when there is none."""
        server = self.ctx.registry.find_server_by_name(name) if name is not None else None
        if server is None:
            return await self.provision_one(
                name or self.ctx.registry.new_server_name(), options, timeout
            )
        if not await server.ping():
            await server.start(timeout=timeout)
        return server

    async def server_in_zone(self, zone: str) -> ServerRef:
        """A server up in this zone: a running one, else a started one, else a new one."""
        lock = self._zone_locks.setdefault(zone, anyio.Lock())
        async with lock:
            in_zone = [s for s in self.ctx.registry.servers() if s.availability_zone == zone]
            for server in in_zone:
                if server.state == "running" and await server.ping():
                    return server
            for server in in_zone:
                if server.state in ("stopped", "stopping"):
                    await server.start()
                    return server
            return await self.provision_one(
                self.ctx.registry.new_server_name(),
                LaunchOptions(availability_zone=zone),
                self.ctx.timeouts.server,
            )

    async def zone_for_volume(self, volume_id: str | None, zone: str | None) -> str:
        """The zone a volume is provisioned in: the one asked for, the manager's, the
        existing volume's, a running server's, else the region's first."""
        m = self.ctx
        zone = zone or m.launch.availability_zone
        if zone is None and volume_id is not None:
            found = await m.ec2.describe_volumes([volume_id])
            if not found:
                raise UnknownVolume(f"volume {volume_id} does not exist")
            zone = str(found[0]["AvailabilityZone"])
        if zone is None:
            up = [s for s in m.registry.servers() if s.state == "running"]
            zone = up[0].availability_zone if up else (await m.ec2.availability_zones())[0]
        return zone

    async def reuse_volume(
        self, name: str | None, volume_id: str | None, *, reuse: bool, mtpt: str | None
    ) -> VolumeRef | None:
        """Manager.provision_volume of a name in use: that volume, mounted where it is
        attached or on a server in its zone (NameTaken unless ``reuse``); else None."""
        if name is None or volume_id is not None:
            return None
        volume = self.ctx.registry.find_volume_by_name(name)
        if volume is None:
            return None
        if not reuse:
            raise NameTaken(f"a volume named {name!r} exists already ({volume.volume_id})")
        if not (volume.mounted or (volume.fstype == "raw" and volume.server)):
            await volume.mount(mtpt=mtpt)
        return volume

    def _log(self, message: str) -> None:
        if self.ctx.verbosity >= 1:
            log.info("%s", message)
        else:
            log.debug("%s", message)

    # -- adopting and launching ----------------------------------------------------------------

    def adopt(self, instance: Resource) -> ServerRef:
        """The Server for this EC2 description: the registered one (refreshed) or a new one."""
        m = self.ctx
        server = m.registry.server(str(instance["InstanceId"]))
        if server is not None:
            server._record_description(instance)
            return server
        pair = m.account.key_pair  # never made here: adopting reads only
        if pair and instance.get("KeyName") == pair.name:
            keyfile: Path | None = pair.private_key
        else:
            known = keys.keyfiles(m.dotdir, m.region)
            keyfile = known.get(str(instance.get("KeyName", "")))
        username = tags_of(instance).get(tag("user")) or m.launch.username or "ubuntu"
        return m.registry.add_server(m.make_server(instance, keyfile, username))

    async def adopt_region(self) -> None:
        """Adopt the servers and volumes earlier managers made (by tags), and their mounts."""
        m = self.ctx
        instances = await m.ec2.describe_instances(
            filters=[
                *tag_filters({tag("role"): "server"}),
                {"Name": "instance-state-name", "Values": LIVE_STATES},
            ]
        )
        known = m.known_key_names()
        for inst in ours("server", instances, keys=known, fstypes=FSTYPES):
            self.adopt(inst)
        described = await m.ec2.describe_volumes(filters=tag_filters({tag("role"): "volume"}))
        by_server = m.registry.adopt_volumes(ours("volume", described, keys=known, fstypes=FSTYPES))

        async def mounts_of(server: ServerRef, volumes: list[VolumeRef]) -> None:
            try:
                if await server.ping():
                    await server._adopt_mounts(volumes)
                    # a server the scan touches loses the temporary transfer keys a dead
                    # controller left authorised (best effort: the scan goes on)
                    await sweep_stale_keys(server.host)
            except AsyncstageError as e:
                log.warning("cannot read the mounts of %s: %s", server.name, e)

        # reads only: a server whose group does not admit this machine yet stays unread
        with reading_only():
            async with anyio.create_task_group() as tg:
                for server, volumes in by_server.items():
                    tg.start_soon(mounts_of, server, volumes)

    async def spec(self, options: LaunchOptions) -> LaunchSpec:
        """The launch spec of these options, the manager's defaults filled in."""
        m = self.ctx
        desc = await m.images.find(options.image, options.architecture or m.launch.architecture)
        return LaunchSpec(
            image_id=str(desc["ImageId"]),
            instance_type=options.instance_type or m.launch.effective_instance_type,
            availability_zone=options.availability_zone or m.launch.availability_zone,
            username=options.username or m.launch.username or user_for_image(desc),
        )

    async def launch(
        self, spec: LaunchSpec, names: list[str], *, min_count: int | None = None
    ) -> dict[str, ServerRef]:
        """One RunInstances call for all these names; the servers, registered, by name
        (with ``min_count``, maybe only the first names: as many as EC2 launched)."""
        m = self.ctx
        common = {tag("role"): "server", tag("user"): spec.username}
        common |= owner_tags(m.account.local_key().name)
        if len(names) == 1:
            common |= {tag("name"): names[0], "Name": names[0]}
        self._log(f"launching {len(names)} server(s): {', '.join(names)}")
        await self.ctx.account.ensure()  # the key pair and group: made or checked when first needed
        # create-and-register is one step for cancellation: once RunInstances is sent its
        # instances are registered (and so cleaned up by the caller) before a cancellation
        # is delivered; the token makes the retry below idempotent
        with anyio.CancelScope(shield=True):
            servers = await capacity.register_launch(self, spec, names, common, min_count)
        if len(names) > 1:
            try:
                await self._name_all(servers)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.cleanup_failed(list(servers.values()))
                raise
        return servers

    async def _name_all(self, servers: dict[str, ServerRef]) -> None:
        """Tag each server of one launch with its own name (10 calls at a time)."""
        limiter = anyio.CapacityLimiter(10)

        async def name_it(name: str, server: ServerRef) -> None:
            async with limiter:
                await self.ctx.ec2.create_tags(
                    [server.instance_id], {tag("name"): name, "Name": name}
                )

        async with anyio.create_task_group() as tg:
            for name, server in servers.items():
                tg.start_soon(name_it, name, server)

    async def launch_coalesced(self, spec: LaunchSpec, name: str) -> ServerRef:
        """Launch one server, sharing the RunInstances call of concurrent equal requests."""
        batch = self._batches.get(spec)
        leader = batch is None
        if batch is None:
            batch = self._batches[spec] = _Batch()
        batch.names.append(name)
        if leader:
            try:
                await anyio.sleep(self.ctx.timeouts.launch_window)
                del self._batches[spec]
                batch.servers = await self.launch(spec, batch.names)
            except BaseException as e:
                batch.error = e
                raise
            finally:
                if self._batches.get(spec) is batch:
                    del self._batches[spec]
                batch.done.set()
        else:
            try:
                await batch.done.wait()
            except BaseException:
                # cancelled while the leader launches for us too: ours must not stay
                with anyio.CancelScope(shield=True):
                    await batch.done.wait()
                    if name in batch.servers:
                        await self.cleanup_failed([batch.servers[name]])
                raise
        if name in batch.servers:
            return batch.servers[name]
        if isinstance(batch.error, Exception) and not isinstance(
            batch.error, anyio.get_cancelled_exc_class()
        ):
            raise batch.error
        raise AsyncstageError(f"launching server {name} was cancelled")

    async def provision_one(self, name: str, options: LaunchOptions, timeout: float) -> ServerRef:
        """Launch a server of that name (sharing a concurrent equal launch), wait until up."""
        registry = self.ctx.registry
        registry.reserve([name])
        try:
            server = await capacity.launch_one(self, options, name)
        finally:
            registry.release([name])
        try:
            one_result(await self._wait_up([server], timeout))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.cleanup_failed([server])
            raise
        return server

    async def provision_many(
        self, names: list[str], options: LaunchOptions, timeout: float
    ) -> list[ServerRef]:
        """Launch servers of these names with one call (per fallback choice) and wait until
        all are up; those that fail are terminated (a FleetError names them, the others in
        ``succeeded``); a short fleet: see :mod:`asyncstage.capacity`."""
        registry = self.ctx.registry
        registry.reserve(names)
        try:
            launched, short = await capacity.launch_many(self, options, names)
        finally:
            registry.release(names)
        servers = [launched[n] for n in names if n in launched]
        try:
            await self.wait_all(servers, timeout)
        except FleetError as e:
            with anyio.CancelScope(shield=True):
                await self.cleanup_failed([s for s in servers if s not in e.succeeded])
            raise (
                e
                if short is None
                else FleetError(str(e), [*e.exceptions, short], succeeded=e.succeeded)
            ) from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.cleanup_failed(servers)
            raise
        if short is not None:
            missing = ", ".join(n for n in names if n not in launched)
            raise FleetError(f"no capacity for {missing}: {short}", [short], succeeded=servers)
        return servers

    async def cleanup_failed(self, servers: list[ServerRef]) -> None:
        """Terminate servers a launch or wait gave up on (errors logged, not raised)."""
        try:
            await self.terminate(servers, timeout=self.ctx.timeouts.stop)
        except AsyncstageError as e:
            log.warning("could not terminate failed servers: %s", e)

    # -- waiting --------------------------------------------------------------------------------

    async def refresh(self, servers: Sequence[ServerRef]) -> None:
        """Fetch the descriptions of these servers (one shared DescribeInstances round)."""
        found = await self.ctx.ec2.describe_instances_shared(s.instance_id for s in servers)
        for server in servers:
            if server.instance_id in found:
                server._record_description(found[server.instance_id])

    async def wait_all(self, servers: Sequence[ServerRef], timeout: float) -> list[ServerRef]:
        """Wait until every server is up; a FleetError otherwise."""
        return fleet_result("come up", servers, await self._wait_up(servers, timeout))

    async def _wait_up(self, servers: Sequence[ServerRef], timeout: float) -> _Errors:
        """Wait until running (one describe per round); each server, as soon as it is
        seen running, has its host key read from its console and its ssh tried as soon
        as the key is known (the ssh slots go to the servers in the order their keys
        come, not held by those still waiting for theirs nor by a launch key's replacement)."""
        m = self.ctx
        deadline = anyio.current_time() + timeout
        by_id = {s.instance_id: s for s in servers}
        errors: dict[ServerRef, Exception] = {}
        limiter = anyio.CapacityLimiter(_SSH_SLOTS)

        async def ssh_up(server: ServerRef) -> None:
            await _settle_host_key(server)
            try:
                async with limiter:
                    await server._wait_ssh(deadline)
                # a command over the connection made: no slot held while sshd reloads
                await server._replace_launch_key()
            except AsyncstageError as e:
                errors[server] = e

        async with anyio.create_task_group() as tg:

            def reached(instance_id: str, instance: Resource) -> None:
                server = by_id[instance_id]
                # a new address on start: the server takes its pinned host key along
                server._record_description(instance)
                tg.start_soon(ssh_up, server)

            _, failed = await m.ec2.wait_for_instances(
                list(by_id),
                "running",
                timeout=timeout,
                labels={s.instance_id: s.name for s in servers},
                on_reached=reached,
            )
            for instance_id, error in failed.items():
                errors[by_id[instance_id]] = error
        return errors

    # -- start, stop, terminate -----------------------------------------------------------------

    async def start(self, servers: Sequence[ServerRef], *, timeout: float) -> list[ServerRef]:
        """Start these servers with one call, wait until up, mount their volumes again;
        FleetError when any of them failed."""
        return fleet_result("start", servers, await self._start(servers, timeout))

    async def start_one(self, server: ServerRef, *, timeout: float) -> None:
        """:meth:`start` for one server, raising its own error."""
        one_result(await self._start([server], timeout))

    async def _start(self, servers: Sequence[ServerRef], timeout: float) -> _Errors:
        if not servers:
            return {}
        m = self.ctx
        await self.refresh(servers)
        stopping = [s for s in servers if s.state == "stopping"]
        errors: dict[ServerRef, Exception] = {}
        if stopping:
            _, failed = await m.ec2.wait_for_instances(
                [s.instance_id for s in stopping], "stopped", timeout=timeout
            )
            errors |= {s: failed[s.instance_id] for s in stopping if s.instance_id in failed}
            await self.refresh(servers)
        errors |= _gone(servers)
        to_start = [s for s in servers if s.state == "stopped" and s not in errors]
        if to_start:
            self._log(f"starting {len(to_start)} server(s)")
            errors |= await capacity.start_where_able(self, to_start)
        m.registry.mark_started(servers)
        rest = [s for s in servers if s not in errors]
        errors |= await self._wait_up(rest, timeout)

        async def remount(server: ServerRef) -> None:
            for volume in server.volumes():
                if volume._prepare_remount():
                    try:
                        await server.remount_volume(volume)
                    except AsyncstageError as e:
                        errors[server] = e

        async with anyio.create_task_group() as tg:
            for server in rest:
                if server not in errors:
                    tg.start_soon(remount, server)
        return errors

    async def stop(self, servers: Sequence[ServerRef], *, timeout: float) -> list[ServerRef]:
        """Stop these servers with one call and wait until they are stopped; FleetError
        when any of them failed."""
        return fleet_result("stop", servers, await self._stop(servers, timeout))

    async def stop_one(self, server: ServerRef, *, timeout: float) -> None:
        """:meth:`stop` for one server, raising its own error."""
        one_result(await self._stop([server], timeout))

    async def _stop(self, servers: Sequence[ServerRef], timeout: float) -> _Errors:
        if not servers:
            return {}
        m = self.ctx
        await self.refresh(servers)
        to_stop = [s for s in servers if s.state in ("pending", "running")]
        if to_stop:
            self._log(f"stopping {len(to_stop)} server(s)")
            await m.ec2.stop_instances([s.instance_id for s in to_stop])
        for server in to_stop:
            m.registry.record_stop(server)
        errors = _gone(servers)
        ids = [s.instance_id for s in servers if s not in errors]
        reached, failed = await m.ec2.wait_for_instances(
            ids, "stopped", timeout=timeout, labels={s.instance_id: s.name for s in servers}
        )
        for server in servers:
            if server.instance_id in reached:
                server._record_description(reached[server.instance_id])
            elif server.instance_id in failed:
                errors[server] = failed[server.instance_id]
        return errors

    async def terminate(self, servers: Sequence[ServerRef], *, timeout: float) -> list[ServerRef]:
        """Terminate these servers with one call, wait, unregister them; FleetError when
        any of them failed."""
        return fleet_result("terminate", servers, await self._terminate(servers, timeout))

    async def terminate_one(self, server: ServerRef, *, timeout: float) -> None:
        """:meth:`terminate` for one server, raising its own error."""
        one_result(await self._terminate([server], timeout))

    async def terminate_now(self, servers: Sequence[ServerRef]) -> None:
        """Terminate these servers with one call and unregister them, without waiting."""
        if servers:
            await self._terminate_call(servers)
            self._forget(servers)

    async def _terminate(self, servers: Sequence[ServerRef], timeout: float) -> _Errors:
        if not servers:
            return {}
        ids = await self._terminate_call(servers)
        _reached, failed = await self.ctx.ec2.wait_for_instances(
            ids, "terminated", timeout=timeout, labels={s.instance_id: s.name for s in servers}
        )
        errors = {s: failed[s.instance_id] for s in servers if s.instance_id in failed}
        self._forget([s for s in servers if s not in errors])
        return errors

    async def _terminate_call(self, servers: Sequence[ServerRef]) -> list[str]:
        ids = [s.instance_id for s in servers]
        self._log(f"terminating {len(servers)} server(s)")
        await self.ctx.ec2.terminate_instances(ids)
        return ids

    def _forget(self, servers: Sequence[ServerRef]) -> None:
        for server in servers:
            self.ctx.registry.forget_server(server)


def _gone(servers: Sequence[ServerRef]) -> dict[ServerRef, Exception]:
    """UnknownServer for each server that is terminated or shutting down."""
    return {
        s: UnknownServer(f"server {s.name} is {s.state}")
        for s in servers
        if s.state in ("terminated", "shutting-down")
    }


async def _settle_host_key(server: ServerRef) -> None:
    """Read a server's host key from its console, before it takes an ssh slot (the
    console's calls have a pace of their own): a failure is raised again by the ssh
    wait, which says what is known."""
    try:
        await server._pin_host_key()
    except AsyncstageError as e:  # raised again by the ssh wait, which retries
        log.debug("%s: host key not settled yet: %s", server.name, e)
