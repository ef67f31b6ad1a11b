"""The jump host's outer hop in a child process (asyncstage/_jumphop.py,
``SSHHost.hop_process = True``), on real sshd
processes on 127.0.0.x: one child per jump host carries every tunnel, it holds the
jump host's connection itself, it is reaped on close, on cancellation and when this
process is killed, and errors keep their types."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from asyncstage.errors import HostKeyMismatch, JumpHostError
from asyncstage.ssh import SSHHost
from tests.sshd import SSHServer, descendants
from tests.sshd import _alive as _running

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

MiB = 1 << 20
_ROOT = str(Path(__file__).resolve().parent.parent)  # where this asyncstage is


@pytest.fixture(scope="module")
def pair(sshd_factory: Callable[..., SSHServer]) -> tuple[SSHServer, SSHServer, SSHServer]:
    """A jump host and two targets."""
    return (
        sshd_factory(address="127.0.0.81"),
        sshd_factory(address="127.0.0.82"),
        sshd_factory(address="127.0.0.83"),
    )


def _hop_children(root: int | None = None) -> list[int]:
    """The hop processes under ``root`` (default: this process) that still run."""
    found = []
    for pid in descendants(os.getpid() if root is None else root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"asyncstage._hopchild" in cmdline and _running(pid):
            found.append(pid)
    return found


def _wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The pids still running after waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def _connection_owners(server: SSHServer) -> set[int]:
    """The pids holding a TCP connection to ``server``."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dst", f"{server.address}:{server.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


async def test_one_child_carries_every_tunnel_and_is_reaped_on_close(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, a, b = pair
    data = os.urandom(MiB) * 4
    (tmp_path / "data").write_bytes(data)
    async with jump.host() as j, a.host(jump=j) as ha, b.host(jump=j) as hb:
        j.hop_process = True
        assert (await ha.scmd("echo", "a")).strip() == "a"
        assert (await hb.scmd("echo", "b")).strip() == "b"
        children = _hop_children()
        assert len(children) == 1, children
        hop = children[0]
        # the child holds a connection to the jump host; the targets are reached
        # through it, not from here
        assert hop in _connection_owners(jump)
        assert os.getpid() not in _connection_owners(a) | _connection_owners(b)
        async with ha.scmd_read(f"cat {tmp_path / 'data'}", encoding=None) as r:
            got = b"".join([chunk async for chunk in r])
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        async with hb.scmd_write(f"cat > {tmp_path / 'back'}", encoding=None) as w:
            await w.write(data)
        assert (tmp_path / "back").read_bytes() == data
        assert _hop_children() == [hop]
    assert _wait_gone([hop], within=5) == []


async def test_the_in_process_tunnel_is_the_default(
    pair: tuple[SSHServer, SSHServer, SSHServer],
) -> None:
    jump, a, _ = pair
    async with jump.host() as j, a.host(jump=j) as ha:
        assert j.hop_process is False
        assert (await ha.scmd("echo", "inline")).strip() == "inline"
        assert _hop_children() == []
        assert os.getpid() in _connection_owners(jump)


_CONTROLLER = """
import anyio, os, sys
sys.path.insert(0, sys.argv[1])
from asyncstage.ssh import SSHHost

async def main() -> None:
    jump = SSHHost(sys.argv[2], port=int(sys.argv[3]), username="root",
                   client_keys=[sys.argv[4]], known_hosts=sys.argv[5])
    jump.hop_process = True
    target = SSHHost(sys.argv[6], port=int(sys.argv[7]), username="root",
                     client_keys=[sys.argv[4]], known_hosts=sys.argv[8], jump=jump)
    await target.scmd("true")
    print(jump._conn._hop.pid, flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


async def test_the_child_ends_when_its_parent_is_killed(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, a, _ = pair
    argv = [sys.executable, "-c", _CONTROLLER, _ROOT]
    argv += [jump.address, str(jump.port), str(jump.client_key), str(jump.known_hosts)]
    argv += [a.address, str(a.port), str(a.known_hosts)]
    async with await anyio.open_process(argv, stderr=subprocess.DEVNULL) as controller:
        assert controller.stdout is not None
        with anyio.fail_after(30):
            line = b""
            async for chunk in controller.stdout:
                line += chunk
                if line.endswith(b"\n"):
                    break
        hop = int(line)
        assert _running(hop) and hop in _hop_children(controller.pid)
        controller.send_signal(signal.SIGKILL)
        await controller.wait()
    assert _wait_gone([hop]) == []


async def test_a_cancelled_connection_leaves_no_child(
    pair: tuple[SSHServer, SSHServer, SSHServer],
) -> None:
    jump, a, _ = pair
    async with jump.host() as j, a.host(jump=j) as ha:
        j.hop_process = True
        await j.host_public_key()  # the jump host's connection is up: the child is next
        with anyio.move_on_after(0.05):
            await ha.scmd("true")
        await j.close()
        assert _wait_gone(_hop_children(), within=5) == []
        # and the next command starts a new one
        assert (await ha.scmd("echo", "again")).strip() == "again"


async def test_errors_through_the_child_keep_their_types(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, a, _ = pair
    # a jump host whose key is not the one pinned: refused, naming it; no child started
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{jump.address}]:{jump.port} {a.host_public_key}\n")
    bad = jump.host(known_hosts=wrong, host_key_policy="strict", label="bastion")
    bad.hop_process = True
    async with bad, a.host(jump=bad) as ha:
        with pytest.raises(JumpHostError, match="bastion") as caught:
            await ha.scmd("true")
        assert caught.value.jump == "bastion"
        assert isinstance(caught.value.__cause__, HostKeyMismatch)
        assert _hop_children() == []
    # the jump host refuses the tunnel (nothing listens there): its refusal, named
    async with jump.host(label="bastion") as j:
        j.hop_process = True
        gone = SSHHost(
            "127.0.0.84",
            port=a.port,
            username="root",
            client_keys=[a.client_key],
            known_hosts=a.known_hosts,
            jump=j,
        )
        with pytest.raises(JumpHostError, match="bastion could not open a tunnel") as refused:
            await gone.scmd("true")
        assert refused.value.jump == "bastion"
        assert len(_hop_children()) == 1  # the child stays for the next tunnel
        await gone.close()
