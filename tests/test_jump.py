"""Hosts reached through a jump host (bastion), on real sshd processes on 127.0.0.x.

Every sshd of these tests shares this machine's network, so the address a target
sees is no proof of the path. Each target's sshd runs every session through a
``ForceCommand`` that records, while the session's connection is up, which process
holds the client end of that connection (``ss -p`` on the port ``$SSH_CONNECTION``
names). Through a jump host that is the jump host's sshd (its ``direct-tcpip``
channel); a direct connection would be this process or an ``ssh`` child of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from asyncstage.errors import CommandFailed, InvalidArgument, JumpHostError
from asyncstage.paths import HostEndpoint, LocalEndpoint
from asyncstage.ssh import SSHHost
from asyncstage.transfer import dd_endpoints, rsync_endpoints
from tests.sshd import SSHServer
from tests.test_transfer_hosts import Loop

pytestmark = pytest.mark.anyio

MiB = 1 << 20

_OWNER = re.compile(r"^owner:([ 0-9]*)$", re.MULTILINE)


def _recording_config(directory: Path) -> str:
    """sshd options that record the owner of each session's client socket in
    ``directory/owners`` (one ``ss`` line per session) and then run the command."""
    script = directory / "record-owner"
    script.write_text(
        "#!/bin/sh\n"
        "set -- $SSH_CONNECTION\n"
        'line=$(ss -Htnp state established "( sport = :$2 and dport = :$4 )")\n'
        "pid=$(echo \"$line\" | sed -n 's/.*pid=\\([0-9]*\\).*/\\1/p' | head -n 1)\n"
        'chain=""\n'
        'while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do\n'
        '  chain="$chain $pid"\n'
        "  pid=$(awk '/^PPid:/ {print $2}' /proc/$pid/status)\n"
        "done\n"
        f'echo "owner:$chain" >> {directory}/owners\n'
        'exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    script.chmod(0o755)
    return f"ForceCommand {script}\n"


@dataclass
class Net:
    jump: SSHServer
    a: SSHServer
    b: SSHServer
    records: dict[str, Path]  # target address -> the dir of its owners file

    def owners(self, target: SSHServer) -> list[list[int]]:
        """Per session ``target`` served: the process that held the client end of its
        connection, and that process's parents (as they were during the session)."""
        path = self.records[target.address] / "owners"
        text = path.read_text() if path.exists() else ""
        return [[int(p) for p in chain.split()] for chain in _OWNER.findall(text)]

    def forget_owners(self) -> None:
        for directory in self.records.values():
            (directory / "owners").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def net(sshd_factory: Callable[..., SSHServer], tmp_path_factory: pytest.TempPathFactory) -> Net:
    jump = sshd_factory(address="127.0.0.61")
    targets, records = [], {}
    for address in ("127.0.0.62", "127.0.0.63"):
        records[address] = conf = tmp_path_factory.mktemp("jump-target")
        targets.append(sshd_factory(address=address, extra_config=_recording_config(conf)))
    return Net(jump, targets[0], targets[1], records)


@pytest.fixture(autouse=True)
def fresh_owners(net: Net) -> Iterator[None]:
    net.forget_owners()
    yield
    net.forget_owners()


@asynccontextmanager
async def behind(net: Net, jump: SSHHost | None = None) -> AsyncIterator[tuple[SSHHost, SSHHost]]:
    """The two targets as hosts reached through the jump host."""
    async with net.jump.host() as j:
        via = jump or j
        async with net.a.host(jump=via) as ha, net.b.host(jump=via) as hb:
            yield ha, hb


def under(chain: list[int], server: SSHServer) -> bool:
    return server.pid in chain


def assert_through_jump(
    net: Net, *targets: SSHServer, direct_from: SSHServer | None = None
) -> None:
    """Every session the targets served came through the jump host's sshd (or, with
    ``direct_from``, straight from that host: a host -> host link)."""
    for target in targets:
        owners = net.owners(target)
        assert owners, f"{target} served no session"
        via_jump = [p for p in owners if under(p, net.jump)]
        assert via_jump, owners
        others = [p for p in owners if p not in via_jump]
        assert all(direct_from is not None and under(p, direct_from) for p in others), others


async def test_commands_and_streams_go_through_the_jump_host(net: Net, tmp_path: Path) -> None:
    async with behind(net) as (ha, _):
        assert (await ha.scmd("echo", "hi")).strip() == "hi"
        with pytest.raises(CommandFailed):
            await ha.scmd("exit 3")
        async with ha.scmd_read("seq 1 3") as out:
            assert [line.strip() async for line in out] == ["1", "2", "3"]
        async with ha.scmd_write(f"cat > {tmp_path / 'written'}") as w:
            await w.write("through the bastion\n")
        assert (tmp_path / "written").read_text() == "through the bastion\n"
        # OpenSSH children (a command's stdout to a file) take the jump host too
        big = tmp_path / "big"
        assert await ha.scmd_to_file("head -c 3000000 /dev/zero", path=big) == 3_000_000
        assert await ha.scmd_from_file(f"cat > {tmp_path / 'back'}", path=big) == 3_000_000
        assert (tmp_path / "back").stat().st_size == 3_000_000
    assert_through_jump(net, net.a)


async def test_rsync_through_the_jump_host(net: Net, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data").write_bytes(os.urandom(200_000))
    (src / "name with space").write_text("x")
    async with behind(net) as (ha, hb):
        up = await rsync_endpoints([LocalEndpoint(f"{src}/")], HostEndpoint(ha, f"{tmp_path}/up"))
        assert up.route == "local->host"
        down = await rsync_endpoints(
            [HostEndpoint(ha, f"{tmp_path}/up/")], LocalEndpoint(f"{tmp_path}/down")
        )
        assert down.route == "host->local"
        # host -> host: the source connects to the destination itself (a link in the VPC)
        across = await rsync_endpoints(
            [HostEndpoint(ha, f"{tmp_path}/up/")],
            HostEndpoint(hb, f"{tmp_path}/across"),
            authorized_keys=str(net.b.dir / "authorized_keys"),
        )
        assert across.route == "host->host"
    for copy in ("up", "down", "across"):
        assert (tmp_path / copy / "sub" / "data").read_bytes() == (
            src / "sub" / "data"
        ).read_bytes()
    assert_through_jump(net, net.a)
    assert_through_jump(net, net.b, direct_from=net.a)


@pytest.fixture
def two_loops(tmp_path: Path) -> Iterator[tuple[Loop, Loop]]:
    made = [Loop(tmp_path / "a.img", 8 * MiB), Loop(tmp_path / "b.img", 8 * MiB)]
    try:
        yield made[0], made[1]
    finally:
        for loop in made:
            loop.close()


async def test_dd_through_the_jump_host(net: Net, two_loops: tuple[Loop, Loop]) -> None:
    src, dst = two_loops
    data = os.urandom(MiB)
    src.write(3 * MiB, data)
    async with behind(net) as (ha, hb):
        stats = await dd_endpoints(
            HostEndpoint(ha, src.device),
            HostEndpoint(hb, dst.device),
            authorized_keys=str(net.b.dir / "authorized_keys"),
        )
    assert stats.route == "dd-host->host" and stats.bytes == MiB
    assert dst.read(4 * MiB)[3 * MiB :] == data
    assert_through_jump(net, net.a)
    assert_through_jump(net, net.b, direct_from=net.a)


async def test_a_dead_or_missing_jump_host_is_a_typed_error(net: Net, tmp_path: Path) -> None:
    # a jump host where nothing listens: every path fails, naming it; none goes around it
    nowhere = SSHHost(
        "127.0.0.64",
        port=net.jump.port,
        username="root",
        client_keys=[net.jump.client_key],
        known_hosts=net.jump.known_hosts,
        connect_timeout=5,
        label="bastion",
    )
    async with behind(net, jump=nowhere) as (ha, _):
        with pytest.raises(JumpHostError) as caught:
            await ha.scmd("true")
        assert caught.value.jump == "bastion" and "bastion" in str(caught.value)
        with pytest.raises(JumpHostError):
            await rsync_endpoints([LocalEndpoint(f"{tmp_path}/")], HostEndpoint(ha, "/tmp/x"))
    # the jump host answers but cannot reach the target: its refusal, named
    async with net.jump.host() as j:
        gone = SSHHost(
            "127.0.0.65",
            port=net.a.port,
            username="root",
            client_keys=[net.a.client_key],
            known_hosts=net.a.known_hosts,
            jump=j,
        )
        with pytest.raises(JumpHostError, match="could not open a tunnel"):
            await gone.scmd("true")
        await gone.close()
    assert net.owners(net.a) == []


async def test_an_openssh_child_cannot_go_around_the_jump_host(net: Net) -> None:
    """OpenSSH ``ssh`` with the host's options (rsync's ``-e``) works only while the
    jump host runs: it never connects to the target by itself."""
    async with net.jump.host() as j, net.a.host(jump=j) as ha:
        await ha.host_public_key()  # both host keys pinned, as before any rsync
        argv = ha.openssh_argv("echo", "via")
    done = await anyio.run_process(argv, check=False)
    assert done.returncode == 0 and done.stdout.strip() == b"via", done.stderr
    assert_through_jump(net, net.a)
    net.forget_owners()
    net.jump.stop()
    try:
        done = await anyio.run_process(argv, check=False)
    finally:
        net.jump.start()
    assert done.returncode == 255 and net.owners(net.a) == []


async def test_a_jump_chain_must_not_loop(net: Net) -> None:
    async with net.jump.host() as j, net.a.host(jump=j) as ha:
        with pytest.raises(InvalidArgument):
            j.jump = ha
        with pytest.raises(InvalidArgument):
            ha.jump = ha
        assert j.jump is None and ha.jump is j
