"""The TCP connection under asyncssh, shaped for bulk data: what it costs and why.

asyncssh parses the bytes it receives out of one ``bytearray`` and, for every SSH
packet, slices the *rest* of that buffer into a new one (twice: header, then body).
asyncio hands it up to 256 KiB per read, i.e. eight 32 KiB packets (sshd's packet
size for sessions, which a client cannot raise), so each packet copied up to 224 KiB:
about eight times the data in memory copies, more than a third of the client's CPU
when streaming (measured: benchmarks/bench_streaming.py, docs/guide/commands.md).
:class:`_WireProtocol` hands it the received bytes a packet's worth at a time, so
the rest it copies stays small.

On the way out asyncssh writes each packet (and the empty ``MSG_IGNORE`` it sends
before every packet) with its own ``send()`` call, with ``TCP_NODELAY`` set: two
system calls and two wake-ups of the remote sshd per 32 KiB. :class:`_CorkedTransport`
gathers what is written during one turn of the event loop (up to :data:`_CORK_BYTES`)
into one ``send()``.

asyncssh takes this connection through its ``tunnel`` argument: any object with an
async ``create_connection(session_factory, host, port)`` (the documented
``_TunnelConnectorProtocol``); :data:`DIRECT` is the one used for every host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["DIRECT"]

_FEED_BYTES = 32 * 1024 + 256  # one sshd session packet and its framing, at a time
_CORK_BYTES = 256 * 1024  # written at once when this much is waiting


class _CorkedTransport(asyncio.Transport):
    """The socket's transport, with writes of one event-loop turn sent together."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= _CORK_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what is waiting (also before closing, EOF, and on every loop turn)."""
        self._scheduled = False
        if not self._pending:
            return
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._size = 0
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class _WireProtocol(asyncio.Protocol):
    """Sits between the socket and asyncssh's connection: small feeds in, corked writes out."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(_CorkedTransport(transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if len(data) <= _FEED_BYTES:
            self.inner.data_received(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), _FEED_BYTES):
            self.inner.data_received(view[start : start + _FEED_BYTES])  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Direct:
    """A plain TCP connection to the host, through :class:`_WireProtocol`."""

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        transport, wire = await loop.create_connection(
            lambda: _WireProtocol(session_factory()), host, port
        )
        return transport, wire.inner

    def close(self) -> None:
        """Nothing to close: the connection belongs to asyncssh's connection object."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""


DIRECT = _Direct()
