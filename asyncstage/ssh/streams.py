"""A remote command's stdout and stdin as streams (:meth:`SSHHost.scmd_read`,
:meth:`SSHHost.scmd_write`)."""

from __future__ import annotations

from typing import AnyStr, Generic, cast

import anyio
import asyncssh

from asyncstage.errors import SSHError
from asyncstage.ssh.connection import CLOSE_WAIT, Connection, Running, wait_gone
from asyncstage.ssh.sinks import Sink

__all__ = ["CommandReader", "CommandWriter"]


class CommandReader(Generic[AnyStr]):
    """The stdout of a remote command, read as it is produced (see :meth:`SSHHost.scmd_read`)."""

    def __init__(
        self, conn: Connection, proc: asyncssh.SSHClientProcess[AnyStr], command: str
    ) -> None:
        self._conn = conn
        self._proc: asyncssh.SSHClientProcess[AnyStr] = proc
        self.command = command

    async def read(self, n: int = -1) -> AnyStr:
        """Up to ``n`` bytes/characters as soon as some are there (all until EOF if -1)."""
        with self._conn.map_errors(self.command):
            return await self._proc.stdout.read(n)

    async def readline(self) -> AnyStr:
        """One line with its newline; the last line may lack it; empty at EOF."""
        with self._conn.map_errors(self.command):
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

    def __init__(
        self, conn: Connection, run: Running, command: str, encoding: str | None, stdout: Sink
    ):
        self._conn = conn
        self._run = run
        self._proc: asyncssh.SSHClientProcess[AnyStr] = run.proc
        self._encoding = encoding
        self._stdout = stdout
        self.command = command

    @property
    def output(self) -> AnyStr:
        """What the command wrote to its stdout so far (its last MiB): all of it once
        the block is left."""
        return cast(AnyStr, self._stdout.value(self._encoding))

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
                raise self._conn.lost(e, self.command) from e
            with anyio.move_on_after(CLOSE_WAIT):
                await wait_gone(self._proc)
            if self._proc.exit_status not in (None, 0) or self._proc.exit_signal:
                empty = "" if self._encoding else b""
                result = self._conn.result(
                    self.command, self._proc, empty, self._run.stderr.value(self._encoding)
                )
                raise self._conn.failed(result) from e
            raise SSHError(
                f"command exited before reading all its input: {self.command}",
                host=self._conn.label,
            ) from e

    async def drain(self) -> None:
        """Wait until the data written so far was sent."""
        with self._conn.map_errors(self.command):
            await self._proc.stdin.drain()
