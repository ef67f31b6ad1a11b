"""Account set-up: the key pair, the security group and the caller's address for ssh."""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio

from asyncstage import keys
from asyncstage.ec2 import EC2, Resource, groups_of, tag
from asyncstage.errors import EC2Error, InvalidArgument
from asyncstage.transfer.ingress import sweep_stale_rules

__all__ = ["CHECKIP_URL", "LIVE_STATES", "Account", "caller_cidr", "reading_only"]

log = logging.getLogger("asyncstage")

LIVE_STATES = ["pending", "running", "stopping", "stopped"]
"""The instance states of servers that still exist (for scans and on_exit)."""


CHECKIP_URL = "https://checkip.amazonaws.com"
"""Where the controller asks its own public address, as EC2 users do."""


def caller_cidr(endpoint_url: str | None, checkip_url: str | None = None) -> str:
    """The caller's address as a /32: what ``checkip_url`` answers (the address the
    servers see this machine come from); without one, loopback for a local endpoint,
    else what :data:`CHECKIP_URL` answers."""
    if checkip_url is None and endpoint_url:
        host = urllib.parse.urlsplit(endpoint_url).hostname or ""
        try:
            if ipaddress.ip_address(host).is_loopback:
                return "127.0.0.1/32"
        except ValueError:
            if host == "localhost":
                return "127.0.0.1/32"
    checkip_url = checkip_url or CHECKIP_URL
    if urllib.parse.urlsplit(checkip_url).scheme not in ("http", "https"):
        raise InvalidArgument(f"checkip_url: an http(s) URL, not {checkip_url!r}")
    try:
        with urllib.request.urlopen(checkip_url, timeout=10) as r:
            answer = r.read(64).decode().strip()
        address = ipaddress.ip_address(answer)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(
            f"cannot find this machine's public address at {checkip_url} ({e}): pass "
            "ssh_cidr='a.b.c.d/32'"
        ) from e
    return f"{address}/{address.max_prefixlen}"


class Account:
    """The key pair servers are launched with and the security group that lets ssh in.

    Nothing is made or checked when a manager opens: :meth:`ensure` does it the first
    time something needs it (a launch), :meth:`admit` the first time ssh needs the group
    to let this machine in, and only then is the caller's address looked up. Both are
    idempotent across processes (see :meth:`asyncstage.ec2.EC2.ensure_security_group`
    and :func:`asyncstage.keys.import_key`). What they found is kept until
    :meth:`forget` (another manager removed it).
    """

    def __init__(
        self,
        ec2: EC2,
        dotdir: Path,
        reuse_key: bool,
        ssh_cidrs: Sequence[str],
        security_group: str,
        patience: float = 60.0,
    ) -> None:
        self.ec2 = ec2
        self.dotdir = dotdir
        self.reuse_key = reuse_key
        self.ssh_cidrs = list(ssh_cidrs)
        self.security_group = security_group
        self.patience = patience
        """Seconds a ``Duplicate`` answer's resource is looked for again (EC2's consistency)."""
        self.key_pair: keys.KeyPair | None = None
        """The local key, once something needed it (:meth:`local_key`)."""
        self.group_id: str | None = None
        """The security group's id, once made or checked (:meth:`admit`)."""
        self.checkip_url: str | None = None
        """Where this machine's public address is asked when no ``ssh_cidrs`` are given
        (None: :data:`CHECKIP_URL`, or loopback for a local endpoint)."""
        self._imported = False
        self._lock: anyio.Lock | None = None

    def local_key(self) -> keys.KeyPair:
        """The key pair in the dot directory (made there when missing); no EC2 call."""
        if self.key_pair is None:
            self.key_pair = keys.local_key(self.dotdir, self.ec2.region, reuse=self.reuse_key)
        return self.key_pair

    @property
    def ready(self) -> bool:
        """Whether this manager made or checked the key pair and the group."""
        return self._imported and self.group_id is not None

    async def ensure(self) -> tuple[keys.KeyPair, str]:
        """Make sure of the key pair and the security group (made when missing); both."""
        pair = self.local_key()
        async with self._locked():
            if not self._imported:
                await keys.import_key(self.ec2, pair, patience=self.patience)
                self._imported = True
        return pair, await self.admit()

    async def before_ssh(self) -> None:
        """Before an ssh connection to one of our servers: :meth:`admit`, except while
        :func:`reading_only` is in force."""
        if not _READ_ONLY.get():
            await self.admit()

    async def admit(self) -> str:
        """Make sure the security group exists and lets this machine in by ssh; its id."""
        if self.group_id is not None:
            # Known: no turn of the lock, which every new ssh connection of a fleet
            # would otherwise take one after another, a turn of the event loop each.
            return self.group_id
        async with self._locked():
            if self.group_id is None:
                cidrs = self.ssh_cidrs or [
                    await anyio.to_thread.run_sync(
                        caller_cidr, self.ec2.endpoint_url, self.checkip_url
                    )
                ]
                self.group_id = await self.ec2.ensure_security_group(
                    self.security_group,
                    cidrs=cidrs,
                    tags={tag("role"): "security-group"},
                    patience=self.patience,
                )
                await self._sweep_rules(self.group_id)
            return self.group_id

    async def _sweep_rules(self, group_id: str) -> None:
        """Revoke the temporary transfer rules a dead controller left in the group."""
        try:
            await sweep_stale_rules(self.ec2, group_id)
        except EC2Error as e:  # the set-up goes on: the next one sweeps again
            log.warning("security group %s: could not sweep temporary rules: %s", group_id, e)

    def forget(self) -> None:
        """Check the key pair and the group again next time (another manager removed them)."""
        self._imported = False
        self.group_id = None

    def _locked(self) -> anyio.Lock:
        if self._lock is None:  # made in the event loop that uses it
            self._lock = anyio.Lock()
        return self._lock

    async def delete_if_unused(self, patience: float = 30.0) -> None:
        """Delete the key pair and the group this manager made or checked, unless a live
        instance still uses them (nothing when it never needed them).

        EC2 refuses to delete a group while an instance is in it (``DependencyViolation``),
        also one that is still shutting down: the deletion is tried again until those are
        gone (for ``patience`` seconds at most; then the group is left, and logged, as it
        is when another group's rule still names it).
        """
        if not self.ready:
            return
        key_pair, group_id = self.key_pair, self.group_id
        others = await self._instances_not_gone()
        if key_pair and not any(i.get("KeyName") == key_pair.name for i in others):
            await self.ec2.delete_key_pair(key_pair.name)
        if group_id:
            await self._delete_group(group_id, others, patience)
        self.forget()

    async def _instances_not_gone(self) -> list[Resource]:
        states = [*LIVE_STATES, "shutting-down"]
        found = await self.ec2.describe_instances(
            filters=[{"Name": "instance-state-name", "Values": states}]
        )
        return list(found)

    async def _delete_group(self, group_id: str, others: list[Resource], patience: float) -> None:
        """Delete ``group_id`` once no instance is in it; kept while a live one is."""
        deadline = anyio.current_time() + patience
        pause = self.ec2.poll_interval
        while True:
            users = [i for i in others if group_id in {g["GroupId"] for g in groups_of(i)}]
            if any(_state(i) in LIVE_STATES for i in users):
                return  # another manager's live server is in it: it stays
            if not users:
                try:
                    await self.ec2.delete_security_group(group_id)
                    return
                except EC2Error as e:
                    if e.code != "DependencyViolation":  # gone, or no right to: leave it
                        log.debug("security group %s kept: %s", group_id, e)
                        return
                    why = str(e)
            else:
                why = f"{len(users)} instance(s) still shutting down in it"
            if anyio.current_time() >= deadline:
                log.warning("security group %s kept: %s", group_id, why)
                return
            await anyio.sleep(pause)
            pause = min(pause * self.ec2.poll_backoff, self.ec2.poll_max_interval)
            others = await self._instances_not_gone()


def _state(instance: Resource) -> str:
    return str((instance.get("State") or {}).get("Name", ""))


_READ_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("_READ_ONLY", default=False)


@contextlib.contextmanager
def reading_only() -> Iterator[None]:
    """Within (and in tasks started within): ssh connections do not set up the account.

    A scan reads what earlier managers made; a connection it makes goes to a server
    whose group admits this machine already, or fails (and the scan goes on).
    """
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)
