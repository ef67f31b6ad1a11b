"""One shared asyncssh connection to a host: opened on first use with its host key
checked, its session slots, and the channels, process groups and errors of the
commands run over it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import anyio
import anyio.lowlevel
import asyncssh

from asyncstage import _jumphop, _sshwire, shell
from asyncstage.errors import (
    CommandFailed,
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    HostKeyMismatch,
    JumpHostError,
    ServerUnreachable,
    SSHError,
)
from asyncstage.ssh._stamps import StampCache
from asyncstage.ssh.carrier import Carrier, hop_failure
from asyncstage.ssh.ciphers import encryption_algs
from asyncstage.ssh.known_hosts import HostKeyPolicy, KnownHosts, fingerprints, openssh_key
from asyncstage.ssh.sinks import WRAPPER, CommandResult, Sink

__all__ = ["KILL_GRACE", "Connection", "Jump", "Link", "Running", "Target", "client_keys"]

KILL_GRACE = 0.5  # seconds between TERM and KILL when a command is stopped
CLOSE_WAIT = 2.0  # seconds to wait for a channel to close
_KILL_DELIVERY = 10.0
"""Seconds a stop may take to have ``kill`` run on the host: not the grace, which is for the
command to go once signalled (a loaded host can take longer than that to run ``kill``)."""

# The window a session channel through a jump host advertises (asyncssh's own: 2 MiB).
# Its window adjustments go back through every process of the path (this one, the hop,
# the jump host's sshd) before the server may send on: a larger one keeps the server
# sending while they wait for a core (benchmarks/README.md, bench_network). At most this much
# of a stream waits in this process when its reader does not keep up.
JUMP_WINDOW = 8 << 20


class Jump(Protocol):
    """A jump host (bastion): an :class:`~asyncstage.ssh.SSHHost` whose connection
    carries the connections to the hosts behind it."""

    address: str
    username: str
    label: str

    async def tunnel(self) -> asyncssh.SSHClientConnection: ...

    async def carrier(self) -> Any: ...

    def openssh_options(self, *, batch: bool = True) -> list[str]: ...


class Target(Protocol):
    """What a :class:`Connection` connects to, and how it checks the host key (an
    :class:`~asyncstage.ssh.SSHHost`'s settings)."""

    address: str
    port: int
    username: str
    client_keys: list[Path]
    known_hosts: KnownHosts
    host_key_policy: HostKeyPolicy
    expected_fingerprints: tuple[str, ...]
    before_connect: Callable[[], Awaitable[None]] | None
    label: str
    connect_timeout: float
    max_sessions: int
    keepalive_interval: float

    @property
    def hop(self) -> str: ...

    @property
    def jump(self) -> Jump | None: ...


# -- client keys ---------------------------------------------------------------

# Files asyncssh reads for a client key: the key, its public half, its certificate.
_KEY_FILES = ("", ".pub", "-cert.pub")
_client_keys_read: StampCache[list[asyncssh.SSHKeyPair] | list[str]] = StampCache()


def client_keys(paths: Sequence[Path]) -> list[asyncssh.SSHKeyPair] | list[str]:
    """The client keys as asyncssh loads them, read again only when one of their files
    changed: given paths, asyncssh would read and parse every file at every connection.
    Paths when they cannot be loaded (asyncssh then fails the connection as it would)."""
    names = tuple(str(p) for p in paths)

    def load() -> list[asyncssh.SSHKeyPair] | list[str]:
        try:
            return list(asyncssh.load_keypairs(list(names)))
        except (OSError, ValueError, asyncssh.Error):
            return list(names)

    files = [name + suffix for name in names for suffix in _KEY_FILES]
    return _client_keys_read.get(names, files, load)


# -- connection options --------------------------------------------------------

# asyncssh.connect() builds a new SSHClientConnectionOptions for every connection, in a
# worker thread (a thread hop, the options prepared again, saslprep of the user name,
# ~/.ssh looked at), also when handed one to start from: a fleet's connections differ
# only in what is the host's. The options are prepared here once per set of settings
# and copied for each connection with the host's own fields set (:func:`host_options`),
# which :func:`_open` connects with.

# What asyncssh reads from ~/.ssh while preparing options (X.509 trust for host
# certificates): a prepared set is made again when one of them changes.
_X509_DEFAULTS = ("~/.ssh/ca-bundle.crt", "~/.ssh/crt")


@dataclass(frozen=True)
class _Prepared:
    """Options prepared once for ``keys`` (the key objects they hold)."""

    keys: list[asyncssh.SSHKeyPair]
    options: asyncssh.SSHClientConnectionOptions


_prepared: StampCache[_Prepared] = StampCache()


def _settings(t: Target) -> dict[str, Any]:
    """What asyncssh is told for every connection to ``t``, but the host's own fields."""
    return {
        "username": t.username,
        "agent_path": None,
        "preferred_auth": "publickey",  # the only method we have the means for
        "config": [],
        "keepalive_interval": t.keepalive_interval,
        "keepalive_count_max": 3,
        "encryption_algs": encryption_algs(),
        "login_timeout": t.connect_timeout,
    }


def prepared_options(
    t: Target, keys: list[asyncssh.SSHKeyPair]
) -> asyncssh.SSHClientConnectionOptions:
    """asyncssh's options for connections to hosts like ``t`` with ``keys``, prepared once.

    Made again when the settings differ (another user, key file, keepalive or timeout:
    each has its own), when ``keys`` are other objects (their files changed:
    :func:`client_keys`), or when a file asyncssh read for them changed. The host's own
    fields (address, port, tunnel, trusted host keys, the client judging its key) are
    never in them: :func:`host_options` sets them for each connection."""
    # Every setting of _settings() that can differ between hosts (the ciphers are the
    # same for the whole process).
    name = (t.username, tuple(map(str, t.client_keys)), t.keepalive_interval, t.connect_timeout)
    files = [os.path.expanduser(f) for f in _X509_DEFAULTS]

    def make() -> _Prepared:
        options = asyncssh.SSHClientConnectionOptions(client_keys=keys, **_settings(t))
        return _Prepared(keys, options)

    entry = _prepared.get(name, files, make)
    if entry.keys is not keys:
        _prepared.forget(name)
        entry = _prepared.get(name, files, make)
    return entry.options


def host_options(
    base: asyncssh.SSHClientConnectionOptions,
    client: asyncssh.SSHClient,
    t: Target,
    tunnel: Any,
    trusted: list[asyncssh.SSHKey],
) -> asyncssh.SSHClientConnectionOptions:
    """``base`` (:func:`prepared_options`) with ``t``'s own fields: what asyncssh derives
    from connect()'s host, port, tunnel, known_hosts and client_factory (with config=[]).
    Every other option is the same for each host; the copy shares their values, which
    a connection copies before it changes any (its key list, its trusted X.509 certs)."""
    options = copy.copy(base)
    vars(options).update(
        host=t.address,
        orig_host=t.address,
        port=t.port,
        tunnel=tunnel,
        known_hosts=(trusted, [], []),
        protocol_factory=lambda: client,
    )
    options.kwargs = {
        **base.kwargs,
        "host": t.address,
        "port": t.port,
        "tunnel": tunnel,
        "known_hosts": options.known_hosts,
        "client_factory": options.protocol_factory,
    }
    return options


async def _open(
    options: asyncssh.SSHClientConnectionOptions, t: Target, tunnel: Any
) -> asyncssh.SSHClientConnection:
    """A connection to ``t`` through ``tunnel``, authenticated, with ``options``
    (:func:`host_options`): what asyncssh.connect() does for a tunnel object, without
    preparing the options again (the same constructor, ``wait="auth"``, and waiter)."""
    loop = asyncio.get_running_loop()
    options.waiter = loop.create_future()
    try:
        _, conn = await tunnel.create_connection(
            lambda: asyncssh.SSHClientConnection(loop, options, wait="auth"), t.address, t.port
        )
    except BaseException:
        options.waiter.cancel()
        raise
    conn.set_extra_info(host=t.address, port=t.port)
    try:
        await options.waiter
    except BaseException:
        conn.abort()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_WAIT):
            await conn.wait_closed()
        raise
    return cast(asyncssh.SSHClientConnection, conn)


# -- host keys -----------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _public_key(line: str) -> asyncssh.SSHKey:
    """A pinned key line, parsed once (every reconnection to a host reads the same)."""
    return asyncssh.import_public_key(line)


@functools.lru_cache(maxsize=1024)
def _key_fingerprints(line: str) -> frozenset[str]:
    return frozenset(fingerprints(_public_key(line)))


def _trusted_keys(t: Target) -> tuple[list[str], list[asyncssh.SSHKey]]:
    """(the keys pinned for ``t`` when they decide, the keys asyncssh is to accept).

    With expected fingerprints, those decide (:class:`_Client`); the keys pinned after
    matching them are handed to asyncssh as well, so that it accepts the same key again
    by comparing it, without our callback hashing it at every connection. A pinned key
    that does not match them is not trusted."""
    pinned = t.known_hosts.lookup(t.address, t.port)
    if not t.expected_fingerprints:
        return pinned, [_public_key(k) for k in pinned]
    expected = set(t.expected_fingerprints)
    return [], [_public_key(k) for k in pinned if _key_fingerprints(k) & expected]


# -- the asyncssh client ------------------------------------------------------


class _Client(asyncssh.SSHClient):
    """Judges a presented host key that is not among the pinned ones."""

    def __init__(self, target: Target, pinned: list[str]) -> None:
        self._target = target
        self._pinned = pinned
        self.presented: asyncssh.SSHKey | None = None
        self.refusal: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = key
        expected = self._target.expected_fingerprints
        if expected:
            if fingerprints(key) & set(expected):
                return True
            self.refusal = "host key does not match the expected fingerprints"
            return False
        known_hosts = self._target.known_hosts.path
        if self._pinned:
            self.refusal = f"host key differs from the one pinned in {known_hosts}"
            return False
        if self._target.host_key_policy == "accept-new":
            return True
        self.refusal = f"host key not known and policy is strict (no entry in {known_hosts})"
        return False


@dataclass
class Link:
    """One open connection, its session slots and its verified host key."""

    conn: asyncssh.SSHClientConnection
    sessions: anyio.Semaphore  # for commands: max_sessions - 1
    spare: anyio.Semaphore  # the one session kept free for stopping commands
    host_key: str


@dataclass
class Running:
    """A started command: its channel, where it runs, and its stderr sink (with the pgid)."""

    link: Link
    proc: asyncssh.SSHClientProcess[Any]
    stderr: Sink
    sudo: bool
    closed: bool = False
    """:meth:`wait` returned: the command exited and its channel closed."""

    async def wait(self) -> asyncssh.SSHCompletedProcess:
        """Wait for the command's exit and its channel's close (``proc.wait()``)."""
        done = await self.proc.wait()
        self.closed = True  # asyncssh's wait() returns once the channel closed
        return done


def _exited(proc: asyncssh.SSHClientProcess[Any]) -> bool:
    return proc.exit_status is not None or proc.exit_signal is not None


def _signal(proc: asyncssh.SSHClientProcess[Any], name: str) -> None:
    with contextlib.suppress(OSError, asyncssh.Error):
        proc.send_signal(name)


async def wait_gone(proc: asyncssh.SSHClientProcess[Any]) -> None:
    """Wait until the command reported its exit, or its channel closed."""
    async with anyio.create_task_group() as tg:

        async def closed() -> None:
            await proc.wait_closed()
            tg.cancel_scope.cancel()

        tg.start_soon(closed)
        while not _exited(proc):  # noqa: ASYNC110 (asyncssh offers no event for exit-status)
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


class Connection:
    """The shared connection to ``target`` (opened again when it dropped) and the
    channels, process groups and error mapping of the commands run over it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._link: Link | None = None
        self._connect_lock: anyio.Lock | None = None
        self.pinged = False
        """A :meth:`SSHHost.ping` succeeded over the current connection."""
        self.hops = Carrier(target)
        """The hop carrying the hosts behind this one (this host as a jump host)."""

    @property
    def label(self) -> str:
        return self.target.label

    def open_link(self) -> Link | None:
        """The current connection, if one is open."""
        link = self._link
        return link if link is not None and not link.conn.is_closed() else None

    async def link(self) -> Link:
        """The open connection, connecting first if needed."""
        link = self.open_link()
        if link is not None:
            return link
        if self._connect_lock is None:
            self._connect_lock = anyio.Lock()
        async with self._connect_lock:
            link = self.open_link()
            if link is not None:
                return link
            self._link = None
            self._link = await self._connect()
            return self._link

    async def _connect(self) -> Link:
        t = self.target
        if t.before_connect is not None:
            await t.before_connect()
        pinned, trusted = _trusted_keys(t)
        client = _Client(t, pinned)
        # asyncssh is fed a packet at a time: see asyncstage/_sshwire.py
        tunnel: Any = _sshwire.DIRECT
        if t.jump is not None:
            tunnel = await self._jump_tunnel(t.jump)
        keys = client_keys(t.client_keys) if t.client_keys else None
        try:
            # This bounds the TCP connect and the handshake: asyncssh's own connect_timeout
            # would run a second timer (and task) for the same span, and never fire first.
            with anyio.fail_after(t.connect_timeout):
                if keys and isinstance(keys[0], asyncssh.SSHKeyPair):
                    options = host_options(prepared_options(t, keys), client, t, tunnel, trusted)
                    conn = await _open(options, t, tunnel)
                else:
                    # No key of ours, or one that does not load: asyncssh looks for keys
                    # (or fails the connection) as it prepares the options, every time.
                    settings = _settings(t)
                    if keys is None:
                        del settings["agent_path"], settings["preferred_auth"]
                    conn, _ = await asyncssh.create_connection(
                        lambda: client,
                        t.address,
                        t.port,
                        known_hosts=(trusted, [], []),
                        tunnel=tunnel,
                        **({} if keys is None else {"client_keys": keys}),
                        **settings,
                    )
        except asyncssh.HostKeyNotVerifiable as e:
            presented = client.presented
            raise HostKeyMismatch(
                client.refusal or str(e),
                host=t.label,
                presented=presented.get_fingerprint("sha256") if presented else None,
                expected=t.expected_fingerprints
                or [_public_key(k).get_fingerprint("sha256") for k in pinned],
            ) from e
        except _jumphop.HopUnavailable as e:  # a hop's ssh child, reaching the jump host
            assert t.jump is not None
            failure = hop_failure(e, t.jump.label)
            failure.__cause__ = e
            raise JumpHostError(
                f"cannot reach it through the jump host {t.jump.label}: {failure}",
                host=t.label,
                jump=t.jump.label,
            ) from failure
        except (TimeoutError, OSError, asyncssh.Error) as e:
            raise self._connect_error(e) from e
        key = conn.get_server_host_key()
        if key is None:  # only with GSS key exchange, which is never enabled here
            conn.close()
            raise HostKeyMismatch("the server presented no host key", host=t.label)
        host_key = openssh_key(key)
        if t.expected_fingerprints:
            if host_key not in t.known_hosts.lookup(t.address, t.port):
                t.known_hosts.remove(t.address, t.port)
                t.known_hosts.add(t.address, t.port, host_key)
        elif not pinned:
            t.known_hosts.add(t.address, t.port, host_key)
        return Link(conn, anyio.Semaphore(max(1, t.max_sessions - 1)), anyio.Semaphore(1), host_key)

    async def _jump_tunnel(self, jump: Jump) -> Any:
        """What carries our connection through ``jump`` (opened if needed)."""
        try:
            return await jump.carrier()
        except SSHError as e:
            raise JumpHostError(
                f"cannot reach it through the jump host {jump.label}: {e}",
                host=self.target.label,
                jump=jump.label,
            ) from e

    # -- carrying the hosts behind this one (this host as a jump host) -----------

    async def carrier(self) -> Any:
        """asyncssh's ``tunnel`` for a connection to a host behind this one
        (:class:`~asyncstage.ssh.carrier.Carrier`)."""
        link = await self.link()  # the host key checked and pinned as for any connection
        return await self.hops.tunnel(link.conn, link.host_key)

    def _connect_error(self, e: BaseException) -> SSHError:
        """The error of a connection attempt that failed with ``e``."""
        t = self.target
        if t.jump is not None and isinstance(e, asyncssh.ChannelOpenError):
            return JumpHostError(
                f"the jump host {t.jump.label} could not open a tunnel to "
                f"{t.address}:{t.port}: {e.reason}",
                host=t.label,
                jump=t.jump.label,
            )
        if isinstance(e, TimeoutError):
            return ServerUnreachable(
                f"no ssh answer on port {t.port} within {t.connect_timeout:g}s", host=t.label
            )
        if isinstance(e, asyncssh.PermissionDenied):
            return ConnectError(
                f"ssh authentication as {t.username} failed: {e.reason}", host=t.label
            )
        if isinstance(e, ConnectionRefusedError):
            return ServerUnreachable(f"ssh connection to port {t.port} refused", host=t.label)
        if isinstance(e, OSError):
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
                return ServerUnreachable(f"unreachable: {e}", host=t.label)
            return ConnectError(f"ssh connection failed: {e}", host=t.label)
        reason = e.reason if isinstance(e, asyncssh.Error) else str(e)
        return ConnectError(f"ssh connection failed: {reason}", host=t.label)

    def drop(self, link: Link) -> None:
        """Forget a broken connection; the next command opens a new one."""
        self.pinged = False
        if self._link is link:
            self._link = None
        link.conn.close()

    def reset(self) -> None:
        """Forget the ping and close the connection (reopened on use)."""
        self.pinged = False
        link, self._link = self._link, None
        self.hops.close_now()
        if link is not None:
            link.conn.close()

    async def close(self) -> None:
        """Close the connection (and the hop's child) and wait a little for it to be closed."""
        link, self._link = self._link, None
        self.pinged = False
        await self.hops.aclose()
        if link is not None:
            link.conn.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_WAIT):
                await link.conn.wait_closed()

    # -- errors ----------------------------------------------------------------

    def lost(self, exc: BaseException, command: str) -> SSHError:
        """The error of a connection lost while ``command`` ran."""
        self.pinged = False
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return ConnectionLost(
            f"connection lost while running {command!r} ({reason}); it may or may not have "
            "completed",
            host=self.label,
        )

    @contextlib.contextmanager
    def map_errors(self, command: str) -> Iterator[None]:
        """asyncssh's errors as :meth:`lost`."""
        try:
            yield
        except (OSError, asyncssh.Error) as e:
            raise self.lost(e, command) from e

    @contextlib.contextmanager
    def timeout(self, timeout: float | None, command: str) -> Iterator[None]:
        """CommandTimeout when the block takes longer than ``timeout``."""
        if timeout is None:
            yield
            return
        with anyio.move_on_after(timeout) as scope:
            yield
        if scope.cancelled_caught:
            raise CommandTimeout(host=self.label, command=command, timeout=timeout)

    def result(
        self,
        command: str,
        proc: asyncssh.SSHClientProcess[Any],
        stdout: str | bytes,
        stderr: str | bytes,
    ) -> CommandResult:
        """The result of the finished ``proc``."""
        signal = proc.exit_signal[0] if proc.exit_signal else None
        status = None if signal else proc.exit_status
        if signal is None and status is None:
            raise self.lost(EOFError("no exit status"), command)
        return CommandResult(command, status, signal, stdout, stderr)

    def failed(self, result: CommandResult) -> CommandFailed:
        """The error of a command that failed with ``result``."""
        return result.failure(self.label)

    # -- processes ---------------------------------------------------------------

    async def _start(
        self,
        command: str,
        encoding: str | None,
        *,
        sudo: bool,
        stderr: Sink | None = None,
        **kwargs: Any,
    ) -> Running:
        """Open a channel and start ``command``; returns with a session slot held."""
        sink = stderr if stderr is not None else Sink(marker=True)
        if self.target.jump is not None:
            kwargs.setdefault("window", JUMP_WINDOW)
        # asyncssh sends a bytes command as is (bytes arguments need not be UTF-8).
        raw = cast(str, (WRAPPER + command).encode("utf-8", "surrogateescape"))
        connect_timeout = self.target.connect_timeout
        delay = 0.005
        deadline: float | None = None
        reconnected = False
        while True:
            link = await self.link()
            # A free slot is taken without a turn of the event loop (acquire() yields one
            # even then); a cancelled caller still starts nothing.
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                link.sessions.acquire_nowait()
            except anyio.WouldBlock:
                await link.sessions.acquire()
            try:
                # Shielded: a channel that opened is always handed over (and later closed).
                # One scope with the deadline: fail_after inside a shielded one costs a
                # second scope for each command.
                deadline = anyio.current_time() + connect_timeout
                with anyio.CancelScope(shield=True, deadline=deadline) as opening:
                    proc = await link.conn.create_process(
                        raw, encoding=encoding, errors="replace", stderr=sink, **kwargs
                    )
                if opening.cancelled_caught:
                    raise TimeoutError
            except asyncssh.ChannelOpenError as e:
                # The channel never opened (or its exec was refused): the command did not start.
                link.sessions.release()
                if link.conn.is_closed():
                    self.drop(link)
                    if not reconnected:
                        reconnected = True
                        continue
                    raise self.lost(e, command) from e
                if e.code in (
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                    asyncssh.OPEN_CONNECT_FAILED,
                    asyncssh.OPEN_RESOURCE_SHORTAGE,
                ):
                    # sshd frees a session slot a little after the channel closed
                    # ("no more sessions"): wait and try again.
                    now = anyio.current_time()
                    deadline = deadline if deadline is not None else now + connect_timeout
                    if now < deadline:
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 0.25)
                        continue
                raise SSHError(
                    f"the server refused a session for {command!r}: {e.reason}", host=self.label
                ) from e
            except TimeoutError as e:
                link.sessions.release()
                self.drop(link)
                raise CommandTimeout(
                    host=self.label, command=command, timeout=connect_timeout
                ) from e
            except (OSError, asyncssh.Error) as e:
                link.sessions.release()
                self.drop(link)
                raise self.lost(e, command) from e
            except BaseException:
                link.sessions.release()
                raise
            return Running(link, proc, sink, sudo)

    async def kill_pgid(self, link: Link, pgid: int, sudo: bool, signal: str) -> None:
        """``kill -s SIGNAL -- -PGID`` over ``link``'s spare session (sshd may ignore
        signal requests)."""
        if link.conn.is_closed():
            return
        kill = shell.sudo_line(["kill", "-s", signal, "--", f"-{pgid}"], sudo)
        kill += " 2>/dev/null"
        async with link.spare:
            for _ in range(20):
                try:
                    proc = await link.conn.create_process(
                        kill,
                        stdin=asyncssh.DEVNULL,
                        stdout=asyncssh.DEVNULL,
                        stderr=asyncssh.DEVNULL,
                    )
                except asyncssh.ChannelOpenError:
                    if link.conn.is_closed():
                        return
                    await anyio.sleep(0.05)  # the session slot is not free yet
                    continue
                except (OSError, asyncssh.Error):
                    return
                try:
                    await proc.wait()
                except (OSError, asyncssh.Error):
                    pass
                finally:
                    proc.close()
                return

    async def _stop(self, run: Running) -> None:
        """Make sure the remote command is gone (TERM, then KILL) and its channel closed."""
        proc = run.proc
        for signal in ("TERM", "KILL"):
            if _exited(proc):
                break
            # OpenSSH >= 7.9 delivers signal requests to the session's process group, but
            # not for root logins: kill the process group over a second channel as well.
            _signal(proc, signal)
            if run.stderr.pgid is not None:
                with anyio.move_on_after(_KILL_DELIVERY):
                    await self.kill_pgid(run.link, run.stderr.pgid, run.sudo, signal)
            with anyio.move_on_after(KILL_GRACE):
                await wait_gone(proc)
        proc.close()
        with anyio.move_on_after(CLOSE_WAIT):
            await proc.wait_closed()

    @asynccontextmanager
    async def process(
        self, command: str, encoding: str | None, *, sudo: bool = False, **kwargs: Any
    ) -> AsyncIterator[Running]:
        """``command`` running on a channel of its own; stopped on the way out."""
        run = await self._start(command, encoding, sudo=sudo, **kwargs)
        try:
            yield run
        finally:
            if run.closed and _exited(run.proc):
                # Ran to its end, channel closed: nothing to stop or wait for.
                run.link.sessions.release()
            else:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._stop(run)
                    finally:
                        run.link.sessions.release()
