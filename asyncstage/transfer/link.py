"""The direct link between two hosts: a temporary key, made for one transfer and swept after.

A host → host transfer (rsync or dd) runs on the source and connects straight
to the destination with OpenSSH ``ssh``:

* an ed25519 key is made on the source in the transfer's private work dir;
* its public half is authorised on the destination (the login user's
  ``~/.ssh/authorized_keys``, or the file given) as
  ``from="<source address>",restrict,expiry-time="<now + 6 h>" <key>
  asyncstage-transfer-<token> controller=<id> expires=<epoch>``: usable only
  from the source, for nothing but the command, and refused by sshd after the
  expiry even if nobody removes it;
* the destination's pinned host key goes into a known_hosts in the work dir
  (``StrictHostKeyChecking=yes``).

Which addresses: two hosts of one private network (two servers of one EC2 VPC, see
``SSHHost.private_network``) talk over their private addresses, and the destination
then sees the source come from the source's private address (the library's group
admits its own members); two servers of different VPCs or regions talk over their
public addresses, the destination's group admitting the source's public ``/32`` for
that transfer alone (:mod:`asyncstage.transfer.ingress`), and a leg where either side
has no public address is a :class:`~asyncstage.errors.NoRoute` (EC2 has no path for
it); other hosts connect to the destination's address and are seen at their own.
The source binds the address it is seen at when it can (it always can a private
one; never a public one on EC2), so that ``from=`` matches where it really comes
from.

The key line is removed when the transfer ends, also after an error or a
cancellation (shielded; a failing removal never replaces the error in flight).
When the controller itself dies (SIGKILL, power loss), :func:`sweep_stale_keys`
removes what it left: every host → host transfer sweeps both hosts first, and a
region scan may call it for each server. Stale means expired on the host's clock,
made by a controller process of this machine that no longer runs, or one whose
removal failed earlier in this process (the host was down).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from asyncstage import shell
from asyncstage.concurrency import concurrently
from asyncstage.errors import AsyncstageError, NoRoute
from asyncstage.transfer.base import cleanup
from asyncstage.transfer.run import (
    STALE_AFTER,
    controller_alive,
    controller_id,
    helper,
    owner_record,
)

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = ["KEY_MARKER", "Link", "direct_link", "route", "sweep_stale_keys"]

_log = logging.getLogger("asyncstage.transfer")

KEY_MARKER = "asyncstage-transfer-"
"""Start of the tag in the comment of every temporary transfer key."""


@dataclass(frozen=True)
class Link:
    """A temporary way for one host to ssh into another (see :func:`direct_link`)."""

    options: list[str]
    """OpenSSH ``ssh`` options (key, port, known_hosts, timeouts), no destination."""
    user: str
    address: str
    workdir: str
    """The private work dir on the source that holds the key: run the transfer in it."""

    @property
    def rsync_shell(self) -> str:
        """The ``rsync -e`` value."""
        return shell.command_line("ssh", *self.options)

    @property
    def target(self) -> str:
        """``user@address`` of the destination, as rsync takes it."""
        return shell.user_at_host(self.user, self.address)

    def argv(self, *cmd: str) -> list[str]:
        """``ssh`` argv running ``cmd`` on the destination (``-l user -- address line``)."""
        return shell.openssh_argv(self.options, self.user, self.address, *cmd)


_PREFERENCE = re.compile(r"(KexAlgorithms|Ciphers)=[A-Za-z0-9@.,_+-]+")


def _preferences(made: Mapping[str, Any]) -> list[str]:
    """The source host's ``ssh`` algorithm order (``rsynchelper linkdir``), if it is only
    ``-o KexAlgorithms=...`` / ``-o Ciphers=...`` pairs of algorithm names: a host's
    answer is not ours to trust with arbitrary ssh options (a ``ProxyCommand``)."""
    got = made.get("prefer")
    if not isinstance(got, list) or len(got) % 2:
        return []
    pairs = zip(got[::2], got[1::2], strict=True)
    if all(o == "-o" and isinstance(v, str) and _PREFERENCE.fullmatch(v) for o, v in pairs):
        return [str(o) for o in got]
    _log.warning("ignoring an unexpected ssh algorithm preference: %r", got)
    return []


_unrevoked: dict[tuple[str, str, str], set[str]] = {}
"""Tags whose revocation failed (the host was down), by (host label, user, keys file):
the next sweep of that host removes them."""


async def sweep_stale_keys(
    host: SSHHost, *, sudo: bool = True, authorized_keys: str | None = None
) -> dict[str, Any]:
    """Remove stale temporary transfer keys authorised on ``host`` for its login user
    (in ``authorized_keys``, default ``~/.ssh/authorized_keys``) and stale transfer
    work dirs (private key halves, processes) on ``host``.

    Stale: past its expiry on the host's clock, made by a controller process on
    this machine that no longer runs (a controller on another machine is trusted
    until the expiry), or one this process failed to remove earlier.
    Returns ``{"removed": [tags], "swept": [dirs]}``.
    """
    keys_file = authorized_keys or ""
    where = (host.label, host.username, keys_file)
    pending = sorted(_unrevoked.get(where, ()))  # our own revocations that failed earlier
    found = await helper(host, sudo, "sweep", host.username, keys_file, json.dumps(pending))
    owners = {str(k.get("controller", "")) for k in found.get("keys", [])}
    owners |= {str(d.get("controller", "")) for d in found.get("dirs", [])}
    dead = sorted(o for o in owners if o and controller_alive(o) is False)
    removed, swept = list(found.get("removed", [])), list(found.get("swept", []))
    if dead:
        again = await helper(host, sudo, "sweep", host.username, keys_file, json.dumps(dead))
        removed += again.get("removed", [])
        swept += again.get("swept", [])
    _unrevoked.pop(where, None)
    if removed or swept:
        _log.warning(
            "%s: swept %d stale transfer key(s) and %d work dir(s) left by a controller "
            "that did not clean up",
            host.label,
            len(removed),
            len(swept),
        )
    return {"removed": removed, "swept": swept}


async def _sweep_quietly(host: SSHHost, sudo: bool, authorized_keys: str | None) -> None:
    """A sweep before a transfer: its failure is logged, and the transfer goes on (it
    reports its own errors, e.g. a refused authorized_keys, more precisely)."""
    try:
        await sweep_stale_keys(host, sudo=sudo, authorized_keys=authorized_keys)
    except (AsyncstageError, OSError) as e:
        _log.warning("%s: could not sweep stale transfer keys: %s", host.label, e)


@asynccontextmanager
async def direct_link(
    src: SSHHost,
    src_sudo: bool,
    dst: SSHHost,
    dst_sudo: bool,
    authorized_keys: str | None,
) -> AsyncIterator[Link]:
    """Let ``src`` ssh into ``dst`` for one transfer (see the module docstring).

    The key lives in a private work dir on ``src`` (:attr:`Link.workdir`, where the
    transfer's processes run too). When the block ends (also on error or
    cancellation) the key is revoked on ``dst`` and the work dir removed from ``src``
    (its processes stopped), both at once.

    Each step is one helper run on a host (~40 ms on the local cloud), so the two
    hosts' share runs side by side: ``src`` is swept and then makes the dir and key
    while ``dst`` is swept; only the authorisation waits for both.
    """
    src_at, dst_at = route(src, dst)
    async with (
        _admitted(src, dst),
        _keyed_link(src, src_sudo, dst, dst_sudo, authorized_keys, src_at, dst_at) as link,
    ):
        yield link


@asynccontextmanager
async def _keyed_link(
    src: SSHHost,
    src_sudo: bool,
    dst: SSHHost,
    dst_sudo: bool,
    authorized_keys: str | None,
    src_at: str,
    dst_at: str,
) -> AsyncIterator[Link]:
    """:func:`direct_link` once the route is open: the key, authorised and revoked."""
    tag = f"{KEY_MARKER}{secrets.token_hex(8)}"
    pinned = " ".join((await dst.host_public_key()).split()[:2])
    known = f"{shell.known_hosts_pattern(dst_at, dst.port)} {pinned}"
    keys_file = authorized_keys or ""
    made: dict[str, Any] = {}
    authorizing = False
    in_flight: BaseException | None = None

    async def source_side() -> None:
        await _sweep_quietly(src, src_sudo, None)  # what a killed controller left behind
        made.update(await helper(src, src_sudo, "linkdir", owner_record(), tag, known, src_at))

    try:
        await concurrently(
            source_side, functools.partial(_sweep_quietly, dst, dst_sudo, authorized_keys)
        )
        options = f'from="{shell.check_address(src_at)}",restrict'
        comment = f"{tag} controller={controller_id()}"
        _log.debug("%s: authorising %s for %s", dst.label, tag, src.label)
        authorizing = True  # from here on a revocation is due, even if this is cut short
        await helper(
            dst, dst_sudo, "authorize", dst.username, keys_file, options, made["public"],
            comment, str(STALE_AFTER),
        )  # fmt: skip
        ssh_options = shell.openssh_options(
            port=dst.port,
            known_hosts=str(made["known_hosts"]),
            client_keys=[str(made["key"])],
            connect_timeout=dst.connect_timeout,
            keepalive_interval=dst.keepalive_interval,
            bind_address=src_at if made.get("bindable") else None,
            algorithms=_preferences(made),  # ~70 ms less per connection on OpenSSH 9
        )
        yield Link(ssh_options, dst.username, dst_at, str(made["dir"]))
    except BaseException as e:
        in_flight = e
        raise
    finally:
        steps: list[Callable[[], Awaitable[None]]] = []
        if authorizing:
            _unrevoked.setdefault((dst.label, dst.username, keys_file), set()).add(tag)
            where = keys_file or "~/.ssh/authorized_keys"
            revoke = functools.partial(_revoke, dst, dst_sudo, keys_file, tag)
            what = f"removing the temporary transfer key {tag} from {where}"
            steps.append(functools.partial(cleanup, revoke, what, dst.label, in_flight))
        if "dir" in made:
            remove = functools.partial(helper, src, src_sudo, "cleanup", str(made["dir"]))
            what = f"removing {made['dir']}"
            steps.append(
                functools.partial(cleanup, remove, what, src.label, in_flight, required=False)
            )
        with anyio.CancelScope(shield=True):  # each cleanup has its own time limit
            await concurrently(*steps, cancel_others=False)


def route(src: SSHHost, dst: SSHHost) -> tuple[str, str]:
    """(the address ``dst`` sees ``src`` come from, the address ``src`` reaches ``dst`` at):
    the private ones within one private network, the public ones between two networks
    (:class:`~asyncstage.errors.NoRoute` when one side has none), else the hosts' own
    addresses."""
    inside, other = src.private_network, dst.private_network
    if inside is None or other is None:
        return src.address, dst.address
    if inside[0] == other[0]:
        return inside[1], other[1]
    if src.public_address is None or dst.public_address is None:
        lacking = src if src.public_address is None else dst
        raise NoRoute(
            f"a transfer from {src.label} to {dst.label} crosses VPCs (or regions) and "
            f"{lacking.label} has no public address, so EC2 gives the leg no path: copy "
            "through this machine (get, then put), or use servers with a public address "
            "(or in one VPC)",
            host=lacking.label,
        )
    return src.public_address, dst.public_address


@asynccontextmanager
async def _admitted(src: SSHHost, dst: SSHHost) -> AsyncIterator[None]:
    """Between two networks: ``dst`` admits ``src``'s public address for the block
    (:mod:`asyncstage.transfer.ingress`)."""
    inside, other = src.private_network, dst.private_network
    across = inside is not None and other is not None and inside[0] != other[0]
    if not across or dst.admit_ssh is None or src.public_address is None:
        yield
        return
    async with dst.admit_ssh(f"{src.public_address}/32"):
        yield


async def _revoke(dst: SSHHost, sudo: bool, keys_file: str, tag: str) -> None:
    await helper(dst, sudo, "revoke", dst.username, keys_file, tag)
    where = (dst.label, dst.username, keys_file)
    _unrevoked.get(where, set()).discard(tag)
    if not _unrevoked.get(where, True):
        del _unrevoked[where]
