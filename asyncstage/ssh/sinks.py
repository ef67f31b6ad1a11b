"""Where a command's output goes and what it leaves: sinks for asyncssh's redirection,
the marker line that tells a command's process group, and the finished result."""

from __future__ import annotations

import io
import os
import stat
from collections import deque
from dataclasses import dataclass
from typing import IO, Any

from asyncstage.errors import CommandFailed

__all__ = ["FILE_CHUNK", "PID_MARKER", "WRAPPER", "CommandResult", "CountingFile", "Sink"]

OUTPUT_TAIL = 1 << 20  # bytes of stdout/stderr kept for errors of streamed commands
FILE_CHUNK = 1 << 20  # bytes per read/write of a local file streamed to or from a command
PID_MARKER = b"asyncstage-pgid:"
# Every command runs behind this line, which tells us the remote shell's pid: sshd makes
# that shell a session and process-group leader, so `kill -- -PGID` over a second channel
# stops the whole command even where sshd ignores signal requests (root logins).
WRAPPER = "printf '%s%s\\n' '" + PID_MARKER.decode() + '\' "$$" >&2\n'


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

    def failure(self, host: str) -> CommandFailed:
        """The error that says this command failed on ``host``."""
        return CommandFailed(host=host, **vars(self))  # the error carries every field


class Sink(io.RawIOBase):
    """A file-like target for asyncssh's output redirection.

    Keeps the output (a bounded tail with ``limit``) or echoes it to a local
    stream. As the stderr sink it also takes out the line our command wrapper
    prints first (:data:`PID_MARKER` and the remote shell's pid), remembered as
    :attr:`pgid`: the process group to kill when the command must stop.
    """

    def __init__(
        self, limit: int | None = OUTPUT_TAIL, echo: IO[str] | None = None, marker: bool = False
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
                if line.startswith(PID_MARKER) and line[len(PID_MARKER) :].isdigit():
                    self.pgid = int(line[len(PID_MARKER) :])
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


class CountingFile(io.RawIOBase):
    """A local file handed to asyncssh as a command's stdin, counting what it read.

    It offers no ``fileno()``, so asyncssh reads it with ``read()`` (in
    :data:`FILE_CHUNK` pieces) as the channel's window allows.
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
