"""Closing a manager: ``on_exit`` applied to what is still there.

Somebody else may have deleted a volume, terminated a server or removed a snapshot
meanwhile: what is gone is skipped (with a warning naming it), the rest of the clean-up
is done anyway, and one error at the end lists what could not be done. What create
calls whose outcome never came back made (found by their ClientToken's tag) is removed
whatever ``on_exit`` says: nobody else knows of it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from asyncstage.errors import AsyncstageError, FleetError, NotFound, UnknownVolume

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.fleet import Fleet
    from asyncstage.refs import ServerRef
    from asyncstage.settings import OnExit

__all__ = ["apply_on_exit", "close"]

log = logging.getLogger("asyncstage")


async def close(fleet: Fleet, on_exit: OnExit, *, raise_errors: bool = True) -> None:
    """Apply ``on_exit`` to the fleet's servers (bounded by ``timeouts.exit``), then close
    every ssh connection and the EC2 client, all shielded from cancellation; its error
    last, if asked."""
    m = fleet.ctx
    error: BaseException | None = None
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(m.timeouts.exit) as scope:
            try:
                await apply_on_exit(fleet, on_exit)
            except Exception as e:
                log.warning("on_exit=%s failed: %s", on_exit, e)
                error = e
        if scope.cancelled_caught:
            log.warning("on_exit=%s gave up after %gs", on_exit, m.timeouts.exit)
        for host in m.registry.hosts_to_close():
            try:
                await host.close()
            except Exception as e:  # pragma: no cover - best effort
                log.debug("closing %s: %s", host, e)
        await m.ec2.close()
    if error is not None and raise_errors:
        raise error


async def apply_on_exit(fleet: Fleet, on_exit: OnExit) -> None:
    """Apply on_exit. What somebody else deleted already is skipped (with a warning);
    the rest is done anyway, and one error at the end lists what could not be."""
    m = fleet.ctx
    problems = await _sweep_unsettled(m)
    if on_exit == "run":
        mine: list[ServerRef] = []
    else:
        mine = await _still_there(m, m.registry.started())
    try:
        if on_exit == "stop":
            live = [s for s in mine if s.state in ("pending", "running")]
            await fleet.stop(live, timeout=m.timeouts.stop)
        elif on_exit == "terminate":
            await fleet.terminate(mine, timeout=m.timeouts.stop)
    except FleetError as e:
        problems += list(e.exceptions)
    except AsyncstageError as e:
        problems.append(e)
    if on_exit == "terminate":
        problems += await _delete_created(m)
        await m.account.delete_if_unused()
    if problems:
        listing = "\n".join(f"- {p}" for p in problems)
        error = AsyncstageError(f"closing the manager left things undone:\n{listing}")
        raise error from ExceptionGroup("on_exit failures", problems)


async def _still_there(m: Context, servers: list[ServerRef]) -> list[ServerRef]:
    """These servers, refreshed; those terminated (or gone) elsewhere are forgotten."""
    if not servers:
        return []
    found = await m.ec2.describe_instances_shared(s.instance_id for s in servers)
    there: list[ServerRef] = []
    for server in servers:
        desc = found.get(server.instance_id)
        state = desc.get("State", {}).get("Name") if desc else "gone"
        if state in ("gone", "shutting-down", "terminated"):
            log.warning("server %s (%s) is %s already", server.name, server.instance_id, state)
            m.registry.forget_server(server)
            continue
        if desc is not None:
            server._record_description(desc)
        there.append(server)
    return there


async def _delete_created(m: Context) -> list[Exception]:
    """Delete the volumes this manager made; those already deleted elsewhere are skipped."""
    volumes = m.registry.created_volumes()
    if not volumes:
        return []
    found = {
        str(v["VolumeId"]): v for v in await m.ec2.describe_volumes([v.volume_id for v in volumes])
    }
    failures: list[Exception] = []
    for volume in volumes:
        desc = found.get(volume.volume_id)
        try:
            if desc is None or desc.get("State") in ("deleting", "deleted"):
                raise UnknownVolume(f"volume {volume.volume_id} does not exist any more")
            volume._record_description(desc)
            if desc.get("State") == "available":
                volume._record_detach()  # its server went away: nothing to unmount there
            await volume.delete()
        except NotFound as e:
            log.warning("volume %s (%s) is gone already: %s", volume.name, volume.volume_id, e)
            m.registry.forget_volume(volume)
        except AsyncstageError as e:
            failures.append(e)
    return failures


async def _sweep_unsettled(m: Context) -> list[Exception]:
    """Remove what create calls whose outcome never came back (a timeout, a cancellation)
    made: found by their ClientToken's tag, never registered, so nobody else would."""
    failures: list[Exception] = []
    for token, kind in m.ec2.unsettled_tokens.items():
        try:
            made = await m.ec2.created_with(kind, token)
            ids = [str(r.get("InstanceId") or r.get("VolumeId")) for r in made]
            if ids:
                log.warning("removing %s %s of a create that did not finish", kind, ids)
            if kind == "instance":
                await m.ec2.terminate_instances(ids)
            for volume_id in ids if kind == "volume" else []:
                await m.ec2.delete_volume(volume_id)
            m.ec2.settle(token)
        except AsyncstageError as e:
            failures.append(e)
    return failures
