"""Account set-up: the key pair, the security group and the caller's address for ssh."""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from asyncstage import keys
from asyncstage.ec2 import EC2, tag
from asyncstage.errors import EC2Error, InvalidArgument

__all__ = ["LIVE_STATES", "Account", "caller_cidr"]

log = logging.getLogger("asyncstage")

LIVE_STATES = ["pending", "running", "stopping", "stopped"]
"""The instance states of servers that still exist (for scans and on_exit)."""


def caller_cidr(endpoint_url: str | None) -> str:
    """The caller's address as a /32: loopback for a local endpoint, else asked of AWS."""
    if endpoint_url:
        host = urllib.parse.urlsplit(endpoint_url).hostname or ""
        try:
            if ipaddress.ip_address(host).is_loopback:
                return "127.0.0.1/32"
        except ValueError:
            if host == "localhost":
                return "127.0.0.1/32"
    try:  # pragma: no cover - needs the internet
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as r:
            address = r.read().decode().strip()
        return f"{ipaddress.ip_address(address)}/32"
    except (OSError, ValueError) as e:  # pragma: no cover
        raise InvalidArgument(
            "cannot find this machine's public address: pass ssh_cidr='a.b.c.d/32'"
        ) from e


class Account:
    """The key pair servers are launched with and the security group that lets ssh in.

    Holds no state of its own: the Manager keeps the key pair and group id it gets.
    """

    def __init__(
        self,
        ec2: EC2,
        dotdir: Path,
        reuse_key: bool,
        ssh_cidrs: Sequence[str],
        security_group: str,
    ) -> None:
        self.ec2 = ec2
        self.dotdir = dotdir
        self.reuse_key = reuse_key
        self.ssh_cidrs = list(ssh_cidrs)
        self.security_group = security_group

    async def ensure(self, key_pair: keys.KeyPair | None) -> tuple[keys.KeyPair, str]:
        """Make sure of the key pair and the security group (again after another manager
        removed them); the key pair and the group's id."""
        if key_pair is None:
            key_pair = await keys.ensure_key_pair(self.ec2, self.dotdir, reuse=self.reuse_key)
        elif not await self.ec2.key_pair_exists(key_pair.name):
            try:
                await self.ec2.import_key_pair(
                    key_pair.name, key_pair.public_key, tags={tag("role"): "key"}
                )
            except EC2Error as e:
                if e.code != "InvalidKeyPair.Duplicate":
                    raise
        cidrs = self.ssh_cidrs or [caller_cidr(self.ec2.endpoint_url)]
        group_id = await self.ec2.ensure_security_group(
            self.security_group, cidrs=cidrs, tags={tag("role"): "security-group"}
        )
        return key_pair, group_id

    async def delete_if_unused(self, key_pair: keys.KeyPair | None, group_id: str | None) -> None:
        """Delete the key pair and the group unless a live instance still uses them."""
        others = await self.ec2.describe_instances(
            filters=[{"Name": "instance-state-name", "Values": [*LIVE_STATES, "shutting-down"]}]
        )
        if key_pair and not any(i.get("KeyName") == key_pair.name for i in others):
            await self.ec2.delete_key_pair(key_pair.name)
        if group_id and not any(
            g.get("GroupId") == group_id for i in others for g in i.get("SecurityGroups", [])
        ):
            try:
                await self.ec2.delete_security_group(group_id)
            except EC2Error as e:  # still referenced somewhere: leave it
                log.debug("security group %s kept: %s", group_id, e)
