"""The host handle: run commands on a remote host over one shared asyncssh connection."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, cast, overload

import anyio
import asyncssh

from asyncstage import _openssh_stream, shell
from asyncstage.errors import InvalidArgument, PathError, SSHError
from asyncstage.shell import Command
from asyncstage.ssh.carrier import HopMode, HopSetting
from asyncstage.ssh.connection import Connection
from asyncstage.ssh.known_hosts import HostKeyPolicy, KnownHosts, check_policy
from asyncstage.ssh.openssh import FileStreams, openssh_options, terminal_emulator, umask
from asyncstage.ssh.sinks import FILE_CHUNK, CommandResult, CountingFile, Sink
from asyncstage.ssh.streams import CommandReader, CommandWriter

__all__ = ["HopMode", "SSHHost"]

# Smaller files go to scmd_from_file's command over asyncssh: an ssh child costs more
# per call than a channel of the open connection, won back by its faster copy only for
# larger files (benchmarks/README.md).
_OPENSSH_FROM_FILE_MIN = 2 << 20


class SSHHost:
    """A remote host reached over ssh, with one shared connection opened on first use.

    ``known_hosts`` is the OpenSSH-format file where host keys are pinned;
    ``expected_fingerprints`` (``"SHA256:..."`` as ``ssh-keygen -l`` prints them)
    override the policy when given (:meth:`expect` changes both later);
    ``before_connect`` is awaited before each new connection. ``label`` names the
    host in errors. ``jump``: another host (a bastion) through which this one is
    reached, by every command, stream and OpenSSH child (:attr:`jump`).
    Use as ``async with SSHHost(...) as host:`` or call :meth:`close`.
    """

    hop = HopSetting()
    """As a jump host, how the connections to the hosts behind it are carried:
    ``"auto"`` (the default), ``"openssh"``, ``"python"`` or ``"in-process"``
    (:class:`~asyncstage.ssh.carrier.HopSetting`)."""

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
        jump: SSHHost | None = None,
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
        self.public_address: str | None = None
        """With :attr:`private_network`: the host's public address (None: it has none);
        hosts of different networks reach each other there."""
        self.admit_ssh: Callable[[str], AbstractAsyncContextManager[None]] | None = None
        """With :attr:`private_network`: ``async with host.admit_ssh("a.b.c.d/32")``
        lets that address in by ssh for the block (a cross-network transfer leg)."""
        self.label = label or address
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.keepalive_interval = keepalive_interval
        self._jump: SSHHost | None = None
        self.jump = jump
        self._conn = Connection(self)
        self._files = FileStreams(self, self._conn)

    @property
    def hop_process(self) -> bool:
        """``hop == "python"``: the hosts behind this one are carried by a Python child
        process of its own. Setting True selects it; False, the hop in this process."""
        return self.hop == "python"

    @hop_process.setter
    def hop_process(self, value: bool) -> None:
        self.hop = "python" if value else "in-process"

    @property
    def jump(self) -> SSHHost | None:
        """The jump host (bastion) this host is reached through, or None (directly).

        Its connection carries this host's (an asyncssh tunnel to :attr:`address`
        as the jump host resolves it), and OpenSSH children (rsync, file streams, the
        shell) go through it with ``ProxyCommand=ssh ... -W %h:%p`` using the jump
        host's own key, known_hosts and strict host key checking. A change takes effect
        at the next connection."""
        return self._jump

    @jump.setter
    def jump(self, jump: SSHHost | None) -> None:
        seen: SSHHost | None = jump
        while seen is not None:
            if seen is self:
                raise InvalidArgument(f"{self.label}: a jump host chain must not loop back to it")
            seen = seen.jump
        self._jump = jump

    async def tunnel(self) -> asyncssh.SSHClientConnection:
        """This host's open connection, to carry the connection to a host behind it."""
        return (await self._conn.link()).conn

    async def carrier(self) -> Any:
        """asyncssh's ``tunnel`` carrying a connection to a host behind this one (see
        :attr:`hop`)."""
        return await self._conn.carrier()

    def __repr__(self) -> str:
        return f"<SSHHost {self.username}@{self.address}:{self.port} ({self.label})>"

    def expect(self, fingerprints: Sequence[str], policy: HostKeyPolicy) -> None:
        """The host key checks of the next connection (see :mod:`asyncstage.ssh`)."""
        self.host_key_policy = check_policy(policy)
        self.expected_fingerprints = tuple(fp.strip().rstrip("=") for fp in fingerprints)

    def reset(self) -> None:
        """Forget the cached :meth:`ping` result and close the connections (reopened on use)."""
        self._files.close()
        self._conn.reset()

    async def close(self) -> None:
        """Close the connections (a later command opens new ones)."""
        self._files.close()
        await self._conn.close()

    async def __aenter__(self) -> SSHHost:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def host_public_key(self) -> str:
        """The verified host key, ``"ssh-ed25519 AAAA..."`` (connects if needed)."""
        return (await self._conn.link()).host_key

    async def ping(self, timeout: float = 10.0) -> bool:
        """True when the host answers ssh and runs ``true`` within ``timeout``.

        A success is remembered until :meth:`reset` or a connection failure.
        """
        if self._conn.pinged and self._conn.open_link() is not None:
            return True
        try:
            with anyio.fail_after(timeout):
                await self.run("true", timeout=timeout)
        except (SSHError, TimeoutError):
            self._conn.pinged = False
            return False
        self._conn.pinged = True
        return True

    # -- commands ----------------------------------------------------------------

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
        conn = self._conn
        with conn.timeout(timeout, command):
            kwargs: dict[str, Any] = {} if input is None else {"input": input}
            stderr = Sink(limit=None, marker=True)
            async with conn.process(command, encoding, sudo=sudo, stderr=stderr, **kwargs) as run:
                with conn.map_errors(command):
                    done = await run.wait()
                empty = "" if encoding else b""
                result = conn.result(
                    command, run.proc, done.stdout or empty, stderr.value(encoding)
                )
        if check and not result.ok:
            raise conn.failed(result)
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
        conn = self._conn
        with conn.timeout(timeout, command):
            async with conn.process(
                command,
                None,
                sudo=sudo,
                stdin=asyncssh.DEVNULL,
                stdout=Sink(echo=sys.stdout),
                stderr=Sink(echo=sys.stderr, marker=True),
            ) as run:
                with conn.map_errors(command):
                    await run.wait()
                result = conn.result(command, run.proc, b"", b"")
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
        conn = self._conn
        stderr = Sink(marker=True)
        async with conn.process(
            command, encoding, sudo=sudo, stdin=asyncssh.DEVNULL, stderr=stderr
        ) as run:
            reader: CommandReader[Any] = CommandReader(conn, run.proc, command)
            yield reader
            if not reader.at_eof():
                return  # left early: the command is stopped on the way out
            with conn.map_errors(command):
                await run.wait()
            empty = "" if encoding else b""
            result = conn.result(command, run.proc, empty, stderr.value(encoding))
        if not result.ok:
            raise conn.failed(result)

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
        conn = self._conn
        stdout, stderr = Sink(), Sink(marker=True)
        async with conn.process(command, encoding, sudo=sudo, stdout=stdout, stderr=stderr) as run:
            yield CommandWriter(conn, run, command, encoding, stdout)
            with conn.map_errors(command):
                if not run.proc.is_closing():
                    run.proc.stdin.write_eof()
                await run.wait()
            result = conn.result(command, run.proc, stdout.value(encoding), stderr.value(encoding))
        if not result.ok:
            raise conn.failed(result)

    # -- local files -------------------------------------------------------------

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
                    result = await self._files.run(ssh, command, sudo, subprocess.DEVNULL, fd)
                else:
                    result = await self._asyncssh_to_file(command, file, sudo)
                size = os.fstat(fd).st_size
            if not result.ok:
                raise self._conn.failed(result)
            try:
                os.chmod(part, 0o666 & ~umask())  # as open() would have made it, not 0600
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
        conn = self._conn
        stderr = Sink(marker=True)
        async with conn.process(
            command,
            None,
            sudo=sudo,
            stdin=asyncssh.DEVNULL,
            stdout=file,
            stderr=stderr,
            recv_eof=False,  # the file is ours to close
        ) as run:
            with conn.map_errors(command):
                await run.wait()
            return conn.result(command, run.proc, "", stderr.value("utf-8"))

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
                result = await self._files.run(ssh, command, sudo, file.fileno(), None)
                # ssh read the file through our descriptor: its offset is what was sent.
                sent = os.lseek(file.fileno(), 0, os.SEEK_CUR)
                at_eof = sent >= os.fstat(file.fileno()).st_size
        if not result.ok:
            raise self._conn.failed(result)
        if not at_eof:
            raise SSHError(
                f"command exited before reading all its input: {command}", host=self.label
            )
        return sent

    async def _asyncssh_from_file(
        self, command: str, file: io.FileIO, sudo: bool
    ) -> tuple[CommandResult, int, bool]:
        """scmd_from_file without OpenSSH: asyncssh reads ``file`` as the window allows."""
        conn = self._conn
        source = CountingFile(file)
        stdout, stderr = Sink(), Sink(marker=True)
        async with conn.process(
            command,
            None,
            sudo=sudo,
            stdin=source,
            stdout=stdout,
            stderr=stderr,
            bufsize=FILE_CHUNK,
        ) as run:
            with conn.map_errors(command):
                await run.wait()
            result = conn.result(command, run.proc, stdout.value("utf-8"), stderr.value("utf-8"))
        return result, source.count, source.at_eof

    # -- OpenSSH ---------------------------------------------------------------------

    def openssh_options(self, *, batch: bool = True) -> list[str]:
        """Options for OpenSSH ``ssh`` (e.g. ``rsync -e``): our key, port and known_hosts.

        Host keys are checked strictly against :attr:`known_hosts` (connect once with
        this host first, e.g. :meth:`host_public_key`, so that the key is pinned). The key
        exchange and cipher our asyncssh connections use come first
        (:func:`asyncstage.ssh.ciphers.openssh_preferences`).
        """
        return openssh_options(self, batch=batch)

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
        terminal = terminal_emulator() if os.environ.get("DISPLAY") else None
        if terminal is not None:
            argv = [*terminal, *argv]
        try:
            done = await anyio.run_process(argv, stdin=None, stdout=None, stderr=None, check=False)
        except OSError as e:
            raise SSHError(f"could not run {argv[0]}: {e}", host=self.label) from e
        return done.returncode
