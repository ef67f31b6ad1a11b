"""The TCP connection under asyncssh, fed to it in packet-sized pieces: what it saves and why.

asyncssh parses the bytes it receives out of one ``bytearray`` and, for every SSH
packet, slices the *rest* of that buffer into a new one (twice: header, then body).
asyncio hands it up to 256 KiB per read, i.e. eight 32 KiB packets (sshd's packet
size for sessions, which a client cannot raise), so each packet copied up to 224 KiB:
several times the data in memory copies when streaming. :class:`_WireProtocol` hands
it the received bytes a packet's worth at a time, so the rest it copies stays small
(benchmarks/bench_streaming.py measures the saving; benchmarks/README.md has the
figures, and the feed sizes and write corking tried and left out).

asyncssh takes this connection through its ``tunnel`` argument: any object with an
async ``create_connection(session_factory, host, port)`` (asyncssh's
``_TunnelConnectorProtocol``); :data:`DIRECT` is the one used for every host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["DIRECT"]

_FEED_BYTES = 32 * 1024 + 256  # one sshd session packet and its framing, at a time


class _WireProtocol(asyncio.Protocol):
    """Sits between the socket and asyncssh's connection: hands it small feeds."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

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
