"""Streams between local files and remote commands, and the TCP shaping under them.

The file forms (``scmd_to_file`` / ``scmd_from_file``) run against real OpenSSH sshd
processes (tests/sshd.py); the TCP shaping of asyncstage/_sshwire.py against a real
loopback socket. No mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import anyio
import pytest

from asyncstage import _openssh_stream, errors
from asyncstage._sshwire import _FEED_BYTES, DIRECT
from asyncstage.ssh import SSHHost, quote
from asyncstage.ssh.openssh import umask as _umask
from tests.sshd import SSHServer, descendants

pytestmark = pytest.mark.anyio


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def _running(host: SSHHost, needle: str) -> list[str]:
    """Processes on the host whose command line starts with ``needle``."""
    out = await host.scmd("ps -eo pid=,args=")
    return [line for line in out.splitlines() if line.split(None, 1)[-1].startswith(needle)]


def _our_ssh_children() -> list[int]:
    """The ``ssh`` processes below this test process that still exist (zombies too)."""
    found = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh":
                found.append(pid)
    return found


async def _remote_sha256(host: SSHHost, path: Path) -> str:
    return (await host.scmd("sha256sum", str(path))).split()[0]


# -- file to command, command to file (real sshd) ------------------------------------------


async def test_file_round_trip_arrives_intact(sshd_server: SSHServer, tmp_path: Path) -> None:
    size = (5 << 20) + 12345  # not a multiple of any packet or read size
    local = tmp_path / "local.bin"
    digest = _random_file(local, size)
    remote = tmp_path / "remote dir" / "copy.bin"  # a space: the argv is quoted
    back = tmp_path / "back.bin"
    async with sshd_server.host() as host:
        await host.scmd("mkdir", "-p", str(remote.parent))
        assert await host.scmd_from_file("cp", "/dev/stdin", str(remote), path=local) == size
        assert await _remote_sha256(host, remote) == digest
        assert await host.scmd_to_file("cat", str(remote), path=back) == size
        # sudo: the whole shell line runs as root, through the OpenSSH child too
        sudo_copy = tmp_path / "remote dir" / "sudo.bin"
        line = f"cat > {quote(sudo_copy)}; id -u >&2"
        assert await host.scmd_from_file(line, path=local, sudo=True) == size
        assert await _remote_sha256(host, sudo_copy) == digest
        uid = tmp_path / "uid"
        assert await host.scmd_to_file("id -u", path=uid, sudo=True) == 2
        assert uid.read_text() == "0\n"
        uid.unlink()
    assert _sha256(back) == digest
    assert back.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["back.bin", "local.bin", "remote dir"]


async def test_empty_file_and_empty_output(sshd_server: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    async with sshd_server.host() as host:
        assert await host.scmd_from_file("wc -c", path=empty) == 0
        assert await host.scmd_to_file("true", path=out) == 0
    assert out.read_bytes() == b""


async def test_to_file_failure_leaves_the_file_as_it_was(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    target = tmp_path / "kept"
    target.write_bytes(b"the old contents\n")
    async with sshd_server.host() as host:
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_to_file("echo partial; echo bad >&2; exit 3", path=target)
    assert failed.value.exit_status == 3
    assert "bad" in failed.value.stderr
    assert target.read_bytes() == b"the old contents\n"
    assert os.listdir(tmp_path) == ["kept"]  # no temporary file left


async def test_bad_local_paths_are_path_errors(sshd_server: SSHServer, tmp_path: Path) -> None:
    async with sshd_server.host() as host:
        with pytest.raises(errors.PathError, match="cannot read"):
            await host.scmd_from_file("cat > /dev/null", path=tmp_path / "missing")
        with pytest.raises(errors.PathError, match="Is a directory"):
            await host.scmd_from_file("cat > /dev/null", path=tmp_path)
        with pytest.raises(errors.PathError, match="not a regular file"):
            await host.scmd_from_file("cat > /dev/null", path="/dev/null")
        with pytest.raises(errors.PathError, match="cannot write"):
            await host.scmd_to_file("echo x", path=tmp_path / "no such dir" / "x")
        with pytest.raises(errors.PathError, match="is a directory"):
            await host.scmd_to_file("echo x", path=tmp_path)
        assert await host.scmd("echo", "still fine") == "still fine\n"


async def test_from_file_command_failure_is_typed(sshd_server: SSHServer, tmp_path: Path) -> None:
    small, local = tmp_path / "small", tmp_path / "in"
    _random_file(small, 1 << 20)  # under _OPENSSH_FROM_FILE_MIN: over asyncssh
    _random_file(local, 3 << 20)  # an OpenSSH child
    async with sshd_server.host() as host:
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_from_file("cat >/dev/null; echo nope >&2; exit 5", path=small)
        assert (failed.value.exit_status, failed.value.stderr) == (5, "nope\n")
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_from_file("cat >/dev/null; echo nope >&2; exit 5", path=local)
        assert failed.value.exit_status == 5
        assert "nope" in failed.value.stderr
        # The command stops reading early and exits 0: said so, as scmd_write does.
        big = tmp_path / "big"
        _random_file(big, 16 << 20)
        with pytest.raises(errors.SSHError, match="before reading all its input"):
            await host.scmd_from_file("head -c 1 >/dev/null", path=big)
        assert await host.scmd("echo", "still fine") == "still fine\n"


async def test_cancelling_leaves_no_remote_process_and_no_file(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    local = tmp_path / "in"
    _random_file(local, 3 << 20)  # over _OPENSSH_FROM_FILE_MIN: an OpenSSH child
    target = tmp_path / "endless"
    async with sshd_server.host() as host:
        tag = f"{time.time_ns() % 10**9}.25"
        with anyio.move_on_after(1.0) as scope:
            await host.scmd_to_file(f"sleep {tag} & yes", path=target)
        assert scope.cancelled_caught
        assert await _running(host, f"sleep {tag}") == []
        assert os.listdir(tmp_path) == ["in"]

        tag2 = f"{time.time_ns() % 10**9}.5"
        with anyio.move_on_after(1.0) as scope:
            await host.scmd_from_file(f"sleep {tag2}; cat > /dev/null", path=local)
        assert scope.cancelled_caught
        assert await _running(host, f"sleep {tag2}") == []
        assert await host.scmd("echo", "still fine") == "still fine\n"
        assert len(_our_ssh_children()) <= 1  # the ssh children reaped; the master may stay
    assert _our_ssh_children() == []


async def test_file_forms_without_openssh_use_asyncssh(
    sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no ssh on PATH: the asyncssh path
    assert _openssh_stream.openssh() is None
    local = tmp_path / "local.bin"
    digest = _random_file(local, (3 << 20) + 7)
    back = tmp_path / "back.bin"
    kept = tmp_path / "kept"
    kept.write_bytes(b"old\n")
    async with sshd_server.host() as host:
        remote = tmp_path / "remote.bin"
        assert await host.scmd_from_file(f"cat > {quote(remote)}", path=local) == (3 << 20) + 7
        assert await host.scmd_to_file("cat", str(remote), path=back) == (3 << 20) + 7
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_to_file("echo x; echo bad >&2; exit 4", path=kept)
        assert (failed.value.exit_status, failed.value.stderr) == (4, "bad\n")
        with pytest.raises(errors.SSHError, match="before reading all its input"):
            await host.scmd_from_file("head -c 1 >/dev/null", path=local)
        assert host._files.master is None  # no OpenSSH master either
    assert _sha256(back) == digest
    assert kept.read_bytes() == b"old\n"
    assert sorted(os.listdir(tmp_path)) == ["back.bin", "kept", "local.bin", "remote.bin"]


async def test_exit_255_is_the_command_and_ssh_failure_is_ssh_error(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    target = tmp_path / "kept"
    target.write_bytes(b"old\n")
    big = tmp_path / "big"
    _random_file(big, 3 << 20)  # over _OPENSSH_FROM_FILE_MIN: an OpenSSH child
    async with sshd_server.host() as host:
        # ssh exits 255 for its own failures too: the command's 255 is still the command's.
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_to_file("echo gone >&2; exit 255", path=target)
        assert (failed.value.exit_status, failed.value.stderr) == (255, "gone\n")
        assert "asyncstage" not in failed.value.stderr  # our status and pgid lines are out
        # A background process writing after the command ended: its stderr is kept.
        with pytest.raises(errors.CommandFailed) as failed:
            await host.scmd_to_file("(sleep 0.2; echo late >&2) & exit 3", path=target)
        assert (failed.value.exit_status, failed.value.stderr) == (3, "late\n")
        # ssh itself fails: the pinned key is gone from known_hosts (asyncssh's connection,
        # already verified, goes on; ssh checks the file strictly).
        await host.close()
        await host.host_public_key()
        known_hosts = anyio.Path(host.known_hosts.path)
        pinned = await known_hosts.read_text()
        await known_hosts.write_text("")
        try:
            with pytest.raises(errors.SSHError, match="Host key verification failed") as err:
                await host.scmd_to_file("echo x", path=target)
            assert not isinstance(err.value, errors.CommandFailed)
            with pytest.raises(errors.SSHError, match="Host key verification failed"):
                await host.scmd_from_file("cat >/dev/null", path=big)
        finally:
            await known_hosts.write_text(pinned)
        assert await host.scmd_to_file("echo", "back", path=tmp_path / "x") == 5
    assert target.read_bytes() == b"old\n"
    assert sorted(os.listdir(tmp_path)) == ["big", "kept", "x"]
    assert _our_ssh_children() == []


async def test_file_streams_share_one_openssh_master(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    local = tmp_path / "in"
    digest = _random_file(local, 3 << 20)
    async with sshd_server.host() as host:
        # More streams at once than sshd's sessions per connection (10): they wait their turn.
        async with anyio.create_task_group() as tg:
            for i in range(14):
                tg.start_soon(
                    lambda i=i: host.scmd_to_file("sha256sum", "-", path=tmp_path / f"o{i}")
                )
        assert (
            host._files.master is not None
            and await host.host_public_key() in host._files.master.key
        )
        assert len(_our_ssh_children()) == 1  # the master, nothing else left running
        sums = tmp_path / "sums"
        assert await host.scmd_from_file(f"sha256sum > {quote(sums)}", path=local) == 3 << 20
    assert _our_ssh_children() == []  # close() stopped and reaped the master
    for i in range(14):
        assert (tmp_path / f"o{i}").read_text().startswith(hashlib.sha256(b"").hexdigest())
    assert sums.read_text().split()[0] == digest


_CRASHING_CONTROLLER = """
import os, signal, sys
import anyio
from asyncstage.ssh import SSHHost

async def main() -> None:
    address, port, user, known_hosts, key, out = sys.argv[1:]
    options = {"known_hosts": known_hosts, "client_keys": [key]}
    host = SSHHost(address, port=int(port), username=user, **options)
    await host.scmd_to_file("echo up", path=out)
    print(host._files.master._dir, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no close(), no finally

anyio.run(main)
"""


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


async def test_a_crashed_controllers_master_is_gone_and_its_dir_swept(
    sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temporary directory of this test's own: the other test processes running beside it
    # sweep the machine's one at their first master, and would take the crashed one first.
    private = tempfile.mkdtemp(prefix="as-sweep-")  # short: the master's socket lives in it
    monkeypatch.setattr(tempfile, "tempdir", private)
    try:
        await _crash_and_sweep(sshd_server, tmp_path, private, monkeypatch)
    finally:
        shutil.rmtree(private, ignore_errors=True)


async def _crash_and_sweep(
    sshd_server: SSHServer, tmp_path: Path, private: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [sys.executable, "-c", _CRASHING_CONTROLLER, sshd_server.address]
    argv += [str(sshd_server.port), sshd_server.username, str(sshd_server.known_hosts)]
    argv += [str(sshd_server.client_key), str(tmp_path / "out")]
    env = {**os.environ, "TMPDIR": private}
    crashed = await anyio.run_process(argv, check=False, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    left = crashed.stdout.decode().strip()
    assert (tmp_path / "out").read_text() == "up\n" and _is_dir(left)
    with anyio.fail_after(10):  # its master read the dead controller's pipe: it ends too
        while _processes_mentioning(left):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    monkeypatch.setattr(_openssh_stream, "_swept", True)  # the sweep below is the first
    async with sshd_server.host() as host:  # a live controller's master: kept
        await host.scmd_to_file("true", path=tmp_path / "mine")
        assert host._files.master is not None and host._files.master._dir is not None
        monkeypatch.setattr(_openssh_stream, "_swept", False)
        assert left in _openssh_stream.sweep_dead_masters()
        assert not _is_dir(left) and _is_dir(host._files.master._dir)
        assert _openssh_stream.sweep_dead_masters() == []  # once per process


# -- the TCP shaping under asyncssh (a real loopback socket) --------------------------------


class _Recorder(asyncio.Protocol):
    """asyncssh's side of the wire, reduced to what it sees: the feeds and the transport."""

    def __init__(self, expect: int) -> None:
        self.feeds: list[bytes] = []
        self.expect = expect
        self.all_in = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.feeds.append(bytes(data))
        if sum(len(f) for f in self.feeds) >= self.expect:
            self.all_in.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


class _Peer(asyncio.Protocol):
    """The other end: counts how many reads the data took, echoes a blob on request."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.received = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.blob)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool | None:
        self.done.set_result(bytes(self.received))
        return None


async def test_wire_feeds_packet_sized_pieces() -> None:
    blob = os.urandom(3 << 20)
    loop = asyncio.get_running_loop()
    peers: list[_Peer] = []
    server = await loop.create_server(
        lambda: peers.append(_Peer(blob)) or peers[-1], "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, recorder = await DIRECT.create_connection(
            lambda: _Recorder(len(blob)), "127.0.0.1", port
        )
        assert isinstance(recorder, _Recorder)
        await asyncio.wait_for(recorder.all_in.wait(), 10)
        assert b"".join(recorder.feeds) == blob
        assert max(len(f) for f in recorder.feeds) <= _FEED_BYTES

        # Writes go out as they came, in order, before the EOF that follows them.
        transport = recorder.transport
        assert transport is not None
        pieces = [os.urandom(n) for n in range(1, 2000, 7)] * 20
        for piece in pieces:
            transport.write(piece)
        transport.write_eof()
        assert await asyncio.wait_for(peers[0].done, 10) == b"".join(pieces)
        transport.close()
        await asyncio.wait_for(recorder.lost, 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_remote_quoting_with_file_forms(sshd_server: SSHServer, tmp_path: Path) -> None:
    local = tmp_path / "in"
    digest = _random_file(local, 70000)
    odd = tmp_path / "it's $HOME"
    async with sshd_server.host() as host:
        await host.scmd_from_file(f"cat > {quote(odd)}", path=local)
        assert await _remote_sha256(host, odd) == digest
