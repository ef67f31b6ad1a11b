"""Temporary ssh ingress rules: a server -> server leg across VPCs or regions.

Inside one VPC the source reaches the destination at its private address, which the
library's security group admits by its self-referencing ssh rule (a group reference
matches members' private addresses only, as on EC2). Across VPCs or regions the
source must go to the destination's public address, and EC2 sees it come from the
source's public address, which no standing rule admits. For such a leg the
destination's group admits the source's public ``/32`` on port 22 for that transfer
alone (:func:`temporary_ingress`):

* the rule is authorised before the leg and revoked after it, also on failure and
  cancellation (shielded, bounded);
* its description says what it is and who owns it:
  ``asyncstage-transfer controller=<host/boot/pid/start> expires=<epoch>``, so that a
  rule left by a controller that died is recognised and revoked by the next account
  set-up (:func:`sweep_stale_rules`): stale when expired, or when its controller ran
  on this machine and no longer runs;
* legs of this process that need the same rule at once share it (the last one revokes
  it); a rule that was there already (EC2 answers ``InvalidPermission.Duplicate``:
  another process's, or a standing one) is used and never revoked by us.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from asyncstage.ec2.api import groups_of
from asyncstage.errors import EC2Error, NoRoute
from asyncstage.transfer.run import STALE_AFTER, controller_alive, controller_id

if TYPE_CHECKING:
    from asyncstage.ec2 import EC2, Resource

__all__ = ["RULE_MARKER", "admit_ssh", "sweep_stale_rules", "temporary_ingress"]

_log = logging.getLogger("asyncstage.transfer")

RULE_MARKER = "asyncstage-transfer"
"""Start of the description of every temporary ingress rule."""

REVOKE_WITHIN = 30.0
"""Seconds a revocation may take before it is left to a later sweep."""

_DESCRIPTION = re.compile(
    re.escape(RULE_MARKER) + r" controller=(?P<controller>\S+) expires=(?P<expires>\d{1,12})"
)
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9. _\-:/()#,@\[\]+=&;{}!$*]")  # EC2's description set

_users: dict[tuple[str, str, str, int], int] = {}
"""Legs of this process using each rule we authorised: (region, group, cidr, port)."""


def _permission(cidr: str, port: int, description: str | None = None) -> dict[str, Any]:
    ip_range: dict[str, str] = {"CidrIp": cidr}
    if description is not None:
        ip_range["Description"] = description
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [ip_range]}


def rule_description(expires: float) -> str:
    """The description of a rule this controller authorises now."""
    owner = _NOT_ALLOWED.sub("_", controller_id())
    return f"{RULE_MARKER} controller={owner} expires={int(expires)}"


@asynccontextmanager
async def admit_ssh(
    ec2: EC2, instance: Resource, our_group: str, label: str, cidr: str
) -> AsyncIterator[None]:
    """The instance's group (``our_group``, the library's, if it is in it) admits ``cidr``
    by ssh within the block; NoRoute when it is in no group."""
    groups = groups_of(instance)
    if not groups:
        raise NoRoute("it is in no security group to admit a transfer by", host=label)
    ours = [g for g in groups if g.get("GroupName") == our_group]
    async with temporary_ingress(ec2, str((ours or groups)[0]["GroupId"]), cidr):
        yield


@asynccontextmanager
async def temporary_ingress(
    ec2: EC2, group_id: str, cidr: str, *, port: int = 22
) -> AsyncIterator[None]:
    """Within the block, ``group_id`` admits ``cidr`` on tcp ``port`` (see the module
    docstring); the rule is revoked when the block ends, however it ends."""
    key = (ec2.region, group_id, cidr, port)
    owned = True
    _users[key] = _users.get(key, 0) + 1
    if _users[key] == 1:  # the first leg of this process that needs it
        description = rule_description(time.time() + STALE_AFTER)
        try:
            await ec2.call(
                "AuthorizeSecurityGroupIngress",
                GroupId=group_id,
                IpPermissions=[_permission(cidr, port, description)],
            )
            _log.info("%s: admitting %s on port %d for a transfer", group_id, cidr, port)
        except BaseException as e:
            _release(key)
            if not isinstance(e, EC2Error) or e.code != "InvalidPermission.Duplicate":
                raise
            owned = False
            _log.debug("%s: %s is admitted already: using that rule", group_id, cidr)
    try:
        yield
    finally:
        if owned and _release(key):
            with anyio.CancelScope(shield=True):
                await _revoke(ec2, group_id, cidr, port)


def _release(key: tuple[str, str, str, int]) -> bool:
    """One leg less uses the rule ``key``; True when it was the last."""
    _users[key] -= 1
    if _users[key]:
        return False
    del _users[key]
    return True


async def _revoke(ec2: EC2, group_id: str, cidr: str, port: int) -> None:
    """Revoke the rule; a failure is logged (a later set-up sweeps the rule)."""
    try:
        with anyio.fail_after(REVOKE_WITHIN):
            await ec2.call(
                "RevokeSecurityGroupIngress",
                GroupId=group_id,
                IpPermissions=[_permission(cidr, port)],
            )
    except (EC2Error, TimeoutError) as e:
        _log.warning(
            "%s: could not revoke the temporary rule for %s (a later set-up removes it): %s",
            group_id,
            cidr,
            e,
        )


def _stale(description: str, now: float) -> bool:
    found = _DESCRIPTION.fullmatch(description)
    if found is None:
        return False  # not ours: never touched
    if int(found["expires"]) <= now:
        return True
    return controller_alive(found["controller"]) is False


async def sweep_stale_rules(ec2: EC2, group_id: str) -> list[str]:
    """Revoke the temporary rules of ``group_id`` that are stale (see the module
    docstring); the CIDRs revoked. Rules that are not temporary ones are never touched."""
    found = await ec2.call("DescribeSecurityGroups", GroupIds=[group_id])
    now = time.time()
    revoked: list[str] = []
    for group in found.get("SecurityGroups", []):
        for perm in group.get("IpPermissions", []):
            if perm.get("IpProtocol") != "tcp" or not isinstance(perm.get("FromPort"), int):
                continue
            for ip_range in perm.get("IpRanges", []):
                description = ip_range.get("Description")
                cidr = ip_range.get("CidrIp")
                if not isinstance(description, str) or not isinstance(cidr, str):
                    continue
                if (group_id, cidr) in {(k[1], k[2]) for k in _users}:
                    continue  # a leg of this process uses it
                if _stale(description, now):
                    await _revoke(ec2, group_id, cidr, int(perm["FromPort"]))
                    revoked.append(cidr)
    if revoked:
        _log.warning(
            "%s: revoked %d temporary ssh rule(s) a controller left behind: %s",
            group_id,
            len(revoked),
            ", ".join(revoked),
        )
    return revoked
