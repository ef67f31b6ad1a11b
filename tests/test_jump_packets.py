"""Through a jump host's connection in this process (``SSHHost.hop = "in-process"``), the
tunnelled connection's packets travel in whole packets of the jump host's
``direct-tcpip`` channel (asyncstage/_sshwire.py), on real sshd
processes on 127.0.0.x: the data arrives intact and in order, and the channel carries
it in about as few packets as it fits in, not a full packet and smaller ones for each
packet of the inner connection. A stream re-arms the connections' keepalive timers
about once a second, not at every piece of data, and a keepalive still finds out a
server that stopped answering."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from asyncssh.channel import SSHTCPChannel
from asyncssh.connection import SSHClientConnection

from tests.sshd import SSHServer, descendants

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

MiB = 1 << 20
_DATA = 94  # SSH_MSG_CHANNEL_DATA
_OUTER_MAX = 32 * 1024  # OpenSSH's largest packet of a direct-tcpip channel


async def test_writes_through_a_jump_host_fill_its_channel_packets(
    sshd_factory: Callable[..., SSHServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jump = sshd_factory(address="127.0.0.71")
    target = sshd_factory(address="127.0.0.72")
    sent = {"packets": 0, "bytes": 0}
    send_packet = SSHTCPChannel.send_packet

    def counting(self: SSHTCPChannel[bytes], pkttype: int, *args: Any, **kw: Any) -> None:
        if pkttype == _DATA:
            sent["packets"] += 1
            sent["bytes"] += sum(len(a) for a in args)
        send_packet(self, pkttype, *args, **kw)

    piece = bytes(range(256)) * (MiB // 256)
    pieces = 8
    written = tmp_path / "written"
    async with jump.host() as j, target.host(jump=j) as host:
        j.hop = "in-process"
        await host.scmd("true")  # connected: only the stream's packets are counted
        monkeypatch.setattr(SSHTCPChannel, "send_packet", counting)
        async with host.scmd_write(f"cat > {written}", encoding=None) as w:
            for i in range(pieces):
                await w.write(piece[i:] + piece[:i])
        monkeypatch.undo()
    expected = hashlib.sha256(b"".join(piece[i:] + piece[:i] for i in range(pieces)))
    assert hashlib.sha256(written.read_bytes()).hexdigest() == expected.hexdigest()
    # Each inner packet is a little larger than an outer one: one outer packet and a
    # small one each would be twice the fewest; whole packets leave one part-filled
    # packet per event-loop turn at most.
    fewest = -(-sent["bytes"] // _OUTER_MAX)
    assert sent["bytes"] > pieces * MiB
    assert sent["packets"] <= fewest * 1.2, sent


async def test_a_stream_re_arms_the_keepalive_about_once_a_second(
    sshd_factory: Callable[..., SSHServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncssh re-arms its keepalive timer at every piece of data it is given; here the
    inner and the jump host's connection do so at most once a second while a stream runs."""
    jump = sshd_factory(address="127.0.0.71")
    target = sshd_factory(address="127.0.0.72")
    counts = {"armed": 0, "fed": 0}
    arm, feed = SSHClientConnection._set_keepalive_timer, SSHClientConnection.data_received

    def arming(self: SSHClientConnection) -> None:
        counts["armed"] += 1
        arm(self)

    def feeding(self: SSHClientConnection, data: bytes, datatype: Any = None) -> None:
        counts["fed"] += 1
        feed(self, data, datatype)

    size = 32 * MiB
    async with jump.host() as j, target.host(jump=j) as host:
        j.hop = "in-process"
        await host.scmd("true")
        monkeypatch.setattr(SSHClientConnection, "_set_keepalive_timer", arming)
        monkeypatch.setattr(SSHClientConnection, "data_received", feeding)
        started = time.monotonic()
        got = 0
        async with host.scmd_read(f"head -c {size} /dev/zero", encoding=None) as r:
            async for chunk in r:
                got += len(chunk)
        elapsed = time.monotonic() - started
        monkeypatch.undo()
    assert got == size
    # both connections were fed at least once per 32 KiB the stream carried
    assert counts["fed"] >= size // (32 * 1024), counts
    assert counts["armed"] <= 2 * (elapsed + 2), (counts, elapsed)


async def test_a_silent_server_is_still_found_out_by_the_keepalive(
    sshd_factory: Callable[..., SSHServer],
) -> None:
    server = sshd_factory(address="127.0.0.73")
    async with server.host(keepalive_interval=0.3) as host:
        await host.scmd("true")
        link = host._conn.open_link()
        assert link is not None and server.pid is not None
        frozen = descendants(server.pid)  # the connection's sshd processes, not the listener
        assert frozen
        try:
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            with anyio.fail_after(30):  # asyncssh gives up after 4 unanswered intervals
                await link.conn.wait_closed()
            assert host._conn.open_link() is None
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
