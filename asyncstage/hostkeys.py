"""A server's host key before the first contact: its console, its policy, its diagnosis.

EC2 shows an instance's console output (where cloud-init prints the host key
fingerprints) minutes after its launch; ``GetConsoleOutput`` with ``Latest=True``
shows the current output sooner, on Nitro instance types only. So before the first
contact with a new server the console is polled (``Latest=True`` first; a type that
refuses it is then polled without) until the fingerprints appear or
``timeouts.console`` has passed since its launch (a fleet's consoles as fast as EC2's
request rate for ``GetConsoleOutput`` allows, in the order its instances were seen
running, see :mod:`~asyncstage.ec2.rate`; a current console that is still empty is
asked again within a second, the late one of a Xen type ever less often); then the manager's
``host_key_policy`` decides, and says so: ``"strict"`` fails with
:class:`~asyncstage.errors.HostKeyUnverified`, ``"accept-new"`` pins the key first
seen and logs a warning. Never a silent downgrade.

With ``Manager(host_keys="user-data")`` the console is not read at all when it can be
helped: each launch makes an ed25519 host key pair here (:class:`LaunchKey`, in memory
only), gives it to its instances in their cloud-init user data (``ssh_keys``, with
``ssh_deletekeys``) and pins its public key before the first contact. That key is no
secret (anyone allowed ``ec2:DescribeInstanceAttribute``, and any process on the
instance through its metadata service, can read the user data), so at the first contact,
over the connection it verified, the server is made to generate a new key, sshd is told
to load it (SIGHUP: sessions survive) and the new key replaces the pin (:func:`rotate`).
A server that presents another key than the launch key (an image without cloud-init, a
user data that was not honoured) falls back to its console's fingerprints, then to the
policy as above: a mismatch never pins what it was shown. A rotation that fails keeps
the launch key pinned and logs a warning (the server stays usable).

:func:`diagnose` says why a server never answered ssh (its state, state reason,
console tail, whether its port 22 answered).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import asyncssh

from asyncstage.ec2 import console_fingerprints
from asyncstage.ec2.console import CONSOLE_READS
from asyncstage.errors import (
    AsyncstageError,
    EC2Error,
    HostKeyUnverified,
    InvalidArgument,
    ServerUnreachable,
)
from asyncstage.ssh.known_hosts import HostKeyPolicy, check_policy, key_line

if TYPE_CHECKING:
    from asyncstage.context import Context
    from asyncstage.refs import ServerRef
    from asyncstage.ssh import SSHHost

__all__ = [
    "HostKeyPin",
    "HostKeyPolicy",
    "LaunchKey",
    "check_policy",
    "diagnose",
    "port_answers",
    "rotate",
    "ssh_banner",
    "wait_for_fingerprints",
    "wait_for_sshd",
]

log = logging.getLogger("asyncstage")

_NO_LATEST = ("UnsupportedOperation", "InvalidParameterValue", "InvalidParameterCombination")
_CONSOLE_LINES = 15  # the console tail a ServerUnreachable carries
_LATEST_PAUSE = 1.0  # the longest pause between two reads of a current (Latest) console
_LATE_PAUSE = 10.0  # the longest between two reads of a late (not Latest) one

_console_slots: weakref.WeakKeyDictionary[Context, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


@dataclass(eq=False)
class HostKeyPin:
    """What a server's host key must be, settled before the first contact at an address.

    A server this manager launched (``fresh``) has no trustworthy known_hosts entry yet
    (any old entry for its address is dropped): its key must match the fingerprints on
    its console, polled for (:func:`wait_for_fingerprints`; the host key policy decides
    when they never come). A server given a new address by a start (``moved_from``)
    takes its pinned key along (the entry moves; the key is not trusted anew from
    whatever answers there).
    """

    fresh: bool = False
    launch_key: str | None = None  # the public key its user data gave it (pinned at once)
    rotate: bool = False  # replace the launch key at the first contact
    pinned_for: str | None = None  # the address whose host key was settled
    moved_from: str | None = None  # its address before a start gave it a new one
    expected: tuple[str, ...] = ()  # fingerprints the connection checks the key against
    accept_new: bool = False  # the console never showed fingerprints; policy accept-new
    _lock: anyio.Lock | None = field(default=None, repr=False)

    @property
    def policy(self) -> HostKeyPolicy:
        return "accept-new" if self.accept_new else "strict"

    async def settle(
        self,
        ctx: Context,
        server: ServerRef,
        address: str,
        connection: Callable[[], SSHHost | None],
    ) -> None:
        """Settle the key at ``address`` once (``connection``: the server's current one)."""
        if self.pinned_for == address:
            return
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self.pinned_for != address:
                await self._settle(ctx, server, address)
                host = connection()
                if host is not None and host.address == address:
                    host.expect(self.expected, self.policy)

    async def _settle(self, ctx: Context, server: ServerRef, address: str) -> None:
        known = ctx.known_hosts
        old = self.pinned_for or self.moved_from
        keys = known.lookup(old, 22) if old and not self.fresh else []
        if old and keys:
            known.remove(address, 22)  # a stale entry of whoever had the address before
            for key in keys:
                known.add(address, 22, key)
            known.remove(old, 22)
            expected: tuple[str, ...] = ()
        elif self.fresh and self.launch_key is not None:
            known.remove(address, 22)  # a stale entry of whoever had the address before
            known.add(address, 22, self.launch_key)
            expected = ()  # strict: the launch key or a HostKeyMismatch (see fall_back)
            self.accept_new = False
        elif self.fresh or not known.lookup(address, 22):
            if self.fresh:
                known.remove(address, 22)
            expected = await wait_for_fingerprints(ctx, server)
            self.accept_new = not expected
        else:
            expected = ()  # the pinned entry (an adopted server's) must match
        self.expected = expected
        self.fresh = False
        self.moved_from = None
        self.pinned_for = address

    def fall_back(self) -> bool:
        """The server presented another key than its launch key: its console decides
        at the next settle (False when there was no launch key to fall back from)."""
        if self.launch_key is None or self.pinned_for is None:
            return False
        self.launch_key = None  # still replaced at the first contact: it may be on it
        self.fresh = True
        self.pinned_for = None
        return True


@dataclass(frozen=True, repr=False)
class LaunchKey:
    """An ed25519 host key pair made for one launch, and the cloud-init user data that
    gives it to the launch's instances (it lives in memory only: never on disk here)."""

    public: str  # "ssh-ed25519 AAAA..."
    user_data: str

    @classmethod
    def new(cls) -> LaunchKey:
        key = asyncssh.generate_private_key("ssh-ed25519", comment="asyncstage launch key")
        public = key_line(key.export_public_key("openssh").decode())
        config = {
            "ssh_deletekeys": True,
            "ssh_keys": {
                "ed25519_private": key.export_private_key("openssh").decode(),
                "ed25519_public": public,
            },
        }
        # JSON is YAML: cloud-init reads it as the cloud-config it is
        return cls(public, "#cloud-config\n" + json.dumps(config, indent=1) + "\n")


# Run as root (sudo) over the connection that verified the launch key, as its first
# command: a new ed25519 key in place of the launch key, sshd's listener (the topmost sshd
# among this session's ancestors, whatever its init system) told to load it by SIGHUP,
# which it does by executing itself again (sessions survive); then waited for (up to
# 10 s) until it listens again: as many sockets as before, none of them an old one (or
# the same new ones twice running), and the new public key printed. The listener's
# sockets are read with shell builtins (their inodes from fdinfo; ``ls`` only on kernels
# whose fdinfo has none): a fleet's servers all run this at once, on cores of their own
# on EC2 but not in a local cloud, and every process started here is paid by each. Once
# the key is installed (``trap - EXIT``) the new key is printed whatever happens (it is
# the one sshd serves), so that the pin follows it.
_ROTATE = r"""set -eu
umask 022
key=/etc/ssh/ssh_host_ed25519_key new=/etc/ssh/.asyncstage-hostkey.$$ listener= p=$$
while [ -n "$p" ] && [ "$p" != 0 ] && [ -r "/proc/$p/status" ]; do
  read -r comm < "/proc/$p/comm" || comm=
  [ "$comm" != sshd ] || listener=$p
  ppid=
  while read -r field value; do [ "$field" != PPid: ] || { ppid=$value; break; }; done \
    < "/proc/$p/status"
  p=$ppid
done
[ -n "$listener" ] || { echo "no sshd listener above this session" >&2; exit 3; }
socks() {
  socks= n=0
  for fd in "/proc/$listener/fd/"*; do
    [ -S "$fd" ] || continue
    ino=
    { while read -r field value; do [ "$field" != ino: ] || ino=$value; done \
      < "/proc/$listener/fdinfo/${fd##*/}"; } 2>/dev/null || :
    [ -n "$ino" ] || { ino=$(ls -l "$fd" 2>/dev/null) || :; ino=${ino##*:}; ino=${ino#?}; }
    socks="$socks $ino" n=$((n + 1))
  done
}
read -r host < /proc/sys/kernel/hostname || host=localhost
[ ! -e "$new" ] && [ ! -e "$new.pub" ] || rm -f "$new" "$new.pub"
trap 'rm -f "$new" "$new.pub"' EXIT
ssh-keygen -q -t ed25519 -N '' -C "root@$host" -f "$new" </dev/null >/dev/null
socks; before="$socks " was=$n last= i=0
mv -f "$new.pub" "$key.pub"
mv -f "$new" "$key"
trap - EXIT
kill -HUP "$listener" || { echo "sshd not told to reload" >&2; was=0; }
while [ "$was" -gt 0 ] && [ "$i" -lt 500 ]; do
  sleep 0.02
  socks; fresh=$n i=$((i + 1))
  for s in $socks; do case $before in *" $s "*) fresh=0 ;; esac; done
  [ "$fresh" = 0 ] || { [ "$n" -lt "$was" ] && [ "$socks" != "$last" ]; } || break
  last=$socks
done
read -r line < "$key.pub" && echo "$line"
"""


async def rotate(ctx: Context, server: ServerRef, host: SSHHost, pin: HostKeyPin) -> bool:
    """Replace the launch key of a server just reached (over ``host``'s verified
    connection) by a key it makes itself, and pin that one; True when done. A failure
    keeps the launch key pinned and logs a warning: the server stays usable, its key
    was readable in its user data."""
    pin.rotate = False
    label = f"{server.name} ({server.instance_id})"
    address = pin.pinned_for
    try:
        # shielded: a cancellation that came after the new key was installed but before
        # it was read would leave the server serving a key nothing pins (the script ends
        # within its timeout; the cancellation then takes effect)
        with anyio.CancelScope(shield=True):
            result = await host.run(_ROTATE, sudo=True, check=False, timeout=60)
        lines = str(result.stdout).strip().splitlines()
        if result.exit_status != 0 or not lines:
            raise InvalidArgument(
                f"exit status {result.exit_status}: {str(result.stderr).strip()[-300:]}"
            )
        new = key_line(lines[-1])
        if not new.startswith("ssh-ed25519 "):
            raise InvalidArgument(f"not an ed25519 public key: {lines[-1][:80]!r}")
        asyncssh.import_public_key(new)
    except (AsyncstageError, asyncssh.KeyImportError, TimeoutError) as e:
        log.warning(
            "%s: its host key could not be replaced after the first contact (%s): the key "
            "of its user data stays pinned",
            label,
            e,
        )
        return False
    if address is not None:  # where the launch key is pinned: the new key replaces it
        ctx.known_hosts.remove(address, 22)
        ctx.known_hosts.add(address, 22, new)
    # the next connection is checked against the new pin alone (not the console's
    # fingerprints, when those verified the first one)
    pin.launch_key = None
    pin.expected = ()
    pin.accept_new = False
    host.expect((), "strict")
    log.debug("%s: host key replaced after the first contact", label)
    return True


def _since_launch(ctx: Context, server: ServerRef) -> float:
    """Seconds since the instance's last start (EC2's LaunchTime, on EC2's clock: a
    machine whose clock is ahead would otherwise see a new server as long launched and
    not wait for its console at all); 0 when unknown."""
    launched = server.instance.get("LaunchTime")
    if not isinstance(launched, datetime):
        return 0.0
    if launched.tzinfo is None:
        launched = launched.replace(tzinfo=UTC)
    return max(0.0, (ctx.ec2.now() - launched).total_seconds())


async def wait_for_fingerprints(ctx: Context, server: ServerRef) -> tuple[str, ...]:
    """The host key fingerprints on the server's console, polled for until
    ``timeouts.console`` has passed since its launch; then the policy decides:
    ``()`` (pin the first key seen, with a warning) or :class:`HostKeyUnverified`."""
    bound = ctx.timeouts.console
    deadline = anyio.current_time() + max(0.0, bound - _since_launch(ctx, server))
    interval = min(0.2, ctx.timeouts.poll_interval)
    latest = True
    slots = _console_slots.get(ctx)
    if slots is None:
        slots = _console_slots[ctx] = anyio.CapacityLimiter(CONSOLE_READS)
    while True:
        try:
            async with slots:
                console = await ctx.ec2.console_output(server.instance_id, latest=latest)
        except EC2Error as e:
            if latest and e.code in _NO_LATEST:  # a Xen type: the console as it comes
                latest = False
                continue
            log.debug("%s: no console output: %s", server.name, e)
            console = ""
        found = console_fingerprints(console)
        if found:
            return tuple(found)
        left = deadline - anyio.current_time()
        if left <= 0:
            break
        await anyio.sleep(min(interval, left))
        interval = min(interval * 1.5, _LATEST_PAUSE if latest else _LATE_PAUSE)
    label = f"{server.name} ({server.instance_id})"
    if ctx.host_key_policy == "accept-new":
        log.warning(
            "%s: no host key fingerprints on its console within %gs of its launch: pinning "
            "the key it presents first, unverified (host_key_policy='accept-new')",
            label,
            bound,
        )
        return ()
    raise HostKeyUnverified(
        f"no host key fingerprints on its console within {bound:g}s of its launch, so its "
        "host key cannot be verified; a longer console_timeout may do, or "
        "host_key_policy='accept-new' pins the first key seen",
        host=label,
        waited=bound,
    )


async def ssh_banner(address: str, port: int = 22, timeout: float = 2.0) -> bool:
    """True when an ssh server answers at ``address``:``port`` (its ``SSH-`` banner)."""
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_tcp(address, port) as stream:
                return (await stream.receive(4)).startswith(b"SSH-")
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False


async def wait_for_sshd(ctx: Context, server: ServerRef, address: str, deadline: float) -> None:
    """Until an ssh server answers at ``address`` (no ssh yet: its key is not settled);
    a diagnosed :class:`ServerUnreachable` when the deadline passes first."""
    while not await ssh_banner(address):
        if anyio.current_time() >= deadline:
            raise await diagnose(ctx, server, address, "sshd never answered")
        await anyio.sleep(0.2)


async def port_answers(address: str, port: int = 22, timeout: float = 2.0) -> bool:
    """True when anything accepts a TCP connection at ``address``:``port``."""
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(address, port)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


async def diagnose(
    ctx: Context, server: ServerRef, address: str | None, message: str
) -> ServerUnreachable:
    """A :class:`ServerUnreachable` for ``server`` (tried at ``address``) that says what
    is known: its state and state reason, its console's tail, whether port 22 answered
    (not asked when ``address`` is None: a server behind a jump host is not this
    machine's to probe)."""
    console: str | None = None
    port_open: bool | None = None
    with anyio.move_on_after(15):  # a diagnosis never hangs the error it explains
        try:
            await server.refresh()
        except AsyncstageError as e:
            log.debug("%s: no description: %s", server.name, e)
        try:
            text = await ctx.ec2.console_output(server.instance_id, latest=True)
        except EC2Error:
            try:
                text = await ctx.ec2.console_output(server.instance_id)
            except AsyncstageError:
                text = None
        except AsyncstageError:
            text = None
        if text is not None:
            console = "\n".join(text.rstrip("\n").splitlines()[-_CONSOLE_LINES:])
        port_open = None if address is None else await port_answers(address)
    reason = server.instance.get("StateReason", {}).get("Message") or server.instance.get(
        "StateTransitionReason"
    )
    return ServerUnreachable(
        message,
        host=f"{server.name} ({server.instance_id})",
        state=server.state,
        state_reason=str(reason) if reason else None,
        console_tail=console,
        port_open=port_open,
    )
