"""Through a jump host's connection in this process (``hop_process``, the default), the
tunnelled connection's packets travel in whole packets of the jump host's
``direct-tcpip`` channel (asyncstage/_sshwire.py), on real sshd
processes on 127.0.0.x: the data arrives intact and in order, and the channel carries
it in about as few packets as it fits in, not a full packet and smaller ones for each
packet of the inner connection."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asyncssh.channel import SSHTCPChannel

from tests.sshd import SSHServer

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
