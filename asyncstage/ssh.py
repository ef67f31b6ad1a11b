"""The ssh layer: run commands on a remote host over one shared asyncssh connection.

:class:`SSHHost` is the handle a :class:`~asyncstage.Server` delegates to. It opens
one connection per host on first use, shares it between every command, and opens
a new one when it dropped (a command that may have started is never re-run).
Channels are queued below the server's ``MaxSessions`` so that any number of
concurrent commands simply wait their turn.

Host keys are always verified against an OpenSSH-format ``known_hosts`` file of
our own (:class:`KnownHosts`), which OpenSSH's ``ssh`` (used by rsync and
:meth:`SSHHost.shell`) reads too:

* ``expected_fingerprints`` given: the key must match one of them; it is then
  pinned (replacing a stale pin for that address and port).
* otherwise a pinned key must match (:class:`~asyncstage.errors.HostKeyMismatch`);
* with no pin, policy ``"accept-new"`` pins the first key seen, ``"strict"``
  refuses it.

Command forms: one ``str`` (or ``bytes``) is a shell command line, run as is;
several arguments are an argv, each quoted with :func:`quote` so that the remote
(POSIX) shell interprets none of them. Command lines and OpenSSH argv are built
by :mod:`asyncstage.shell` (``quote`` and ``command_line`` are re-exported here).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, AnyStr, ClassVar, Generic, Literal, cast, overload

import anyio
import asyncssh

from asyncstage import _openssh_stream, _sshwire, shell
from asyncstage.errors import (
    CommandFailed,
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    HostKeyMismatch,
    InvalidArgument,
    PathError,
    ServerUnreachable,
    SSHError,
)
from asyncstage.remote import rsynchelper
from asyncstage.shell import Command, command_line, quote

__all__ = [
    "Command",
    "CommandReader",
    "CommandResult",
    "CommandWriter",
    "HostKeyPolicy",
    "KnownHosts",
    "SSHHost",
    "command_line",
    "quote",
]

HostKeyPolicy = Literal["accept-new", "strict"]

_OUTPUT_TAIL = 1 << 20  # bytes of stdout/stderr kept for errors of streamed commands
_KILL_GRACE = 0.5  # seconds between TERM and KILL when a command is stopped
_CLOSE_WAIT = 2.0  # seconds to wait for a channel to close
_FILE_CHUNK = 1 << 20  # bytes per read/write of a local file streamed to or from a command
# Smaller files go to scmd_from_file's command over asyncssh: an ssh child costs ~4 ms
# more per call (7.5 against 3.5 ms for 4 KiB), won back at about 2.7 MB (464 against
# ~1500 MB/s; docs/guide/commands.md).
_OPENSSH_FROM_FILE_MIN = 2 << 20
_PID_MARKER = b"asyncstage-pgid:"
# Every command runs behind this line, which tells us the remote shell's pid: sshd makes
# that shell a session and process-group leader, so `kill -- -PGID` over a second channel
# stops the whole command even where sshd ignores signal requests (root logins).
_WRAPPER = "printf '%s%s\\n' '" + _PID_MARKER.decode() + '\' "$$" >&2\n'


# -- ciphers -----------------------------------------------------------------


@functools.cache
def _encryption_algs() -> list[str]:
    """asyncssh's ciphers, AES-GCM first where the CPU has AES instructions.

    asyncssh does ChaCha20-Poly1305 partly in Python per packet; AES-GCM runs in
    OpenSSL at once: about 1.4x OpenSSH's default throughput instead of 0.7x
    (benchmarks/README.md). Elsewhere asyncssh's own order stands.
    """
    algs = [a.decode() for a in asyncssh.encryption.get_encryption_algs()]
    if not rsynchelper.has_aes():
        return algs
    gcm = [a for a in rsynchelper.GCM if a in algs]
    return gcm + [a for a in algs if a not in gcm]


@functools.cache
def _openssh_preferences() -> tuple[str, ...]:
    """``-o`` options that make the local OpenSSH ``ssh`` prefer what our asyncssh
    connections use: the key exchange (:data:`rsynchelper.FAST_KEX`) and, on CPUs with
    AES instructions, AES-GCM, moved to the front of its own defaults (read once with
    ``ssh -G``). Host -> host legs get the same from the source host's ``ssh``
    (``rsynchelper linkdir``)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return ()
    gcm = tuple(a for a in _encryption_algs() if "-gcm@" in a)
    return tuple(rsynchelper.openssh_preferences(ssh, ciphers=gcm))


# -- client keys ---------------------------------------------------------------

# Files asyncssh reads for a client key: the key, its public half, its certificate.
_KEY_FILES = ("", ".pub", "-cert.pub")
_client_keys_read: dict[tuple[str, ...], tuple[tuple[Any, ...], list[asyncssh.SSHKeyPair]]] = {}


def _file_stamp(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _client_keys(paths: Sequence[Path]) -> list[asyncssh.SSHKeyPair] | list[str]:
    """The client keys as asyncssh loads them, read again only when one of their files
    changed: given paths, asyncssh would read and parse every file at every connection.
    Paths when they cannot be loaded (asyncssh then fails the connection as it would)."""
    names = tuple(str(p) for p in paths)
    stamps = tuple(_file_stamp(name + suffix) for name in names for suffix in _KEY_FILES)
    cached = _client_keys_read.get(names)
    if cached is not None and cached[0] == stamps:
        return cached[1]
    try:
        keys = list(asyncssh.load_keypairs(list(names)))
    except (OSError, ValueError, asyncssh.Error):
        return list(names)
    if len(_client_keys_read) >= 64:  # many keys (tests): keep the cache small
        _client_keys_read.clear()
    _client_keys_read[names] = (stamps, keys)
    return keys


# -- results -----------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """A finished remote command: exit status (or signal name) and its output."""

    command: str
    exit_status: int | None
    signal: str | None
    stdout: str | bytes
    stderr: str | bytes

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.signal is None and self.exit_status == 0


# -- known_hosts ---------------------------------------------------------------


def _host_spec(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _pattern_matches(pattern: str, spec: str) -> bool:
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()
    )
    return re.fullmatch(regex, spec.lower()) is not None


def _hosts_match(field: str, spec: str) -> bool:
    """OpenSSH host-field matching: hashed ``|1|salt|hash``, or patterns with ``*``/``?``/``!``."""
    if field.startswith("|1|"):
        try:
            _, _, salt, digest = field.split("|", 3)
            mac = hmac.new(base64.b64decode(salt), spec.encode(), hashlib.sha1).digest()
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
    matched = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, spec):
            if negated:
                return False
            matched = True
    return matched


def _is_literal(field: str) -> bool:
    """A host field of plain names (``host`` or ``[host]:port``, comma-separated)."""
    return not field.startswith("|") and not any(c in field for c in "*?!")


@dataclass(frozen=True)
class _Entries:
    """A known_hosts file as read at one ``stamp``: its entries in file order, with the
    plain names indexed (a lookup is then a dict access, not a pattern match per line:
    a fleet's connections each look their address up in a file of the whole fleet)."""

    stamp: tuple[int, ...]
    lines: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]  # (host field, "type base64") per entry
    by_name: dict[str, tuple[int, ...]]  # plain name (lower case) -> entry numbers
    patterned: tuple[int, ...]  # entries with hashed names or patterns

    @classmethod
    def parse(cls, stamp: tuple[int, ...], text: str) -> _Entries:
        lines = tuple(text.splitlines())
        keys: list[tuple[str, str]] = []
        by_name: dict[str, list[int]] = {}
        patterned: list[int] = []
        for line in lines:
            fields = line.split()
            if len(fields) < 3 or fields[0].startswith(("#", "@")):
                continue
            number = len(keys)
            keys.append((fields[0], f"{fields[1]} {fields[2]}"))
            if _is_literal(fields[0]):
                for name in fields[0].lower().split(","):
                    by_name.setdefault(name, []).append(number)
            else:
                patterned.append(number)
        return cls(
            stamp,
            lines,
            tuple(keys),
            {name: tuple(numbers) for name, numbers in by_name.items()},
            tuple(patterned),
        )

    def lookup(self, spec: str) -> list[str]:
        numbers = sorted(
            {
                *self.by_name.get(spec.lower(), ()),
                *(n for n in self.patterned if _hosts_match(self.keys[n][0], spec)),
            }
        )
        found: list[str] = []
        for n in numbers:
            if self.keys[n][1] not in found:
                found.append(self.keys[n][1])
        return found


def _key_line(key: str) -> str:
    """``type base64`` of an OpenSSH public key line (comment dropped)."""
    parts = key.split()
    if len(parts) < 2:
        raise InvalidArgument(f"not an OpenSSH public key: {key!r}")
    return f"{parts[0]} {parts[1]}"


class KnownHosts:
    """An OpenSSH-format known_hosts file (also read by the OpenSSH ``ssh`` rsync runs).

    Entries for port 22 are written ``address key``, others ``[address]:port key``,
    exactly as OpenSSH does; hashed entries and patterns are understood when read.
    """

    _locks: ClassVar[dict[Path, threading.Lock]] = {}
    # The file as last read, per path: read again only when its inode, size or times
    # changed (every KnownHosts of one file shares it; a server's host makes its own).
    _read: ClassVar[dict[str, _Entries]] = {}

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"KnownHosts({str(self.path)!r})"

    def _entries(self) -> _Entries:
        key = os.path.abspath(self.path)
        try:
            st = os.stat(key)
        except FileNotFoundError:
            return _Entries.parse((), "")
        stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._read.get(key)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return _Entries.parse((), "")
        entries = _Entries.parse(stamp, text)
        if len(self._read) >= 64:  # many files (tests): keep the cache small
            self._read.clear()
        self._read[key] = entries
        return entries

    def _forget(self) -> None:
        """Drop the cached reading after a write of ours (the stamp would tell too, unless
        a rewrite gave the same inode, size and times: coarse clocks, reused inodes)."""
        self._read.pop(os.path.abspath(self.path), None)

    def _lines(self) -> list[str]:
        return list(self._entries().lines)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._locks.setdefault(self.path.resolve(), threading.Lock())
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock, open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def lookup(self, address: str, port: int = 22) -> list[str]:
        """The keys pinned for ``address``:``port``, as ``"ssh-ed25519 AAAA..."`` lines."""
        return self._entries().lookup(_host_spec(address, port))

    def add(self, address: str, port: int, public_key: str) -> None:
        """Pin ``public_key`` (``"ssh-ed25519 AAAA..."``) for ``address``:``port``."""
        key = _key_line(public_key)
        with self._locked():
            if key in self.lookup(address, port):
                return
            existed = self.path.exists()
            try:
                with open(self.path, "a") as f:
                    if not existed:
                        os.chmod(self.path, 0o600)
                    f.write(f"{_host_spec(address, port)} {key}\n")
            finally:
                self._forget()

    def remove(self, address: str, port: int = 22) -> None:
        """Forget every key pinned for ``address``:``port``."""
        spec = _host_spec(address, port)
        with self._locked():
            lines = self._lines()
            keep = [
                line
                for line in lines
                if not (
                    len(line.split()) >= 3
                    and not line.startswith(("#", "@"))
                    and _hosts_match(line.split()[0], spec)
                )
            ]
            if len(keep) == len(lines):
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.chmod(tmp, 0o600)
            try:
                tmp.replace(self.path)
            finally:
                self._forget()


def _fingerprints(key: asyncssh.SSHKey) -> set[str]:
    return {
        key.get_fingerprint("sha256").rstrip("="),
        key.get_fingerprint("md5"),
    }


def _openssh_key(key: asyncssh.SSHKey) -> str:
    return _key_line(key.export_public_key("openssh").decode())


# -- the asyncssh client ------------------------------------------------------


class _Client(asyncssh.SSHClient):
    """Judges a presented host key that is not among the pinned ones."""

    def __init__(self, host: _HostCore, pinned: list[str]) -> None:
        self._host = host
        self._pinned = pinned
        self.presented: asyncssh.SSHKey | None = None
        self.refusal: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = key
        expected = self._host.expected_fingerprints
        if expected:
            if _fingerprints(key) & set(expected):
                return True
            self.refusal = "host key does not match the expected fingerprints"
            return False
        if self._pinned:
            self.refusal = f"host key differs from the one pinned in {self._host.known_hosts.path}"
            return False
        if self._host.host_key_policy == "accept-new":
            return True
        self.refusal = (
            f"host key not known and policy is strict (no entry in {self._host.known_hosts.path})"
        )
        return False


@dataclass
class _Link:
    """One open connection, its session slots and its verified host key."""

    conn: asyncssh.SSHClientConnection
    sessions: anyio.Semaphore  # for commands: max_sessions - 1
    spare: anyio.Semaphore  # the one session kept free for stopping commands
    host_key: str


@dataclass
class _Running:
    """A started command: its channel, where it runs, and its stderr sink (with the pgid)."""

    link: _Link
    proc: asyncssh.SSHClientProcess[Any]
    stderr: _Sink
    sudo: bool


def _exited(proc: asyncssh.SSHClientProcess[Any]) -> bool:
    return proc.exit_status is not None or proc.exit_signal is not None


def _signal(proc: asyncssh.SSHClientProcess[Any], name: str) -> None:
    with contextlib.suppress(OSError, asyncssh.Error):
        proc.send_signal(name)


async def _wait_gone(proc: asyncssh.SSHClientProcess[Any]) -> None:
    """Wait until the command reported its exit, or its channel closed."""
    async with anyio.create_task_group() as tg:

        async def closed() -> None:
            await proc.wait_closed()
            tg.cancel_scope.cancel()

        tg.start_soon(closed)
        while not _exited(proc):  # noqa: ASYNC110 (asyncssh offers no event for exit-status)
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


class _Sink(io.RawIOBase):
    """A file-like target for asyncssh's output redirection.

    Keeps the output (a bounded tail with ``limit``) or echoes it to a local
    stream. As the stderr sink it also takes out the line our command wrapper
    prints first (:data:`_PID_MARKER` and the remote shell's pid), remembered as
    :attr:`pgid`: the process group to kill when the command must stop.
    """

    def __init__(
        self, limit: int | None = _OUTPUT_TAIL, echo: IO[str] | None = None, marker: bool = False
    ) -> None:
        super().__init__()
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._echo = echo
        self._head: bytes | None = b"" if marker else None  # output held until the marker
        self.pgid: int | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if self._head is not None:
            self._head += chunk
            while self._head is not None and b"\n" in self._head:
                line, self._head = self._head.split(b"\n", 1)
                if line.startswith(_PID_MARKER) and line[len(_PID_MARKER) :].isdigit():
                    self.pgid = int(line[len(_PID_MARKER) :])
                    rest, self._head = self._head, None
                    self._keep(rest)
                else:
                    self._keep(line + b"\n")
            if self._head is not None and len(self._head) > 65536:
                self._flush_head()
        else:
            self._keep(chunk)
        return len(chunk)

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head:
            self._keep(head)

    def _keep(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._echo is not None:
            _echo(self._echo, chunk)
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._limit is not None:
            while self._size - len(self._chunks[0]) >= self._limit:
                self._size -= len(self._chunks.popleft())

    def close(self) -> None:
        self._flush_head()  # asyncssh closes targets at EOF; keep the output readable

    def value(self, encoding: str | None) -> str | bytes:
        self._flush_head()
        data = b"".join(self._chunks)
        return data if encoding is None else data.decode(encoding, "replace")


def _echo(stream: IO[str], data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it too)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


class _CountingFile(io.RawIOBase):
    """A local file handed to asyncssh as a command's stdin, counting what it read.

    It offers no ``fileno()``, so asyncssh reads it with ``read()`` (in
    :data:`_FILE_CHUNK` pieces) as the channel's window allows.
    """

    def __init__(self, file: io.FileIO) -> None:
        super().__init__()
        self._file = file
        self.count = 0
        self.at_eof = False
        self.regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size) or b""
        self.count += len(data)
        self.at_eof = self.at_eof or not data
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


# -- streams -------------------------------------------------------------------


class CommandReader(Generic[AnyStr]):
    """The stdout of a remote command, read as it is produced (see :meth:`SSHHost.scmd_read`)."""

    def __init__(self, host: SSHHost, proc: asyncssh.SSHClientProcess[AnyStr], command: str):
        self._host = host
        self._proc: asyncssh.SSHClientProcess[AnyStr] = proc
        self.command = command

    async def read(self, n: int = -1) -> AnyStr:
        """Up to ``n`` bytes/characters as soon as some are there (all until EOF if -1)."""
        with self._host._map_errors(self.command):
            return await self._proc.stdout.read(n)

    async def readline(self) -> AnyStr:
        """One line with its newline; the last line may lack it; empty at EOF."""
        with self._host._map_errors(self.command):
            return await self._proc.stdout.readline()

    def at_eof(self) -> bool:
        """True when the command closed its stdout and everything was read."""
        return bool(self._proc.stdout.at_eof())

    def __aiter__(self) -> CommandReader[AnyStr]:
        return self

    async def __anext__(self) -> AnyStr:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class CommandWriter(Generic[AnyStr]):
    """The stdin of a remote command (see :meth:`SSHHost.scmd_write`)."""

    def __init__(self, host: SSHHost, run: _Running, command: str, encoding: str | None):
        self._host = host
        self._run = run
        self._proc: asyncssh.SSHClientProcess[AnyStr] = run.proc
        self._encoding = encoding
        self.command = command

    async def write(self, data: AnyStr) -> None:
        """Send ``data``; waits while the remote side is behind (backpressure).

        Raises :class:`~asyncstage.errors.CommandFailed` (or
        :class:`~asyncstage.errors.SSHError` after a zero exit) when the command
        ended before reading everything.
        """
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (OSError, asyncssh.Error) as e:
            if self._run.link.conn.is_closed():
                raise self._host._lost(e, self.command) from e
            with anyio.move_on_after(_CLOSE_WAIT):
                await _wait_gone(self._proc)
            if self._proc.exit_status not in (None, 0) or self._proc.exit_signal:
                empty = "" if self._encoding else b""
                result = self._host._result(
                    self.command, self._proc, empty, self._run.stderr.value(self._encoding)
                )
                raise self._host._failed(result) from e
            raise SSHError(
                f"command exited before reading all its input: {self.command}",
                host=self._host.label,
            ) from e

    async def drain(self) -> None:
        """Wait until the data written so far was sent."""
        with self._host._map_errors(self.command):
            await self._proc.stdin.drain()


# -- the host ------------------------------------------------------------------


class _HostCore:
    """The machinery under :class:`SSHHost`: its settings, the shared connection and the
    channels, process groups and error mapping of the commands run over it."""

    def __init__(
        self,
        address: str,
        *,
        port: int = 22,
        username: str,
        client_keys: Sequence[str | os.PathLike[str]] = (),
        known_hosts: str | os.PathLike[str] | KnownHosts,
        host_key_policy: HostKeyPolicy = "accept-new",
        expected_fingerprints: Sequence[str] = (),
        label: str | None = None,
        connect_timeout: float = 30.0,
        max_sessions: int = 10,
        keepalive_interval: float = 15.0,
        before_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if max_sessions < 1:
            raise InvalidArgument("max_sessions must be at least 1")
        self.address = shell.check_address(address)
        self.port = port
        self.username = shell.check_login_user(username)
        self.client_keys = [Path(k).expanduser() for k in client_keys]
        self.known_hosts = (
            known_hosts
            if isinstance(known_hosts, KnownHosts)
            else KnownHosts(Path(known_hosts).expanduser())
        )
        self.host_key_policy: HostKeyPolicy = "strict"
        self.expected_fingerprints: tuple[str, ...] = ()
        self.expect(expected_fingerprints, host_key_policy)
        self.before_connect = before_connect
        """Awaited before each new connection (a Server settles its host key there)."""
        self.private_network: tuple[str, str] | None = None
        """(network, address): the host's address inside a private network (an EC2 VPC);
        hosts of one network reach each other there (host -> host transfers)."""
        self.label = label or address
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.keepalive_interval = keepalive_interval
        self._link: _Link | None = None
        self._connect_lock: anyio.Lock | None = None
        self._pinged = False

    async def _connection(self) -> _Link:
        link = self._link
        if link is not None and not link.conn.is_closed():
            return link
        if self._connect_lock is None:
            self._connect_lock = anyio.Lock()
        async with self._connect_lock:
            link = self._link
            if link is not None and not link.conn.is_closed():
                return link
            self._link = None
            self._link = await self._connect()
            return self._link

    def expect(self, fingerprints: Sequence[str], policy: HostKeyPolicy) -> None:
        """The host key checks of the next connection (see the module docstring)."""
        if policy not in ("accept-new", "strict"):
            raise InvalidArgument(f"unknown host key policy {policy!r}")
        self.host_key_policy = policy
        self.expected_fingerprints = tuple(fp.strip().rstrip("=") for fp in fingerprints)

    async def _connect(self) -> _Link:
        if self.before_connect is not None:
            await self.before_connect()
        pinned = (
            [] if self.expected_fingerprints else self.known_hosts.lookup(self.address, self.port)
        )
        trusted = [asyncssh.import_public_key(k) for k in pinned]
        client = _Client(self, pinned)
        options: dict[str, Any] = {}
        if self.client_keys:
            options["client_keys"] = _client_keys(self.client_keys)
            options["agent_path"] = None
            options["preferred_auth"] = "publickey"  # the only method we have the means for
        try:
            with anyio.fail_after(self.connect_timeout):
                conn, _ = await asyncssh.create_connection(
                    lambda: client,
                    self.address,
                    self.port,
                    username=self.username,
                    known_hosts=(trusted, [], []),
                    config=[],
                    keepalive_interval=self.keepalive_interval,
                    keepalive_count_max=3,
                    encryption_algs=_encryption_algs(),
                    # asyncssh is fed a packet at a time: see asyncstage/_sshwire.py
                    tunnel=cast(Any, _sshwire.DIRECT),
                    connect_timeout=self.connect_timeout,
                    login_timeout=self.connect_timeout,
                    **options,
                )
        except asyncssh.HostKeyNotVerifiable as e:
            presented = client.presented
            raise HostKeyMismatch(
                client.refusal or str(e),
                host=self.label,
                presented=presented.get_fingerprint("sha256") if presented else None,
                expected=self.expected_fingerprints
                or [asyncssh.import_public_key(k).get_fingerprint("sha256") for k in pinned],
            ) from e
        except TimeoutError as e:
            raise ServerUnreachable(
                f"no ssh answer on port {self.port} within {self.connect_timeout:g}s",
                host=self.label,
            ) from e
        except asyncssh.PermissionDenied as e:
            raise ConnectError(
                f"ssh authentication as {self.username} failed: {e.reason}", host=self.label
            ) from e
        except ConnectionRefusedError as e:
            raise ServerUnreachable(
                f"ssh connection to port {self.port} refused", host=self.label
            ) from e
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
                raise ServerUnreachable(f"unreachable: {e}", host=self.label) from e
            raise ConnectError(f"ssh connection failed: {e}", host=self.label) from e
        except asyncssh.Error as e:
            raise ConnectError(f"ssh connection failed: {e.reason}", host=self.label) from e
        key = conn.get_server_host_key()
        if key is None:  # only with GSS key exchange, which is never enabled here
            conn.close()
            raise HostKeyMismatch("the server presented no host key", host=self.label)
        host_key = _openssh_key(key)
        if self.expected_fingerprints:
            if host_key not in self.known_hosts.lookup(self.address, self.port):
                self.known_hosts.remove(self.address, self.port)
                self.known_hosts.add(self.address, self.port, host_key)
        elif not pinned:
            self.known_hosts.add(self.address, self.port, host_key)
        return _Link(
            conn, anyio.Semaphore(max(1, self.max_sessions - 1)), anyio.Semaphore(1), host_key
        )

    def _drop(self, link: _Link) -> None:
        """Forget a broken connection; the next command opens a new one."""
        self._pinged = False
        if self._link is link:
            self._link = None
        link.conn.close()

    def reset(self) -> None:
        """Forget the cached :meth:`ping` result and close the connection (reopened on use)."""
        self._pinged = False
        link, self._link = self._link, None
        if link is not None:
            link.conn.close()

    async def close(self) -> None:
        """Close the connection (a later command opens a new one)."""
        link, self._link = self._link, None
        self._pinged = False
        if link is not None:
            link.conn.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_WAIT):
                await link.conn.wait_closed()

    async def host_public_key(self) -> str:
        """The verified host key, ``"ssh-ed25519 AAAA..."`` (connects if needed)."""
        return (await self._connection()).host_key

    # -- errors ----------------------------------------------------------------

    def _lost(self, exc: BaseException, command: str) -> SSHError:
        self._pinged = False
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return ConnectionLost(
            f"connection lost while running {command!r} ({reason}); it may or may not have "
            "completed",
            host=self.label,
        )

    @contextlib.contextmanager
    def _map_errors(self, command: str) -> Iterator[None]:
        try:
            yield
        except (OSError, asyncssh.Error) as e:
            raise self._lost(e, command) from e

    @contextlib.contextmanager
    def _timeout(self, timeout: float | None, command: str) -> Iterator[None]:
        if timeout is None:
            yield
            return
        with anyio.move_on_after(timeout) as scope:
            yield
        if scope.cancelled_caught:
            raise CommandTimeout(host=self.label, command=command, timeout=timeout)

    def _result(
        self,
        command: str,
        proc: asyncssh.SSHClientProcess[Any],
        stdout: str | bytes,
        stderr: str | bytes,
    ) -> CommandResult:
        signal = proc.exit_signal[0] if proc.exit_signal else None
        status = None if signal else proc.exit_status
        if signal is None and status is None:
            raise self._lost(EOFError("no exit status"), command)
        return CommandResult(command, status, signal, stdout, stderr)

    def _failed(self, result: CommandResult) -> CommandFailed:
        return CommandFailed(
            host=self.label,
            command=result.command,
            exit_status=result.exit_status,
            signal=result.signal,
            stdout=result.stdout,
            stderr=result.stderr,
        )

    # -- processes ---------------------------------------------------------------

    async def _start(
        self,
        command: str,
        encoding: str | None,
        *,
        sudo: bool,
        stderr: _Sink | None = None,
        **kwargs: Any,
    ) -> _Running:
        """Open a channel and start ``command``; returns with a session slot held."""
        sink = stderr if stderr is not None else _Sink(marker=True)
        # asyncssh sends a bytes command as is (bytes arguments need not be UTF-8).
        raw = cast(str, (_WRAPPER + command).encode("utf-8", "surrogateescape"))
        delay = 0.005
        deadline: float | None = None
        reconnected = False
        while True:
            link = await self._connection()
            await link.sessions.acquire()
            try:
                # Shielded: a channel that opened is always handed over (and later closed).
                with anyio.CancelScope(shield=True), anyio.fail_after(self.connect_timeout):
                    proc = await link.conn.create_process(
                        raw, encoding=encoding, errors="replace", stderr=sink, **kwargs
                    )
            except asyncssh.ChannelOpenError as e:
                # The channel never opened (or its exec was refused): the command did not start.
                link.sessions.release()
                if link.conn.is_closed():
                    self._drop(link)
                    if not reconnected:
                        reconnected = True
                        continue
                    raise self._lost(e, command) from e
                if e.code in (
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                    asyncssh.OPEN_CONNECT_FAILED,
                    asyncssh.OPEN_RESOURCE_SHORTAGE,
                ):
                    # sshd frees a session slot a little after the channel closed
                    # ("no more sessions"): wait and try again.
                    now = anyio.current_time()
                    deadline = deadline if deadline is not None else now + self.connect_timeout
                    if now < deadline:
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 0.25)
                        continue
                raise SSHError(
                    f"the server refused a session for {command!r}: {e.reason}", host=self.label
                ) from e
            except TimeoutError as e:
                link.sessions.release()
                self._drop(link)
                raise CommandTimeout(
                    host=self.label, command=command, timeout=self.connect_timeout
                ) from e
            except (OSError, asyncssh.Error) as e:
                link.sessions.release()
                self._drop(link)
                raise self._lost(e, command) from e
            except BaseException:
                link.sessions.release()
                raise
            return _Running(link, proc, sink, sudo)

    async def _kill_group(self, run: _Running, signal: str) -> None:
        """``kill -s SIGNAL -- -PGID`` over the spare session (sshd may ignore signal requests)."""
        if run.stderr.pgid is not None:
            await self._kill_pgid(run.link, run.stderr.pgid, run.sudo, signal)

    async def _kill_pgid(self, link: _Link, pgid: int, sudo: bool, signal: str) -> None:
        """``kill -s SIGNAL -- -PGID`` over ``link``'s spare session."""
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

    async def _stop(self, run: _Running) -> None:
        """Make sure the remote command is gone (TERM, then KILL) and its channel closed."""
        proc = run.proc
        for signal in ("TERM", "KILL"):
            if _exited(proc):
                break
            # OpenSSH >= 7.9 delivers signal requests to the session's process group, but
            # not for root logins: kill the process group over a second channel as well.
            _signal(proc, signal)
            with anyio.move_on_after(_KILL_GRACE):
                await self._kill_group(run, signal)
                await _wait_gone(proc)
        proc.close()
        with anyio.move_on_after(_CLOSE_WAIT):
            await proc.wait_closed()

    @asynccontextmanager
    async def _process(
        self, command: str, encoding: str | None, *, sudo: bool = False, **kwargs: Any
    ) -> AsyncIterator[_Running]:
        run = await self._start(command, encoding, sudo=sudo, **kwargs)
        try:
            yield run
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._stop(run)
                finally:
                    run.link.sessions.release()

    # -- commands ----------------------------------------------------------------


class SSHHost(_HostCore):
    """A remote host reached over ssh, with one shared connection opened on first use.

    ``known_hosts`` is the OpenSSH-format file where host keys are pinned;
    ``expected_fingerprints`` (``"SHA256:..."`` as ``ssh-keygen -l`` prints them)
    override the policy when given (:meth:`expect` changes both later);
    ``before_connect`` is awaited before each new connection. ``label`` names the
    host in errors.
    Use as ``async with SSHHost(...) as host:`` or call :meth:`close`.
    """

    _master: _openssh_stream.Master | None = None  # the file streams' OpenSSH master

    def __repr__(self) -> str:
        return f"<SSHHost {self.username}@{self.address}:{self.port} ({self.label})>"

    def reset(self) -> None:
        """Forget the cached :meth:`ping` result and close the connections (reopened on use)."""
        self._stop_master()
        super().reset()

    async def close(self) -> None:
        """Close the connections (a later command opens new ones)."""
        self._stop_master()
        await super().close()

    async def __aenter__(self) -> SSHHost:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connection ------------------------------------------------------------
    async def run(
        self,
        *cmd: Command,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        encoding: str | None = "utf-8",
        sudo: bool = False,
    ) -> CommandResult:
        """Run a command to completion; its exit status and whole stdout/stderr.

        ``check=True`` raises :class:`~asyncstage.errors.CommandFailed` on a non-zero
        exit; ``encoding=None`` gives bytes; ``timeout`` raises
        :class:`~asyncstage.errors.CommandTimeout` (the command is stopped).
        """
        command = shell.sudo_line(cmd, sudo)
        if input is not None and encoding is not None and isinstance(input, bytes):
            input = input.decode(encoding)
        elif input is not None and encoding is None and isinstance(input, str):
            input = input.encode()
        with self._timeout(timeout, command):
            kwargs: dict[str, Any] = {} if input is None else {"input": input}
            stderr = _Sink(limit=None, marker=True)
            async with self._process(command, encoding, sudo=sudo, stderr=stderr, **kwargs) as run:
                with self._map_errors(command):
                    done = await run.proc.wait()
                empty = "" if encoding else b""
                result = self._result(
                    command, run.proc, done.stdout or empty, stderr.value(encoding)
                )
        if check and not result.ok:
            raise self._failed(result)
        return result

    async def scmd(
        self,
        *cmd: Command,
        check: bool = True,
        timeout: float | None = None,
        input: str | bytes | None = None,
        sudo: bool = False,
    ) -> str:
        """Run a command and return its stdout like shell backticks (raises on failure)."""
        result = await self.run(*cmd, input=input, check=check, timeout=timeout, sudo=sudo)
        return cast(str, result.stdout)

    async def ssh(
        self,
        *cmd: Command,
        timeout: float | None = None,
        sudo: bool = False,
    ) -> bool:
        """Run a command with its output on our stdout/stderr as it comes; True on exit 0."""
        command = shell.sudo_line(cmd, sudo)
        with self._timeout(timeout, command):
            async with self._process(
                command,
                None,
                sudo=sudo,
                stdin=asyncssh.DEVNULL,
                stdout=_Sink(echo=sys.stdout),
                stderr=_Sink(echo=sys.stderr, marker=True),
            ) as run:
                with self._map_errors(command):
                    await run.proc.wait()
                result = self._result(command, run.proc, b"", b"")
        return result.ok

    @overload
    def scmd_read(
        self, *cmd: Command, encoding: None, sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandReader[bytes]]: ...
    @overload
    def scmd_read(
        self, *cmd: Command, encoding: str = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandReader[str]]: ...
    def scmd_read(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandReader[Any]]:
        """``async with host.scmd_read(...) as f``: read the command's stdout as it is produced.

        Leaving the block before the end of the output stops the remote command;
        reading to the end waits for it and raises
        :class:`~asyncstage.errors.CommandFailed` on a non-zero exit.
        """
        return self._reading(shell.sudo_line(cmd, sudo), encoding, sudo)

    @asynccontextmanager
    async def _reading(
        self, command: str, encoding: str | None, sudo: bool
    ) -> AsyncIterator[CommandReader[Any]]:
        stderr = _Sink(marker=True)
        async with self._process(
            command, encoding, sudo=sudo, stdin=asyncssh.DEVNULL, stderr=stderr
        ) as run:
            reader: CommandReader[Any] = CommandReader(self, run.proc, command)
            yield reader
            if not reader.at_eof():
                return  # left early: the command is stopped on the way out
            with self._map_errors(command):
                await run.proc.wait()
            empty = "" if encoding else b""
            result = self._result(command, run.proc, empty, stderr.value(encoding))
        if not result.ok:
            raise self._failed(result)

    @overload
    def scmd_write(
        self, *cmd: Command, encoding: None, sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandWriter[bytes]]: ...
    @overload
    def scmd_write(
        self, *cmd: Command, encoding: str = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandWriter[str]]: ...
    def scmd_write(
        self, *cmd: Command, encoding: str | None = "utf-8", sudo: bool = False
    ) -> AbstractAsyncContextManager[CommandWriter[Any]]:
        """``async with host.scmd_write(...) as f: await f.write(data)``: feed the command's stdin.

        Writes wait for the remote side (flat memory). Leaving the block sends EOF,
        waits for the command and raises :class:`~asyncstage.errors.CommandFailed`
        on a non-zero exit; leaving it by an exception stops the command.
        """
        return self._writing(shell.sudo_line(cmd, sudo), encoding, sudo)

    @asynccontextmanager
    async def _writing(
        self, command: str, encoding: str | None, sudo: bool
    ) -> AsyncIterator[CommandWriter[Any]]:
        stdout, stderr = _Sink(), _Sink(marker=True)
        async with self._process(command, encoding, sudo=sudo, stdout=stdout, stderr=stderr) as run:
            yield CommandWriter(self, run, command, encoding)
            with self._map_errors(command):
                if not run.proc.is_closing():
                    run.proc.stdin.write_eof()
                await run.proc.wait()
            result = self._result(command, run.proc, stdout.value(encoding), stderr.value(encoding))
        if not result.ok:
            raise self._failed(result)

    async def scmd_to_file(
        self, *cmd: Command, path: str | os.PathLike[str], sudo: bool = False
    ) -> int:
        """Run a command with its stdout written to the local file ``path``; the bytes written.

        No Python code touches the data: OpenSSH ``ssh`` writes it to the file (or,
        without ``ssh`` on ``PATH``, asyncssh each packet). The file is written under
        a temporary name beside ``path`` and renamed when the command exited 0; on
        :class:`~asyncstage.errors.CommandFailed`, a lost connection or cancellation
        ``path`` is left as it was (the command is stopped).
        """
        command = shell.sudo_line(cmd, sudo)
        target = Path(path)
        if await anyio.Path(target).is_dir():
            raise PathError(f"cannot write {str(target)!r}: it is a directory")
        try:
            fd, part = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".part"
            )
        except OSError as e:
            raise PathError(f"cannot write {str(target)!r}: {e.strerror}") from e
        try:
            # Unbuffered: each packet goes to the page cache at once, without another copy.
            with open(fd, "wb", buffering=0) as file:  # noqa: ASYNC230 (nothing is read or written here)
                ssh = _openssh_stream.openssh()
                if ssh is not None:
                    result = await self._openssh_file(ssh, command, sudo, subprocess.DEVNULL, fd)
                else:
                    result = await self._asyncssh_to_file(command, file, sudo)
                size = os.fstat(fd).st_size
            if not result.ok:
                raise self._failed(result)
            try:
                os.chmod(part, 0o666 & ~_umask())  # as open() would have made it, not 0600
                os.replace(part, target)
            except OSError as e:
                raise PathError(f"cannot write {str(target)!r}: {e.strerror}") from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        return size

    async def _asyncssh_to_file(self, command: str, file: io.FileIO, sudo: bool) -> CommandResult:
        """scmd_to_file without OpenSSH: asyncssh writes each packet to ``file``."""
        stderr = _Sink(marker=True)
        async with self._process(
            command,
            None,
            sudo=sudo,
            stdin=asyncssh.DEVNULL,
            stdout=file,
            stderr=stderr,
            recv_eof=False,  # the file is ours to close
        ) as run:
            with self._map_errors(command):
                await run.proc.wait()
            return self._result(command, run.proc, "", stderr.value("utf-8"))

    async def scmd_from_file(
        self, *cmd: Command, path: str | os.PathLike[str], sudo: bool = False
    ) -> int:
        """Run a command with the local file ``path`` as its stdin; the bytes sent.

        No Python code touches the data: OpenSSH ``ssh`` reads the file (or, for files
        under 2 MiB or without ``ssh`` on ``PATH``, asyncssh as the remote side takes
        it; flat memory). Raises
        :class:`~asyncstage.errors.CommandFailed` on a non-zero exit,
        :class:`~asyncstage.errors.SSHError` when the command exited 0 before reading
        all of it, and :class:`~asyncstage.errors.PathError` when ``path`` is not a
        readable regular file.
        """
        command = shell.sudo_line(cmd, sudo)
        try:
            file = open(path, "rb", buffering=0)  # noqa: ASYNC230, SIM115
        except OSError as e:
            raise PathError(f"cannot read {os.fspath(path)!r}: {e.strerror}") from e
        with file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise PathError(f"not a regular file: {os.fspath(path)!r}")
            ssh = _openssh_stream.openssh()
            if ssh is None or os.fstat(file.fileno()).st_size < _OPENSSH_FROM_FILE_MIN:
                result, sent, at_eof = await self._asyncssh_from_file(command, file, sudo)
            else:
                result = await self._openssh_file(ssh, command, sudo, file.fileno(), None)
                # ssh read the file through our descriptor: its offset is what was sent.
                sent = os.lseek(file.fileno(), 0, os.SEEK_CUR)
                at_eof = sent >= os.fstat(file.fileno()).st_size
        if not result.ok:
            raise self._failed(result)
        if not at_eof:
            raise SSHError(
                f"command exited before reading all its input: {command}", host=self.label
            )
        return sent

    async def _asyncssh_from_file(
        self, command: str, file: io.FileIO, sudo: bool
    ) -> tuple[CommandResult, int, bool]:
        """scmd_from_file without OpenSSH: asyncssh reads ``file`` as the window allows."""
        source = _CountingFile(file)
        stdout, stderr = _Sink(), _Sink(marker=True)
        async with self._process(
            command,
            None,
            sudo=sudo,
            stdin=source,
            stdout=stdout,
            stderr=stderr,
            bufsize=_FILE_CHUNK,
        ) as run:
            with self._map_errors(command):
                await run.proc.wait()
            result = self._result(command, run.proc, stdout.value("utf-8"), stderr.value("utf-8"))
        return result, source.count, source.at_eof

    async def _openssh_file(
        self, ssh: str, command: str, sudo: bool, stdin: int, stdout: int | None
    ) -> CommandResult:
        """Run ``command`` with an OpenSSH ``ssh`` child on these descriptors (see
        asyncstage/_openssh_stream.py); ``stdout=None``: kept for the result."""
        options = self.openssh_options()  # AES-GCM first where asyncssh prefers it too

        def argv(extra: list[str], line: str) -> list[str]:
            return shell.openssh_argv(
                [*options, *extra], self.username, self.address, line, ssh=ssh
            )

        master = await self._openssh_master(ssh)
        async with master.sessions:
            mux = await master.options(argv, self.connect_timeout)
            line = _openssh_stream.remote_line(_WRAPPER, command)
            return await self._openssh_run(argv(mux, line), command, sudo, stdin, stdout)

    async def _openssh_master(self, ssh: str) -> _openssh_stream.Master:
        """This host's OpenSSH master (see asyncstage/_openssh_stream.py), a new one when
        what it connects to changed."""
        host_key = await self.host_public_key()  # verified and pinned our way: ssh checks strictly
        key = (ssh, self.address, self.port, self.username, *self.client_keys)
        key = (*key, str(self.known_hosts.path), host_key)
        if self._master is None or self._master.key != key:
            self._stop_master()
            self._master = _openssh_stream.Master(key, self.max_sessions - 1)
        return self._master

    def _stop_master(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            master.close()

    async def _openssh_run(
        self, argv: list[str], command: str, sudo: bool, stdin: int, stdout: int | None
    ) -> CommandResult:
        """Run the ``ssh`` child ``argv`` (running ``command``) to its end: its result."""
        ssh = argv[0]
        out, err = _Sink(), _Sink(marker=True)

        async def stop_remote(signal: str) -> None:
            if err.pgid is not None:
                with contextlib.suppress(SSHError):
                    await self._kill_pgid(await self._connection(), err.pgid, sudo, signal)

        try:
            done = await _openssh_stream.run(
                argv,
                stdin=stdin,
                stdout=stdout,
                out=out,
                err=err,
                err_bytes=lambda: cast(bytes, err.value(None)),
                stop_remote=stop_remote,
                grace=_KILL_GRACE,
            )
        except OSError as e:
            raise SSHError(f"could not run {ssh}: {e}", host=self.label) from e
        stderr = done.stderr.decode("utf-8", "replace")
        if done.status is None or (done.returncode != 0 and done.status == 0):
            why = stderr.strip() or f"ssh exited {done.returncode}"
            if done.started:
                raise ConnectionLost(
                    f"connection lost while running {command!r} ({why}); it may or may not "
                    "have completed",
                    host=self.label,
                )
            raise SSHError(f"ssh could not run {command!r}: {why}", host=self.label)
        return CommandResult(command, done.status, None, out.value("utf-8"), stderr)

    async def ping(self, timeout: float = 10.0) -> bool:
        """True when the host answers ssh and runs ``true`` within ``timeout``.

        A success is remembered until :meth:`reset` or a connection failure.
        """
        link = self._link
        if self._pinged and link is not None and not link.conn.is_closed():
            return True
        try:
            with anyio.fail_after(timeout):
                await self.run("true", timeout=timeout)
        except (SSHError, TimeoutError):
            self._pinged = False
            return False
        self._pinged = True
        return True

    # -- OpenSSH ---------------------------------------------------------------------

    def openssh_options(self, *, batch: bool = True) -> list[str]:
        """Options for OpenSSH ``ssh`` (e.g. ``rsync -e``): our key, port and known_hosts.

        Host keys are checked strictly against :attr:`known_hosts` (connect once with
        this host first, e.g. :meth:`host_public_key`, so that the key is pinned). The key
        exchange and cipher our asyncssh connections use come first (:func:`_openssh_preferences`).
        """
        return shell.openssh_options(
            port=self.port,
            known_hosts=str(self.known_hosts.path),
            client_keys=[str(k) for k in self.client_keys],
            connect_timeout=self.connect_timeout,
            keepalive_interval=self.keepalive_interval,
            batch=batch,
            algorithms=_openssh_preferences(),
        )

    def openssh_argv(self, *cmd: Command) -> list[str]:
        """``["ssh", *options, "-l", user, "--", address, line]`` running ``cmd``
        (a shell if none)."""
        return shell.openssh_argv(self.openssh_options(), self.username, self.address, *cmd)

    async def shell(self) -> int:
        """An interactive shell with OpenSSH ``ssh``: in a new terminal window under X
        (``DISPLAY`` set), else in this terminal. Returns the exit code of ``ssh``
        (or of the terminal emulator)."""
        await self.host_public_key()  # verify and pin the host key our way first
        argv = shell.openssh_argv(self.openssh_options(batch=False), self.username, self.address)
        terminal = _terminal_emulator() if os.environ.get("DISPLAY") else None
        if terminal is not None:
            argv = [*terminal, *argv]
        try:
            done = await anyio.run_process(argv, stdin=None, stdout=None, stderr=None, check=False)
        except OSError as e:
            raise SSHError(f"could not run {argv[0]}: {e}", host=self.label) from e
        return done.returncode


def _terminal_emulator() -> list[str] | None:
    """The argv prefix that runs a command in a new terminal window, if one is installed."""
    candidates = [os.environ.get("TERMINAL", ""), "x-terminal-emulator", "xterm", "urxvt"]
    for name in candidates:
        if name and shutil.which(name):
            return [name, "-e"]
    for name in ("gnome-terminal", "konsole", "xfce4-terminal"):
        if shutil.which(name):
            return [name, "--wait", "--"] if name == "gnome-terminal" else [name, "-e"]
    return None
