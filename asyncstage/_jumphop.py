"""The outer hop to a jump host in child processes, carrying the connections to the
hosts behind it: OpenSSH's ``ssh -W`` children (:class:`OpenSSHHop`, one per tunnel, as
``ssh -J`` runs them), or one Python child per jump host (:class:`Hop`).

Through a jump host, each byte is encrypted twice: for the host behind it (the inner
connection) and again for the jump host (the outer one, which carries the inner one as a
``direct-tcpip`` channel's data). In one process both run on its one core. Here the
outer connection runs in child processes, and this process runs each inner asyncssh
connection over one end of a socket pair whose other end the child carries.

:class:`OpenSSHHop`: each tunnel is an ``ssh -W host:port`` child of its own, whose
stdin and stdout are its end of the pair; OpenSSH's C code does the outer layer.

:class:`Hop`: one Python child per jump host and
:class:`~asyncstage.ssh.connection.Connection` (:mod:`asyncstage._hopchild`, the same
asyncssh and cipher policy), started when the first tunnel is wanted: for each tunnel
the parent hands the child its end over the control socket (``SCM_RIGHTS``) with the
target's address and port. The child exits at the control socket's EOF (the parent
closed it, or died) and at its parent's death (``PR_SET_PDEATHSIG``), and
:meth:`Hop.aclose` kills it by its pid if it lingers, and reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from asyncstage import _openssh_stream
from asyncstage._sshwire import GatheringWire

__all__ = ["Hop", "HopTunnel", "HopUnavailable", "OpenSSHHop", "OpenSSHTunnel"]

_MESSAGE = 64 * 1024
_EXIT_WAIT = 2.0  # seconds the child has to exit on its own before it is killed
# Each tunnel's socket buffers: with the kernel's default (about 200 KiB) a stream
# through the child cost this process and the child a third more CPU per byte, both
# waking for less data each time (benchmarks/bench_network.py measures them).
_SOCKET_BUFFER = 1 << 20
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class HopUnavailable(Exception):
    """The child could not connect to the jump host: ``reason`` and asyncssh's ``kind``
    of error (``HostKeyNotVerifiable``, ``PermissionDenied``, ``OSError`` ...)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class Hop:
    """A running child process holding the connection to one jump host."""

    def __init__(self, proc: anyio.abc.Process, control: socket.socket, host_key: str) -> None:
        self._proc = proc
        self._control = control
        self.host_key = host_key
        """The jump host's key the child was told to accept (and nothing else)."""
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._ended = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """The child still runs and its control socket is open."""
        return not self._ended and self._proc.returncode is None

    @classmethod
    async def start(cls, settings: dict[str, Any], timeout: float) -> Hop:
        """Start the child and have it connect with ``settings`` (see :mod:`_hopchild`);
        :class:`HopUnavailable` when it cannot. On any failure or cancellation the child
        is killed and reaped."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
            )
            argv = [sys.executable, "-P", "-m", "asyncstage._hopchild"]
            proc = await anyio.open_process(
                [*argv, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is the parent's to handle
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        hop = cls(proc, ours, settings["host_keys"][0])
        try:
            with anyio.fail_after(timeout + _EXIT_WAIT):
                ours.send(json.dumps(settings).encode())
                loop = asyncio.get_running_loop()
                answer = json.loads(await loop.sock_recv(ours, _MESSAGE) or b"null")
            if not isinstance(answer, dict):
                raise HopUnavailable("the hop process ended before it connected", "EOF")
            if not answer.get("ready"):
                raise HopUnavailable(str(answer.get("error")), str(answer.get("kind")))
            loop.add_reader(ours, hop._read)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await hop.aclose()
            raise
        return hop

    def _read(self) -> None:
        try:
            data = self._control.recv(_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        answer = json.loads(data)
        waiting = self._waiting.pop(answer.get("id"), None)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    def _end(self) -> None:
        """The control socket is closed: no more tunnels (those open end with the child)."""
        if self._ended:
            return
        self._ended = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._control)
        self._control.close()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result({"code": asyncssh.OPEN_CONNECT_FAILED, "reason": "hop ended"})
        self._waiting.clear()

    async def open(self, host: str, port: int) -> socket.socket:
        """Our end of a new tunnel to ``host:port``; asyncssh's ChannelOpenError when the
        jump host refuses it (or the child is gone)."""
        if not self.alive:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hop process ended")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            with contextlib.suppress(OSError):  # the kernel caps it at net.core.wmem_max
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        self._next_id += 1
        key = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = answer
        try:
            request = json.dumps({"id": key, "host": host, "port": port}).encode()
            while True:
                try:
                    socket.send_fds(self._control, [request], [theirs.fileno()])
                    break
                except BlockingIOError:
                    await anyio.wait_socket_writable(self._control)
            theirs.close()
            got = await answer
        except BaseException:
            self._waiting.pop(key, None)
            ours.close()
            theirs.close()
            raise
        if not got.get("ok"):
            ours.close()
            code = int(got.get("code") or asyncssh.OPEN_CONNECT_FAILED)
            raise asyncssh.ChannelOpenError(code, str(got.get("reason")))
        ours.setblocking(False)
        return ours

    def close_now(self) -> None:
        """Close the control socket and stop the child (reaped by the event loop)."""
        self._end()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def aclose(self) -> None:
        """Close the control socket; the child exits at its EOF, or is killed by its pid
        after a short wait; then reaped."""
        self._end()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_EXIT_WAIT):
                await self._proc.wait()
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            await self._proc.aclose()


async def _carried(
    sock: socket.socket, session_factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """asyncssh's connection over ``sock`` (a tunnel's end), its writes gathered: the
    process at the other end wakes once for many packets."""
    loop = asyncio.get_running_loop()
    try:
        transport, wire = await loop.create_connection(
            lambda: GatheringWire(session_factory()), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return transport, wire.inner


class HopTunnel:
    """asyncssh's tunnel for a connection through :class:`Hop` (``tunnel=``)."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        return await _carried(await self.hop.open(host, port), session_factory)

    def close(self) -> None:
        """Nothing to close: the hop belongs to the jump host's connection."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""


# -- the outer hop in OpenSSH's client ------------------------------------------------

_STARTUPS = 8
"""Tunnels whose ``ssh`` may be starting at once: without the master each logs in, and
sshd drops new connections at random beyond ``MaxStartups`` (10 by default)
unauthenticated ones."""
_ALIAS = "asyncstage-jump-host"  # the name the temporary known_hosts holds the key under


def _forward(host: str, port: int) -> str:
    """``ssh -W``'s ``host:port`` (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class OpenSSHHop:
    """The outer hop in OpenSSH's client: one ``ControlMaster`` connection to the jump
    host (:class:`asyncstage._openssh_stream.Master`), and for each tunnel an
    ``ssh -W host:port`` client of it (what ``ssh -J`` runs, multiplexed), the transport
    of one connection of this process to a host behind the jump host. The client hands
    its stdin and stdout to the master, which carries them as a channel of its one
    connection: OpenSSH's C code encrypts the jump host's layer, on a core of its own,
    this process does the work of a direct connection, and a new tunnel costs a
    client's start, not a login.

    The master connects to the jump host as :attr:`argv` says: no ssh config
    (``-F /dev/null``), batch mode, only our key files (``IdentitiesOnly``, no agent),
    no forwarding of agent or X11, and strict host key checking against a known_hosts
    file of its own holding exactly the key this process verified (``HostKeyAlias``).
    When it cannot start, or ended on its own (a jump host that runs no session for
    us), each ``ssh -W`` logs in with the same options (``ControlPath=none``). A
    client's stdin and stdout are one end of a socket pair; a tunnel is handed over once
    the host behind sends its first bytes (its ssh banner), else the child's own error
    is raised as :class:`HopUnavailable` or asyncssh's ``ChannelOpenError``.

    The hop owns its children, its master and their directories: a child ends with its
    tunnel (its socket's EOF: the connection closed, or this process died), the master
    with this process (its session reads a pipe of ours), and :meth:`aclose` stops the
    rest by their pids, reaps them and removes the directories."""

    def __init__(
        self,
        ssh: str,
        options: Callable[[str], list[str]],
        username: str,
        address: str,
        port: int,
        host_key: str,
    ) -> None:
        """``options(known_hosts)``: ``ssh``'s options for the jump host (port, key files,
        timeouts, algorithms) with that known_hosts file and strict checking."""
        self.host_key = host_key
        """The jump host's key the children accept (and nothing else)."""
        self._dir: str | None = _openssh_stream.private_dir()
        try:
            known_hosts = os.path.join(self._dir, "known_hosts")
            fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{_ALIAS} {host_key}\n")
            argv = [ssh, *options(known_hosts), "-o", f"HostKeyAlias={_ALIAS}", *_SEALED]
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.argv = [*argv, "-l", username]
        self._target = address
        self._master = _openssh_stream.Master(("jump", address, port, host_key), 1)
        self._master_started: int | None = None  # the master's pid, once one started
        self._shared = True  # tunnels go through the master (False: it ended on its own)
        self._port = port
        self._children: dict[int, anyio.abc.Process] = {}
        self._reapers: set[asyncio.Task[None]] = set()
        self._startups = anyio.Semaphore(_STARTUPS)
        self._ended = False

    @property
    def alive(self) -> bool:
        """Tunnels can still be opened (the hop was not closed)."""
        return not self._ended

    @property
    def pids(self) -> list[int]:
        """The children that carry tunnels now."""
        return [pid for pid, proc in self._children.items() if proc.returncode is None]

    async def open(
        self, host: str, port: int, timeout: float
    ) -> tuple[socket.socket, socket.socket | None]:
        """Our end of a new tunnel to ``host:port`` (see the class docstring), and the
        child's socket to the jump host (:func:`_jump_socket`; None: not ours to take)."""
        if self._ended:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "hop closed")
        mux = await self._control(timeout)
        master = self._master.pid if mux is not _UNSHARED else None
        async with self._startups:
            ours, pid = await self._open(host, port, timeout, mux or _UNSHARED)
        try:
            return ours, _jump_socket(master or pid, self._port)
        except BaseException:
            ours.close()
            raise

    async def _control(self, timeout: float) -> list[str]:
        """The options that make a tunnel's ``ssh`` a client of the master (started if
        need be), or :data:`_UNSHARED`."""
        if not self._shared:
            return _UNSHARED
        mux = await self._master.options(self._master_argv, timeout)
        pid = self._master.pid
        if self._master_started is not None and pid != self._master_started:
            # The master ended on its own: a jump host that runs no session for us
            # (ForceCommand) ends it at once, and each new one would be a login more.
            # The tunnels it still carries keep it; new ones log in on their own.
            self._shared = False
            return _UNSHARED
        self._master_started = pid
        return mux or _UNSHARED

    def _master_argv(self, options: list[str], command: str) -> list[str]:
        """The master's ``ssh``: the children's options with ``options`` (its control
        socket), and ``command`` its session (which ends it with this process)."""
        return [*self.argv, *options, "--", self._target, command]

    @property
    def master_pid(self) -> int | None:
        """The ``ControlMaster`` whose connection to the jump host carries the tunnels,
        if it runs."""
        return self._master.pid

    async def _open(
        self, host: str, port: int, timeout: float, control: list[str]
    ) -> tuple[socket.socket, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        # ssh's own messages: few, read once it ended (an unlinked file, no pipe to drain)
        with tempfile.TemporaryFile(dir=self._dir) as errors:
            proc: anyio.abc.Process | None = None
            try:
                argv = [*self.argv, *control, "-W", _forward(host, port), "--", self._target]
                proc = await anyio.open_process(
                    argv,
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=errors.fileno(),
                    start_new_session=True,  # a terminal's Ctrl-C is this process's to handle
                )
                theirs.close()
                self._watch(proc)
                with anyio.fail_after(timeout):
                    await anyio.wait_readable(ours)
                    if ours.recv(1, socket.MSG_PEEK):  # the host's banner: the tunnel is up
                        ours.setblocking(False)
                        return ours, proc.pid
                    await proc.wait()  # ssh closed its end: it failed, and is ending
                errors.seek(0)
                said = errors.read().decode("utf-8", "replace")
                if control is not _UNSHARED and not said.strip() and self._master.pid:
                    # the master opened the channel and the jump host refused it: the
                    # reason went to the master's log, not to this client
                    said = f"open failed: the jump host could not reach {_forward(host, port)}"
                raise _failure(said, proc.returncode)
            except BaseException:
                ours.close()
                theirs.close()
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                raise

    def _watch(self, proc: anyio.abc.Process) -> None:
        """Reap ``proc`` when it exits (a task of this hop's, cancelled by :meth:`aclose`)."""
        self._children[proc.pid] = proc

        async def reap() -> None:
            try:
                await proc.wait()
            finally:
                self._children.pop(proc.pid, None)
                with anyio.CancelScope(shield=True):
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                    await proc.aclose()

        task = asyncio.ensure_future(reap())
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def close_now(self) -> None:
        """Stop every child by its pid (reaped by their tasks) and remove the directory."""
        self._ended = True
        for proc in list(self._children.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self._master.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def aclose(self) -> None:
        """Stop every child (TERM, KILL after a short wait), reap them, remove the directory."""
        self._ended = True
        with anyio.CancelScope(shield=True):
            for proc in list(self._children.values()):
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            reapers = list(self._reapers)
            if reapers:
                _, waiting = await asyncio.wait(reapers, timeout=_EXIT_WAIT)
                if waiting:
                    self.close_now()
                    await asyncio.wait(waiting)
            self.close_now()


_UNSHARED = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
"""A tunnel's ``ssh`` with a connection of its own (the master could not start)."""

# Options that keep each hop's ssh to its one job, whatever it was built with.
_SEALED = [
    *("-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes"),
    # what it carries is ssh's own ciphertext (compression: none), which zlib cannot shrink
    *("-o", "Compression=no"),
    *("-o", "ProxyCommand=none", "-o", "PermitLocalCommand=no", "-o", "UpdateHostKeys=no"),
    *("-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes"),
    *("-a", "-x", "-T"),
]

_FAILURES = (
    ("Host key verification failed", "HostKeyNotVerifiable"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "HostKeyNotVerifiable"),
    ("Permission denied", "PermissionDenied"),
    ("Connection timed out", "TimeoutError"),
)


def _failure(stderr: str, returncode: int | None) -> Exception:
    """The error of a hop's ``ssh`` that ended without a tunnel, from what it said."""
    said = " ".join(stderr.split()) or f"ssh exited {returncode}"
    if "open failed" in said or "forwarding failed" in said or "forwarding request failed" in said:
        code = asyncssh.OPEN_CONNECT_FAILED
        if "administratively prohibited" in said:
            code = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        return asyncssh.ChannelOpenError(code, said)
    for words, kind in _FAILURES:
        if words in said:
            return HopUnavailable(said, kind)
    return HopUnavailable(said, "OSError")


class OpenSSHTunnel:
    """asyncssh's tunnel for a connection through :class:`OpenSSHHop` (``tunnel=``)."""

    def __init__(self, hop: OpenSSHHop, timeout: float) -> None:
        self.hop = hop
        self._timeout = timeout

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        sock, jump_socket = await self.hop.open(host, port, self._timeout)
        if jump_socket is None:
            return await _carried(sock, session_factory)
        loop = asyncio.get_running_loop()
        try:
            transport, wire = await loop.create_connection(
                lambda: _AcknowledgingWire(session_factory(), jump_socket), sock=sock
            )
        except BaseException:
            sock.close()
            jump_socket.close()
            raise
        return transport, wire.inner

    def close(self) -> None:
        """Nothing to close: the hop belongs to the jump host's connection."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""


_PIDFD_GETFD = 438  # the syscall's number (the same on every architecture but alpha)
_acknowledging = True
"""This process may take its ``ssh`` children's sockets (:func:`_jump_socket`); False once
the kernel refused it."""


def acknowledging() -> bool:
    """Whether the OpenSSH hop's tunnels acknowledge at once (see :func:`_jump_socket`);
    False once the kernel refused this process a child's socket."""
    return _acknowledging


def _jump_socket(pid: int, port: int) -> socket.socket | None:
    """A duplicate of the hop's ``ssh`` child ``pid``'s TCP socket to the jump host's
    ``port`` (``pidfd_getfd``, allowed for a child of ours), or None.

    The jump host's sshd, running no terminal session for us, leaves Nagle's algorithm
    on: it holds a small packet (a command's exit status) while its previous one is not
    acknowledged, and the kernel delays the acknowledgement by up to 40 ms when nothing
    goes back. ``ssh`` does not ask for it at once; :class:`_AcknowledgingWire` does,
    on this duplicate, each time data arrives through the tunnel (as the in-process
    hop's connection does on its own socket)."""
    global _acknowledging
    if not _acknowledging:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        _acknowledging = False
        return None
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        names = []
    try:
        for name in names:
            number = int(name)
            try:
                if number <= 2 or not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc().syscall(_PIDFD_GETFD, pidfd, number, 0)
            if fd < 0:
                if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                    _acknowledging = False
                    return None
                continue
            sock = socket.socket(fileno=fd)
            with contextlib.suppress(OSError):
                if sock.family in (socket.AF_INET, socket.AF_INET6) and (
                    sock.getpeername()[1] == port
                ):
                    return sock
            sock.close()  # only our duplicate: the child's socket stays open
        return None
    finally:
        os.close(pidfd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _AcknowledgingWire(GatheringWire):
    """:class:`GatheringWire` whose data came through ``jump``, the hop's socket to the
    jump host: each arrival has that socket acknowledge at once (``TCP_QUICKACK``, which
    the kernel drops again by its own choice, hence each time). The duplicate is closed
    with the connection."""

    def __init__(self, inner: asyncio.Protocol, jump: socket.socket) -> None:
        super().__init__(inner)
        self._jump = jump

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._jump.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._jump.close()
        super().connection_lost(exc)
