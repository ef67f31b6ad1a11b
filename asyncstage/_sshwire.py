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
``_TunnelConnectorProtocol``); :data:`DIRECT` is the one used for every host reached
directly, :class:`JumpTunnel` for one reached through a jump host.

Through a jump host, the connection is a ``direct-tcpip`` channel of the jump host's
connection, and each of its SSH packets is sent as that channel's data. A full packet
(32 KiB of data and its framing) is a little larger than the channel's largest packet
(OpenSSH's 32 KiB), so asyncssh sent every one as a full outer packet and a small one:
twice the outer packets, each encrypted, MAC'd and framed in Python. :class:`JumpTunnel`
gathers the packets written in one turn of the event loop and hands them to the channel
at once, which cuts them into whole outer packets.

Every connection made here also re-arms asyncssh's keepalive timer at most once a second
(:func:`_coarse_keepalive`): asyncssh cancels and schedules it again at each
``data_received`` call, which is once per packet-sized feed here and, through a jump host,
once more per outer packet for the connection it carries
(benchmarks/bench_network.py measures what that saved).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import asyncssh

__all__ = [
    "DIRECT",
    "GatheringWire",
    "JumpTunnel",
    "acknowledge_at_once",
    "gathered",
]

_FEED_BYTES = 32 * 1024 + 256  # one sshd session packet and its framing, at a time


_KEEPALIVE_SLACK = 1.0  # seconds a keepalive may come early, at most a tenth of its interval


def _coarse_keepalive(conn: Any) -> None:
    """Have asyncssh's connection ``conn`` re-arm its keepalive timer at most once a
    second (a tenth of its interval, if shorter) while data arrives, not at each
    ``data_received``.

    asyncssh cancels the timer and schedules a new one (a handle pushed on the event
    loop's heap with Python comparisons, about 10 µs) every time it is given data: 32768
    times per GiB fed in packet-sized pieces, and through a jump host once more per packet
    of the outer connection. A keepalive fires after ``keepalive_interval`` seconds
    without data as before, at most a tenth of that (and :data:`_KEEPALIVE_SLACK`
    seconds) early; a changed interval (``set_keepalive``) takes effect at once. The
    timer itself, its count of unanswered requests and the disconnect are asyncssh's,
    untouched."""
    reset = getattr(conn, "_reset_keepalive_timer", None)
    if reset is None or "_reset_keepalive_timer" in vars(conn):
        return  # not asyncssh's connection as this module knows it, or done already
    loop = asyncio.get_running_loop()
    armed_at, armed_for = float("-inf"), -1.0

    def coarse_reset() -> None:
        nonlocal armed_at, armed_for
        now, interval = loop.time(), getattr(conn, "_keepalive_interval", 0.0)
        if now - armed_at >= min(_KEEPALIVE_SLACK, interval / 10) or interval != armed_for:
            armed_at, armed_for = now, interval
            reset()

    conn._reset_keepalive_timer = coarse_reset


class _InnerFlow:
    """Flow control passed on to the asyncssh connection this layer carries."""

    inner: Any

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _WireProtocol(_InnerFlow, asyncio.Protocol):
    """Sits between the socket and asyncssh's connection: hands it small feeds."""

    inner: asyncio.Protocol

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _coarse_keepalive(self.inner)
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


class _QuickAckWire(_WireProtocol):
    """:class:`_WireProtocol` that acknowledges what it receives at once.

    An sshd sets ``TCP_NODELAY`` only for a session with a terminal: a jump host's, which
    runs no session for us, holds a small packet (a command's exit status) while an
    earlier one is unacknowledged, and the kernel delays that acknowledgement by up to
    40 ms when nothing goes back. ``TCP_QUICKACK`` lasts until the kernel's next choice,
    so it is set again after each read."""

    _sock: socket.socket

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        super().data_received(data)


def acknowledge_at_once(conn: asyncssh.SSHClientConnection) -> None:
    """Have the open connection ``conn`` (to a jump host) acknowledge what it receives at
    once from now on, as :class:`_QuickAckWire` does."""
    transport = getattr(conn, "_transport", None)  # asyncssh keeps its transport there
    wire = transport.get_protocol() if isinstance(transport, asyncio.Transport) else None
    if isinstance(wire, _WireProtocol) and not isinstance(wire, _QuickAckWire):
        assert transport is not None
        quick = _QuickAckWire(wire.inner)
        quick._sock = transport.get_extra_info("socket")
        transport.set_protocol(quick)


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


_OUTER_PACKET = 32 * 1024  # OpenSSH's largest packet of a direct-tcpip channel
_GATHER_BYTES = 8 * _OUTER_PACKET  # handed on at once when this much is waiting


class _GatheredWrites(asyncio.Transport):
    """The transport the tunnelled connection writes to: its packets, gathered, handed
    on to ``chan`` (a channel, or a socket's transport).

    Whole outer packets' worth goes on once :data:`_GATHER_BYTES` wait, the rest at the
    end of the event loop's turn, so nothing waits for more data that may never come.
    Closing, aborting and EOF hand on what waits first, in order.

    The packets wait as they came (asyncssh hands over each as a ``bytes`` of its own)
    and are joined once, when handed on: appending them to one growing ``bytearray``
    copied what had gathered again at each reallocation."""

    def __init__(self, chan: asyncssh.SSHTCPChannel[bytes] | asyncio.Transport) -> None:
        super().__init__()
        self._chan = chan
        self._waiting: list[bytes] = []
        self._size = 0
        self._flush_at_turn_end: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # bytes are kept as they are; anything its writer may change is copied now
        self._waiting.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)
        if self._size >= _GATHER_BYTES:
            self._send(self._size - self._size % _OUTER_PACKET)
        if self._size and self._flush_at_turn_end is None:
            loop = asyncio.get_running_loop()
            self._flush_at_turn_end = loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_at_turn_end is not None:
            self._flush_at_turn_end.cancel()  # harmless when it is the one running
            self._flush_at_turn_end = None
        self._send(self._size)

    def _send(self, size: int) -> None:
        if not size:
            return
        joined = self._waiting[0] if len(self._waiting) == 1 else b"".join(self._waiting)
        if size == len(joined):
            data: bytes | memoryview = joined
            self._waiting, self._size = [], 0
        else:
            data = memoryview(joined)[:size]
            self._waiting, self._size = [joined[size:]], len(joined) - size
        try:
            self._chan.write(data)  # asyncssh and asyncio both take any buffer
        except ConnectionError:  # the channel closed under it: as asyncssh's own _send
            self.drop()

    def drop(self) -> None:
        """Forget what waits (the channel is gone)."""
        self._waiting, self._size = [], 0
        if self._flush_at_turn_end is not None:
            self._flush_at_turn_end.cancel()
            self._flush_at_turn_end = None

    def write_eof(self) -> None:
        self._flush()
        self._chan.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._flush()
        self._chan.close()

    def abort(self) -> None:
        self._flush()
        self._chan.abort()

    def is_closing(self) -> bool:
        return self._chan.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._size + self._chan.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._chan.get_extra_info(name, default)


class _TunnelSession(_InnerFlow, asyncssh.SSHTCPSession[bytes]):
    """The channel's session: hands the tunnelled connection what the channel receives
    (one outer packet at a time already) and the gathered transport to write to."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner: Any = inner  # an asyncssh connection: data_received takes a datatype
        self._transport: _GatheredWrites | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._transport = _GatheredWrites(chan)
        _coarse_keepalive(self.inner)
        self.inner.connection_made(self._transport)

    def session_started(self) -> None:
        self.inner.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return bool(self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport.drop()
        self.inner.connection_lost(exc)


def gathered(transport: asyncio.Transport) -> asyncio.Transport:
    """``transport`` with its writes gathered as :class:`_GatheredWrites` does."""
    return _GatheredWrites(transport)


class GatheringWire(_WireProtocol):
    """:class:`_WireProtocol` whose writes are gathered (:class:`_GatheredWrites`): a
    socket to a process that forwards them wakes once for many packets."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gathered = _GatheredWrites(transport)
        _coarse_keepalive(self.inner)
        self.inner.connection_made(self._gathered)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gathered.drop()
        self.inner.connection_lost(exc)


class JumpTunnel:
    """A connection through ``jump``'s open connection (a ``direct-tcpip`` channel),
    its packets gathered into whole outer packets (see the module's docstring)."""

    def __init__(self, jump: asyncssh.SSHClientConnection) -> None:
        self.jump = jump

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], asyncio.Protocol]:
        session = _TunnelSession(session_factory())
        chan, _ = await self.jump.create_connection(lambda: session, host, port)
        return chan, session.inner

    def close(self) -> None:
        """Nothing to close: the jump host's connection belongs to the jump host."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""
