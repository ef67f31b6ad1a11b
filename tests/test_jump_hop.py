"""The jump host's outer hop in child processes (asyncstage/_jumphop.py), on real sshd
processes on 127.0.0.x: OpenSSH's ``ssh -W`` children (``SSHHost.hop = "openssh"``, the
default where ``ssh`` is installed), one per tunnel, clients of one OpenSSH master per
jump host, and the Python child (``hop = "python"``, ``hop_process = True``), one per
jump host. The children (or the master) hold the jump host's connections, accept only
the host key this process verified,
are reaped on close, on cancellation and when this process is killed, and errors keep
their types."""

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

from asyncstage import _jumphop, _openssh_stream
from asyncstage.errors import ConnectError, HostKeyMismatch, InvalidArgument, JumpHostError
from asyncstage.remote import rsynchelper
from asyncstage.ssh import SSHHost, connection
from asyncstage.ssh.ciphers import encryption_algs
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


def _ssh_hops(root: int | None = None) -> list[int]:
    """The OpenSSH hop's ``ssh -W`` children under ``root`` (default: this process)."""
    found = []
    for pid in descendants(os.getpid() if root is None else root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"ssh") and b"-W" in argv and _running(pid):
            found.append(pid)
    return found


async def _streams_intact(ha: SSHHost, hb: SSHHost, tmp_path: Path) -> None:
    """4 MiB read from ``ha`` and written to ``hb`` arrive intact."""
    data = os.urandom(MiB) * 4
    (tmp_path / "data").write_bytes(data)
    async with ha.scmd_read(f"cat {tmp_path / 'data'}", encoding=None) as r:
        got = b"".join([chunk async for chunk in r])
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    async with hb.scmd_write(f"cat > {tmp_path / 'back'}", encoding=None) as w:
        await w.write(data)
    assert (tmp_path / "back").read_bytes() == data


def _ssh_hops_of(hop: _jumphop.OpenSSHHop, target: SSHServer) -> list[int]:
    """The hop's children that carry a tunnel to ``target`` (by their ``-W``)."""
    found = []
    for pid in hop.pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[argv.index(b"-W") + 1] == f"{target.address}:{target.port}".encode():
            found.append(pid)
    return found


def _exists(path: str | Path) -> bool:
    return os.path.exists(path)


_CHILDREN = {"python": _hop_children, "openssh": _ssh_hops}


def _wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The pids still running after waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def _argv(pid: int) -> list[str]:
    """Process ``pid``'s command line."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _connections(server: SSHServer) -> str:
    """``ss``'s lines for the TCP connections to ``server``, with their processes."""
    return subprocess.run(
        ["ss", "-Htnp", "state", "established", "dst", f"{server.address}:{server.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _connection_owners(server: SSHServer) -> set[int]:
    """The pids holding a TCP connection to ``server``."""
    return {int(p) for p in re.findall(r"pid=(\d+)", _connections(server))}


def _local_ports(server: SSHServer, pid: int) -> set[int]:
    """The local ports of ``pid``'s TCP connections to ``server``."""
    out = _connections(server)
    return {
        int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line
    }


async def test_one_child_carries_every_tunnel_and_is_reaped_on_close(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, a, b = pair
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
        await _streams_intact(ha, hb, tmp_path)
        assert _hop_children() == [hop]
    assert _wait_gone([hop], within=5) == []


async def test_the_openssh_hop_carries_each_tunnel_over_one_master(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, a, b = pair
    async with jump.host() as j, a.host(jump=j) as ha, b.host(jump=j) as hb:
        j.hop = "openssh"
        assert (await ha.scmd("echo", "a")).strip() == "a"
        assert (await hb.scmd("echo", "b")).strip() == "b"
        children = _ssh_hops()
        assert len(children) == 2, children
        hop = j._conn.hops.hop
        assert isinstance(hop, _jumphop.OpenSSHHop) and hop._dir is not None
        master = hop.master_pid
        assert master is not None and master not in children
        # one login to the jump host, the master's: the tunnels' ssh are its mux
        # clients, and the targets are reached through it, not from here
        assert master in _connection_owners(jump)
        assert not set(children) & _connection_owners(jump)
        assert os.getpid() not in _connection_owners(a) | _connection_owners(b)
        control = hop._master._path()
        for pid in children:
            argv = _argv(pid)
            assert f"ControlPath={control}" in argv and "ControlMaster=no" in argv
        # the master trusts exactly the key this process verified, and nothing else
        directory = Path(hop._dir)
        known = (directory / "known_hosts").read_text()
        assert known == f"asyncstage-jump-host {jump.host_public_key}\n"
        master_argv = _argv(master)
        assert master_argv[master_argv.index("-F") + 1] == "/dev/null"
        for option in (
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ForwardAgent=no",
            "ClearAllForwardings=yes",
            "ControlMaster=yes",
            "HostKeyAlias=asyncstage-jump-host",
            f"UserKnownHostsFile={directory / 'known_hosts'}",
        ):
            assert option in master_argv, option
        assert master_argv[master_argv.index("-i") + 1] == str(jump.client_key)
        # this process asks the master's socket to the jump host to acknowledge at once
        gathered = ha._conn.open_link().conn._transport  # type: ignore[union-attr]
        wire = gathered._chan.get_protocol()
        assert isinstance(wire, _jumphop._AcknowledgingWire)
        assert wire._jump.getsockname()[1] in _local_ports(jump, master)
        await _streams_intact(ha, hb, tmp_path)
        assert sorted(_ssh_hops()) == sorted(children)
        # a tunnel's ssh ends with its connection; the others carry on
        ours = [p for p in children if p not in _ssh_hops_of(hop, b)]
        await ha.close()
        assert _wait_gone(ours, within=5) == []
        assert (await hb.scmd("echo", "b")).strip() == "b"
        with anyio.fail_after(10):  # an exit reaches the hop through asyncio's child watcher
            while set(hop.pids) & set(ours):  # noqa: ASYNC110 (a child's exit, not ours)
                await anyio.sleep(0.05)
        assert hop.pids == _ssh_hops()
        assert hop.master_pid == master
        control_dir = Path(control).parent
    assert _wait_gone([*children, master], within=5) == []
    assert not _exists(directory) and not _exists(control_dir)


async def test_many_tunnels_at_once_are_one_login_to_the_jump_host(
    pair: tuple[SSHServer, SSHServer, SSHServer],
) -> None:
    """More connections at once than sshd lets log in at once (``MaxStartups``, 10): each
    is a client of the one master, so the jump host sees one connection of the hop's. They
    go to two servers, six each: one server's sshd would drop some of twelve at random."""
    jump, a, b = pair
    async with jump.host() as j:
        j.hop = "openssh"
        hosts = [server.host(jump=j) for server in (a, b) for _ in range(6)]
        try:
            said: list[str] = []

            async def run(h: SSHHost) -> None:
                said.append((await h.scmd("echo", "up")).strip())

            async with anyio.create_task_group() as tg:
                for h in hosts:
                    tg.start_soon(run, h)
            assert said == ["up"] * len(hosts)
            hop = j._conn.hops.hop
            assert isinstance(hop, _jumphop.OpenSSHHop) and hop.master_pid is not None
            assert len(_ssh_hops()) == len(hosts)
            assert _connection_owners(jump) == {os.getpid(), hop.master_pid}
        finally:
            for h in hosts:
                await h.close()
    assert _wait_gone(_ssh_hops(), within=5) == []


async def test_a_jump_host_that_runs_no_session_for_us_still_carries_tunnels(
    pair: tuple[SSHServer, SSHServer, SSHServer], sshd_factory: Callable[..., SSHServer]
) -> None:
    """A bastion whose sshd forces a command that exits at once ends the master's session,
    and with it the master: the tunnels then log in with an ``ssh -W`` each."""
    _, a, _ = pair
    jump = sshd_factory(address="127.0.0.85", extra_config="ForceCommand /bin/false\n")
    async with jump.host() as j:
        j.hop = "openssh"
        hosts = [a.host(jump=j) for _ in range(3)]
        try:
            for h in hosts:
                assert (await h.scmd("echo", "up")).strip() == "up"
            hop = j._conn.hops.hop
            assert isinstance(hop, _jumphop.OpenSSHHop)
            assert len(_ssh_hops()) == len(hosts)
        finally:
            for h in hosts:
                await h.close()
    assert _wait_gone(_ssh_hops(), within=5) == []
    assert _connection_owners(jump) == set()


_KEX_LINE = re.compile(r"kex: (?:client->server|server->client) cipher: (\S+) .*compression: (\S+)")


async def test_both_layers_use_the_cheapest_cipher_and_no_compression(
    pair: tuple[SSHServer, SSHServer, SSHServer],
) -> None:
    """Through OpenSSH's hop every byte is encrypted twice: both layers, and a direct
    connection alike, use the first of :func:`encryption_algs` (AES-128-GCM on a CPU with
    AES instructions, the cheapest per byte in OpenSSH and asyncssh alike) and no
    compression. The master's side is what the jump host's sshd negotiates with an
    ``ssh`` given the master's options (``-v`` shows the choice)."""
    jump, a, _ = pair
    wanted = encryption_algs()[0]
    if rsynchelper.has_aes():
        assert wanted == "aes128-gcm@openssh.com"
    async with jump.host() as j, a.host(jump=j) as ha, a.host() as direct:
        j.hop = "openssh"
        assert (await ha.scmd("echo", "up")).strip() == "up"
        assert (await direct.scmd("echo", "up")).strip() == "up"
        hop = j._conn.hops.hop
        assert isinstance(hop, _jumphop.OpenSSHHop)
        assert "Compression=no" in hop.argv
        said = await anyio.run_process(
            [*hop.argv, "-v", "--", jump.address, "true"], stdin=subprocess.DEVNULL
        )
        chosen = _KEX_LINE.findall(said.stderr.decode())
        assert chosen == [(wanted, "none")] * 2, said.stderr.decode()
        for host in (ha, direct):
            link = host._conn.open_link()
            assert link is not None
            for key in ("send_cipher", "recv_cipher"):
                assert str(link.conn.get_extra_info(key)) == wanted
            for key in ("send_compression", "recv_compression"):
                assert str(link.conn.get_extra_info(key)) == "none"


async def test_sessions_through_a_jump_host_advertise_a_larger_window(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path
) -> None:
    """A session channel through a jump host lets the server send ``JUMP_WINDOW`` ahead
    (its window adjustments cross the hop and the jump host's sshd); a direct one keeps
    asyncssh's own. A stream through it arrives intact."""
    jump, a, b = pair
    async with jump.host() as j, a.host(jump=j) as ha, b.host(jump=j) as hb, a.host() as direct:
        j.hop = "openssh"
        for host, window in ((ha, connection.JUMP_WINDOW), (direct, 2 << 20)):
            async with host._conn.process("true", None) as run:
                assert run.proc.channel.get_recv_window() == window
        await _streams_intact(ha, hb, tmp_path)


async def test_the_in_process_tunnel(pair: tuple[SSHServer, SSHServer, SSHServer]) -> None:
    jump, a, _ = pair
    async with jump.host() as j, a.host(jump=j) as ha:
        j.hop = "in-process"
        assert j.hop_process is False
        assert (await ha.scmd("echo", "inline")).strip() == "inline"
        assert _hop_children() == [] and _ssh_hops() == []
        assert os.getpid() in _connection_owners(jump)


async def test_how_a_hop_is_chosen(
    pair: tuple[SSHServer, SSHServer, SSHServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    jump, a, _ = pair
    j = jump.host()
    assert j.hop == "auto" and j.hop_process is False
    assert j._conn.hops.mode() == "openssh"  # ssh is installed here
    j.hop_process = True  # the old switch keeps its meaning: the Python child
    assert j.hop == "python" and j._conn.hops.mode() == "python"
    j.hop_process = False
    assert j.hop == "in-process" and j._conn.hops.mode() == "in-process"
    with pytest.raises(InvalidArgument):
        j.hop = "ssh"  # type: ignore[assignment]
    j.hop = "auto"
    assert jump.host(client_keys=[])._conn.hops.mode() == "in-process"  # no key file of ours
    # a jump host reached through another one carries its tunnels itself
    assert a.host(jump=j)._conn.hops.mode() == "in-process"
    # where the kernel refuses this process its children's sockets, the hop's commands
    # would wait for delayed acknowledgements: the default stays in this process
    monkeypatch.setattr(_jumphop, "_acknowledging", False)
    assert j._conn.hops.mode() == "in-process"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_jumphop, "_acknowledging", True)
    assert j._conn.hops.mode() == "in-process"  # no ssh on PATH


_CONTROLLER = """
import anyio, os, sys
sys.path.insert(0, sys.argv[1])
from asyncstage.ssh import SSHHost

async def main() -> None:
    jump = SSHHost(sys.argv[2], port=int(sys.argv[3]), username="root",
                   client_keys=[sys.argv[4]], known_hosts=sys.argv[5])
    jump.hop = sys.argv[9]
    target = SSHHost(sys.argv[6], port=int(sys.argv[7]), username="root",
                     client_keys=[sys.argv[4]], known_hosts=sys.argv[8], jump=jump)
    await target.scmd("true")
    hop = jump._conn.hops.hop
    pids = hop.pids if hasattr(hop, "pids") else [hop.pid]
    master = getattr(hop, "_master", None)
    shared = [master._dir, master.pid] if master is not None else ["-", "-"]
    print(getattr(hop, "_dir", None) or "-", *shared, *pids, flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


@pytest.mark.parametrize("mode", ["python", "openssh"])
async def test_the_child_ends_when_its_parent_is_killed(
    pair: tuple[SSHServer, SSHServer, SSHServer], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jump, a, _ = pair
    argv = [sys.executable, "-c", _CONTROLLER, _ROOT]
    argv += [jump.address, str(jump.port), str(jump.client_key), str(jump.known_hosts)]
    argv += [a.address, str(a.port), str(a.known_hosts), mode]
    async with await anyio.open_process(argv, stderr=subprocess.DEVNULL) as controller:
        assert controller.stdout is not None
        with anyio.fail_after(30):
            line = b""
            async for chunk in controller.stdout:
                line += chunk
                if line.endswith(b"\n"):
                    break
        directory, master_dir, master, *pids = line.decode().split()
        hops = [int(p) for p in pids]
        assert len(hops) == 1
        assert all(_running(p) for p in hops)
        assert set(hops) <= set(_CHILDREN[mode](controller.pid))
        if mode == "openssh":  # the tunnel's ssh -W is a client of the hop's master
            hops.append(int(master))
            assert _running(hops[-1]) and hops[-1] in descendants(controller.pid)
        controller.send_signal(signal.SIGKILL)
        await controller.wait()
    assert _wait_gone(hops) == []
    if mode == "openssh":
        # the directories of a controller that died are swept by the next one
        monkeypatch.setattr(_openssh_stream, "_swept", False)
        swept = _openssh_stream.sweep_dead_masters()
        assert directory in swept and master_dir in swept
        assert not _exists(directory) and not _exists(master_dir)


@pytest.mark.parametrize("mode", ["python", "openssh"])
async def test_a_cancelled_connection_leaves_no_child(
    pair: tuple[SSHServer, SSHServer, SSHServer], mode: str
) -> None:
    jump, a, _ = pair
    async with jump.host() as j, a.host(jump=j) as ha:
        j.hop = mode  # type: ignore[assignment]
        await j.host_public_key()  # the jump host's connection is up: the child is next
        with anyio.move_on_after(0.05):
            await ha.scmd("true")
        await j.close()
        assert _wait_gone(_CHILDREN[mode](), within=5) == []
        # and the next command starts a new one
        assert (await ha.scmd("echo", "again")).strip() == "again"
    assert _wait_gone(_CHILDREN[mode](), within=5) == []


@pytest.mark.parametrize("mode", ["python", "openssh"])
async def test_errors_through_the_child_keep_their_types(
    pair: tuple[SSHServer, SSHServer, SSHServer], tmp_path: Path, mode: str
) -> None:
    jump, a, _ = pair
    # a jump host whose key is not the one pinned: refused, naming it; no child started
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{jump.address}]:{jump.port} {a.host_public_key}\n")
    bad = jump.host(known_hosts=wrong, host_key_policy="strict", label="bastion")
    bad.hop = mode  # type: ignore[assignment]
    async with bad, a.host(jump=bad) as ha:
        with pytest.raises(JumpHostError, match="bastion") as caught:
            await ha.scmd("true")
        assert caught.value.jump == "bastion"
        assert isinstance(caught.value.__cause__, HostKeyMismatch)
        assert _CHILDREN[mode]() == []
    # the child is shown another key than the one this process verified: refused too
    async with jump.host(label="bastion") as j, a.host(jump=j) as ha:
        j.hop = mode  # type: ignore[assignment]
        link = await j._conn.link()
        link.host_key = a.host_public_key
        with pytest.raises(JumpHostError, match="bastion") as caught:
            await ha.scmd("true")
        assert isinstance(caught.value.__cause__, HostKeyMismatch)
        assert _wait_gone(_CHILDREN[mode](), within=5) == []
    # the jump host answers but cannot reach the target (nothing listens there): its
    # refusal, named
    async with jump.host(label="bastion") as j:
        j.hop = mode  # type: ignore[assignment]
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
        if mode == "python":
            assert len(_hop_children()) == 1  # the child stays for the next tunnel
        else:
            assert _wait_gone(_ssh_hops(), within=5) == []  # the tunnel's ssh ended
        await gone.close()


async def test_a_jump_host_refusing_the_hop_s_login_is_a_typed_error(
    pair: tuple[SSHServer, SSHServer, SSHServer],
) -> None:
    """The jump host accepted this process's login, then refuses the hop's ``ssh``."""
    jump, a, _ = pair
    authorized = jump.dir / "authorized_keys"
    keys = authorized.read_text()
    async with jump.host(label="bastion") as j, a.host(jump=j) as ha:
        await j.host_public_key()
        authorized.write_text("")
        try:
            with pytest.raises(JumpHostError, match="bastion") as caught:
                await ha.scmd("true")
        finally:
            authorized.write_text(keys)
        assert isinstance(caught.value.__cause__, ConnectError)
        assert "Permission denied" in str(caught.value)
        assert _wait_gone(_ssh_hops(), within=5) == []
