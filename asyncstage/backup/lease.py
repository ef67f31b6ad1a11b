"""One run of a backup name at a time: a lease built on EC2 itself.

The lease of backup ``NAME`` is a security group named ``asyncstage-backup-NAME``,
created with the run's tags (name, run id, controller, expiry) in the create call. EC2
makes a group name unique within its VPC, so ``CreateSecurityGroup`` is an atomic
test-and-set: whoever's create succeeds holds the lease; a ``InvalidGroup.Duplicate``
means someone else does.

What it guarantees (and what not):

- Two runs that both hold a live lease of one name never exist as long as their
  controllers' clocks agree within the lease's time to live (``ttl``): the holder renews
  its expiry every ``ttl / 3`` seconds, and another run breaks a lease only when its
  expiry has passed or its controller, on the same host, is gone.
- A lease is broken by deleting that very group (by its id) and creating a new one: two
  runs breaking one dead lease at once cannot both win, since only one create succeeds.
- A holder that finds its lease gone or taken over (it was paused longer than ``ttl``)
  stops with :class:`~asyncstage.errors.BackupInProgress` before it marks anything
  complete: its snapshot is then never used as a base, and the next run removes it.
- A group of that name whose tags do not parse was not made by a run: it is never
  broken, and the backup refuses with :class:`BackupInProgress`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from asyncstage.adoption import owner_tags
from asyncstage.backup.runs import EXPIRES_TAG, RunInfo
from asyncstage.ec2 import tag, tag_filters, tags_of
from asyncstage.errors import BackupInProgress, EC2Error
from asyncstage.manager import Manager

__all__ = ["LEASE_ROLE", "Lease", "acquire", "lease_name", "leases", "release", "with_lease"]

T = TypeVar("T")

log = logging.getLogger("asyncstage.backup")

LEASE_ROLE = "backup-lease"
_DUPLICATE = "InvalidGroup.Duplicate"
_GONE = ("InvalidGroup.NotFound", "InvalidGroupId.NotFound", "InvalidGroupId.Malformed")


def lease_name(name: str) -> str:
    """The security group name of backup ``name``'s lease."""
    return f"asyncstage-backup-{name}"


class Lease:
    """A lease held by this process: its group and the run it is held for."""

    def __init__(self, m: Manager, group_id: str, run: RunInfo) -> None:
        self.m = m
        self.group_id = group_id
        self.run = run
        self.lost = ""
        """Why the lease was lost (empty while it is held)."""

    async def check(self) -> None:
        """Raise :class:`BackupInProgress` unless this run still holds the lease."""
        if not self.lost:
            holder = await _describe(self.m, group_id=self.group_id)
            if holder is None or holder[1] is None or holder[1].run_id != self.run.run_id:
                self.lost = "its lease is gone"
        if self.lost:
            raise BackupInProgress(
                f"backup {self.run.name!r} (run {self.run.run_id}): {self.lost}; "
                "another run may have taken over",
                run_id=self.run.run_id,
                controller=self.run.controller,
            )

    async def renew(self, ttl: float) -> None:
        """Move the expiry ``ttl`` seconds on, after checking the lease is still ours."""
        await self.check()
        run = self.run.renewed(ttl)
        await self.m.ec2.create_tags([self.group_id], {EXPIRES_TAG: str(run.expires)})
        self.run = run


async def _describe(
    m: Manager, *, group_id: str | None = None, name: str | None = None
) -> tuple[str, RunInfo | None] | None:
    """The lease group (by id or by name) and its holder (None: tags that do not parse)."""
    params: dict[str, Any] = {}
    if group_id is not None:
        params["GroupIds"] = [group_id]
    else:
        params["Filters"] = [{"Name": "group-name", "Values": [lease_name(str(name))]}]
    try:
        found = await m.ec2.call("DescribeSecurityGroups", **params)
    except EC2Error as e:
        if e.code in _GONE:
            return None
        raise
    groups = found.get("SecurityGroups", [])
    if not groups:
        return None
    group = groups[0]
    return str(group["GroupId"]), RunInfo.from_tags(tags_of(group))


async def _delete(m: Manager, group_id: str) -> None:
    with contextlib.suppress(EC2Error):
        await m.ec2.call("DeleteSecurityGroup", GroupId=group_id)


async def _create(m: Manager, run: RunInfo) -> str | None:
    """Create the lease group; its id, or None when it exists."""
    tags = {
        tag("role"): LEASE_ROLE,
        **run.tags(),
        **owner_tags(m.key_pair.name if m.key_pair else None),
    }
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    try:
        made = await m.ec2.call(
            "CreateSecurityGroup",
            GroupName=lease_name(run.name),
            Description=f"asyncstage backup lease of {run.name}",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list}],
        )
    except EC2Error as e:
        if e.code == _DUPLICATE:
            return None
        raise
    return str(made["GroupId"])


async def acquire(m: Manager, run: RunInfo, *, wait: float, poll: float = 1.0) -> Lease:
    """Take the lease of ``run.name`` for ``run``, breaking a dead holder's; wait up to
    ``wait`` seconds for a live holder, then raise :class:`BackupInProgress`."""
    deadline = time.monotonic() + wait
    while True:
        group_id = await _create(m, run)
        if group_id is not None:
            return Lease(m, group_id, run)
        found = await _describe(m, name=run.name)
        if found is None:
            continue  # released between the create and the look-up
        other_id, holder = found
        if holder is None:
            raise BackupInProgress(
                f"backup {run.name!r}: security group {lease_name(run.name)} ({other_id}) "
                "exists without a run's tags: it is not a lease this library made; "
                "it is left alone, so no run of this name can start"
            )
        if holder.dead():
            log.warning(
                "backup %s: breaking the lease of run %s (%s), which is %s",
                run.name,
                holder.run_id,
                holder.controller,
                "expired" if holder.expired() else "dead",
            )
            await _delete(m, other_id)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackupInProgress(
                f"backup {run.name!r} is being run by run {holder.run_id} "
                f"(controller {holder.controller}, lease until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.expires))} UTC)",
                run_id=holder.run_id,
                controller=holder.controller,
            )
        await anyio.sleep(min(poll, left))


async def _keep(lease: Lease, ttl: float, every: float, scope: anyio.CancelScope) -> None:
    """Renew the lease every ``every`` s; when it is lost, cancel the run."""
    while True:
        await anyio.sleep(every)
        try:
            await lease.renew(ttl)
        except BackupInProgress:
            scope.cancel()
            return
        except EC2Error as e:  # EC2 answering badly for a moment: the expiry decides
            log.warning("backup %s: could not renew its lease: %s", lease.run.name, e)
            if lease.run.expired():
                lease.lost = "its lease expired while it could not be renewed"
                scope.cancel()
                return


async def with_lease(
    m: Manager,
    run: RunInfo,
    body: Callable[[Lease], Awaitable[T]],
    *,
    wait: float,
    ttl: float,
    renew_every: float | None = None,
) -> T:
    """``await body(lease)`` while holding the lease of ``run.name`` (see the module's
    guarantees); its result, or its error as itself. The lease is renewed every
    ``renew_every`` seconds (``ttl / 3`` by default).

    A lost lease cancels the body and raises :class:`BackupInProgress`; the lease is
    released (its group deleted) on the way out, also on error and cancellation.
    """
    lease = await acquire(m, run, wait=wait)
    result: list[T] = []
    failure: list[Exception] = []
    try:
        async with anyio.create_task_group() as tg:

            async def main() -> None:
                try:
                    result.append(await body(lease))
                except Exception as e:  # raised as itself below, not in an exception group
                    failure.append(e)
                finally:
                    tg.cancel_scope.cancel()  # the renewals end with the body

            tg.start_soon(main)
            every = ttl / 3 if renew_every is None else renew_every
            tg.start_soon(_keep, lease, ttl, every, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True):
            if not lease.lost:
                await _delete(m, lease.group_id)
    if failure:
        raise failure[0]
    if not result:
        lease.lost = lease.lost or "its run was stopped"
        await lease.check()  # raises BackupInProgress
    return result[0]


async def leases(m: Manager) -> list[tuple[str, RunInfo]]:
    """Every lease group and its run (groups whose tags do not parse are left out)."""
    found = await m.ec2.call(
        "DescribeSecurityGroups", Filters=tag_filters({tag("role"): LEASE_ROLE})
    )
    held: list[tuple[str, RunInfo]] = []
    for group in found.get("SecurityGroups", []):
        run = RunInfo.from_tags(tags_of(group))
        if run is not None and group.get("GroupName") == lease_name(run.name):
            held.append((str(group["GroupId"]), run))
    return held


async def release(m: Manager, group_id: str) -> None:
    """Delete a lease group (a dead one, or our own); a gone group is fine."""
    await _delete(m, group_id)
