"""Network: the local cloud's namespaced network against loopback; a jump host against direct.

Two local clouds run at once in this process, both with the instant profile
(``Realism.off()``, no boot delay), so that only their networks differ:

- ``network="vpc"``: every instance in a network namespace of its own, behind its VPC's
  router namespace (a bridge, 1:1 NAT of its public address in nftables) and the cloud's
  router; this machine reaches a public address through a veth pair into that router;
- ``network="loopback"``: every instance's sshd on an address of the machine's loopback.

Measured, each pair of sides in turn within one run (the order swaps every round, and
the two sides of a ratio run next to each other where they can, so that load from
other processes hits both alike), a target judged on the median of the rounds' ratios
with the lowest and highest round beside it:

- warm command latency: ``server.scmd("true")`` over the open connection, blocks of
  samples on each cloud's server in turn (target: vpc no more than 10 % slower); and
  through the bastion each way, the hop in this process (``jump``, ``hop =
  "in-process"``), in a Python child process (``jump-child``: a second private server
  whose jump host is an ``SSHHost`` of the bastion with ``hop = "python"``) and in
  OpenSSH's ``ssh -W`` children (``jump-openssh``: a third, ``hop = "openssh"``, the
  default where ``ssh`` is installed), reported; and a new connection's first command
  on each of them and direct, in turn (through the bastion its own connection already
  open), reported;
- streaming: ``scmd_read`` (the remote ``head -c SIZE /dev/zero``) and ``scmd_write``
  (into the remote ``cat > /dev/null``) in 1 MiB pieces, MB/s vpc / loopback
  (target >= 0.9x);
- a jump host: on the VPC cloud, a server without a public address (``provision_server``
  into a subnet that maps none on launch, a private subnet as EC2 users make them),
  reached through a bastion with one (``Manager(jump_host=...)``: its connection is
  carried inside the bastion's, a ``direct-tcpip`` channel); the same streams against a
  server with a public address reached directly (target >= 0.8x). Through the bastion
  every byte is encrypted twice: for the server and again for the bastion. The three
  hop modes stream in the same rounds, each judged against direct: the hop in this
  process (``jump``: both encryptions on this process's core), the Python child
  (``jump-child``, asyncstage/_jumphop.py: the bastion's connection in a child process
  that carries the inner one as a channel's data) and OpenSSH's ``ssh -W`` for each
  connection (``jump-openssh``, the same module: the bastion's layer in C). Their
  streams are as long and as many as the others'; OpenSSH's own client is compared with
  the hop in this process only;
- the same jump with OpenSSH's own client, in the same rounds: ``ssh`` through the
  bastion (``ProxyCommand=ssh -W %h:%p bastion``, which is what ``ssh -J`` runs, here
  with the library's key and known_hosts for the bastion hop) against ``ssh`` direct, the
  same cipher, reading ``head -c SIZE /dev/zero`` and writing into ``cat > /dev/null``;
  its connection setup (the median ``ssh ... true`` of each side) is subtracted, and its
  CPU per GiB is that of the ``ssh`` processes. What double encryption costs any client;
- what bounds the jump's ratio on this machine: in the same rounds, the CPU seconds per
  GiB of every process that carries each stream: this one (or OpenSSH's ``ssh``
  processes), the server's sshd and, through the bastion, the bastion's sshd and the
  hop's child (``jump-child``) or its ``ssh -W`` (``jump-openssh``; every process of
  each instance: sshd, its sessions, the command).
  Each runs on one core at most and all of them share this machine's cores, which caps
  each side's rate and so the ratio; on EC2 the bastion and the server are machines of
  their own, and what this process and the hop's child allow, each on a core of its
  own (their CPU per GiB against this process's direct), is the cap;
- instance boot: ``provision_server()`` on each cloud in turn, from the launch to the
  cloud switching the instance to running (its sshd listening, the cloud's own view),
  and to the library having it answer ssh; vpc / loopback (reported, no target).

With ``--before REV`` it measures instead what the hop's code changed since the git
revision REV, in one run (``network_before_after.json``, on the VPC cloud alone): the
same streams direct, through the bastion in this process and through the hop's child,
each side twice, with REV's code (its wire layer in this process, all of it in the
hop's child) and with this checkout's, the sides in turn; the CPU seconds per GiB of
every process that carries each stream. The rows of the main run cite its figures.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import anyio
from _common import (
    CPUAccounting,
    MachineCPU,
    MiB,
    Report,
    descendants_cpu,
    local_cloud,
    ms,
    openssh_argv,
    paired_spread,
    parse_args,
    process_cpu,
    ratio,
    summary,
    to_thread,
)
from bench_fleet import _concurrent
from bench_streaming import _openssh, _read, _write

from asyncstage import Manager, Server, _jumphop, _sshwire
from asyncstage.localcloud import LocalCloud, Realism
from asyncstage.ssh import HopMode, SSHHost

BASTION = "netbench-bastion"
PRIVATE = "netbench-private"


async def _private_server(m: Manager, name: str) -> Server:
    """A server without a public address, as EC2 users make one: launched by the library
    into a subnet that maps none on launch (the last zone's default subnet, switched back
    once the server is up), and waited for through the manager's jump host."""
    found = await m.ec2.call(
        "DescribeSubnets", Filters=[{"Name": "default-for-az", "Values": ["true"]}]
    )
    subnet = max(found["Subnets"], key=lambda s: s["AvailabilityZone"])

    async def map_public(value: bool) -> None:
        await m.ec2.call(
            "ModifySubnetAttribute",
            SubnetId=subnet["SubnetId"],
            MapPublicIpOnLaunch={"Value": value},
        )

    await map_public(False)
    try:
        return await m.provision_server(name, availability_zone=subnet["AvailabilityZone"])
    finally:
        await map_public(True)


def _in_turn(round_no: int, sides: list[str]) -> list[str]:
    """The sides in this round's order: a b, b a, a b, ..."""
    return sides if round_no % 2 == 0 else sides[::-1]


class _Beside:
    """CPU of the processes beside the client that carry a stream: the server's and,
    through the bastion, the hop's child process and the bastion's (every process of
    the instance, under its init: sshd, its sessions and the command they run)."""

    def __init__(
        self,
        cloud: LocalCloud,
        bastion: Server,
        servers: dict[str, Server],
        hops: dict[str, SSHHost],
    ) -> None:
        machines = cloud._engine.machines
        self._hops = hops
        self._bastion = machines[bastion.instance_id].host.init_pid
        self._init = {side: machines[s.instance_id].host.init_pid for side, s in servers.items()}
        self._jumped = {side for side, s in servers.items() if s.jump_host is not None}

    def usage(self, side: str, hop: bool = True) -> dict[str, float]:
        """Cumulative CPU seconds of ``side``'s server (and bastion, and with ``hop`` the
        hop's child), by who; nothing for a side of another cloud."""
        got: dict[str, float] = {}
        if side in self._hops and hop:
            child = self._hops[side]._conn.hops.hop
            if isinstance(child, _jumphop.OpenSSHHop):
                carriers = [*child.pids, *([child.master_pid] if child.master_pid else [])]
                got["ssh-w"] = sum(_pid_cpu(pid) for pid in carriers)
            elif child is not None:
                got["hop"] = _pid_cpu(child.pid)
        if side in self._jumped and self._bastion is not None:
            got["bastion"] = descendants_cpu(self._bastion)
        init = self._init.get(side)
        if init is not None:
            got["server"] = descendants_cpu(init)
        return got


def _pid_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` so far: its threads' scheduler run time."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


async def _latency(
    servers: dict[str, Server], blocks: int, per_block: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``scmd("true")`` samples of each server, in blocks taken in turn; (samples, each
    block's median) per side."""
    samples: dict[str, list[float]] = {k: [] for k in servers}
    block_medians: dict[str, list[float]] = {k: [] for k in servers}
    for b in range(blocks):
        for side in _in_turn(b, list(servers)):
            block = []
            for _ in range(per_block):
                t = time.perf_counter()
                await servers[side].scmd("true")
                block.append(time.perf_counter() - t)
            samples[side] += block
            block_medians[side].append(statistics.median(block))
    return samples, block_medians


async def _connects(servers: dict[str, Server], rounds: int) -> dict[str, list[float]]:
    """Seconds from a new connection to each server to its first command's end, the
    sides in turn: a host of its own, through the same jump host (whose own connection,
    and the Python hop's child, are open already; the OpenSSH hop starts an ``ssh -W``
    for each connection, a client of its master connection to the jump host)."""
    found: dict[str, list[float]] = {k: [] for k in servers}
    for r in range(rounds):
        for side in _in_turn(r, list(servers)):
            server = servers[side]
            host = _copy(server.host, f"{side} connecting", server.host.jump)
            started = time.perf_counter()
            await host.run("true")
            found[side].append(time.perf_counter() - started)
            await host.close()
    return found


class _SshCPU:
    """The OpenSSH clients' CPU: every ``ssh`` started through :meth:`argv` runs in a
    cgroup v1 ``cpuacct`` group of its own, with the processes it starts. ``ssh`` does not
    wait for its ProxyCommand (the bastion hop's ``ssh -W``), so this process's
    RUSAGE_CHILDREN would miss that one; it is the fallback without the group."""

    def __init__(self) -> None:
        self.path: Path | None = CPUAccounting.ROOT / f"asyncstage-bench-ssh-{os.getpid()}"

    def __enter__(self) -> _SshCPU:
        assert self.path is not None
        try:
            self.path.mkdir()
        except OSError:
            self.path = None
        return self

    def argv(self, argv: list[str]) -> list[str]:
        """``argv``, moved into the group first."""
        if self.path is None:
            return argv
        enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["sh", "-c", enter, str(self.path), *argv]

    def usage(self) -> float:
        """CPU seconds used by the clients so far."""
        if self.path is None:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            return usage.ru_utime + usage.ru_stime
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        procs, deadline = self.path / "cgroup.procs", time.monotonic() + 5
        while procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)  # a ProxyCommand's ssh may still be ending
        with contextlib.suppress(OSError):
            self.path.rmdir()
        if self.path.exists():
            print(f"note: {self.path} left behind (processes still in it)")


async def _openssh_setup(argv: list[str], times: int = 3) -> float:
    """The median seconds of ``argv`` running ``true``: connecting, authenticating, exiting."""
    return statistics.median(
        [await to_thread(_openssh, argv, 0, subprocess.DEVNULL) for _ in range(times)]
    )


_Timed = tuple[
    dict[str, list[float]],
    dict[str, list[float]],
    dict[str, list[float]],
    dict[str, dict[str, list[float]]],
]


async def _streams(
    servers: dict[str, Server],
    size: int,
    rounds: int,
    openssh: dict[str, Server],
    cipher: str,
    ssh_cpu: _SshCPU,
    beside: _Beside,
) -> _Timed:
    """MB/s of each round, the client's CPU seconds per GiB (this process's; the ``ssh``
    processes' for OpenSSH), how busy the machine's cores were, per ``<direction>
    <side>`` (OpenSSH's sides are ``openssh <side>``), and the CPU seconds per GiB of the
    processes beside the client (:class:`_Beside`) per stream and process."""
    runs: dict[str, Callable[[], Awaitable[float]]] = {}
    cmds = {"read": f"head -c {size} /dev/zero", "write": "cat > /dev/null"}
    setup: dict[str, float] = {}
    ssh = ("-c", cipher)
    for side, server in openssh.items():
        setup[side] = await _openssh_setup(
            ssh_cpu.argv(openssh_argv(server.host, "true", extra=ssh))
        )
    # one direction's streams after the other's, in the order of ``servers``, then
    # OpenSSH's (direct next to ours): the sides a ratio pairs run close together
    for direction, fn in (("read", _read), ("write", _write)):
        for side, server in servers.items():
            runs[f"{direction} {side}"] = lambda fn=fn, server=server: fn(server, size)
        for side, server in openssh.items():
            argv = ssh_cpu.argv(openssh_argv(server.host, cmds[direction], extra=ssh))
            stdout = subprocess.DEVNULL if direction == "read" else None
            runs[f"{direction} openssh {side}"] = lambda argv=argv, stdout=stdout, side=side: _less(
                to_thread(_openssh, argv, size, None, stdout), setup[side]
            )
    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    busy: dict[str, list[float]] = {k: [] for k in runs}
    others: dict[str, dict[str, list[float]]] = {}
    gib = size / (1 << 30)
    for r in range(rounds):
        for name in _in_turn(r, list(runs)):
            side, theirs = name.split(" ")[-1], name.split(" ")[1] == "openssh"
            before = beside.usage(side, not theirs)  # read outside the client's CPU below
            c, kids = process_cpu(), ssh_cpu.usage()
            with MachineCPU() as machine:
                seconds = await runs[name]()
            spent = ssh_cpu.usage() - kids if theirs else process_cpu() - c
            for who, used in beside.usage(side, not theirs).items():
                if who in before:
                    others.setdefault(name, {}).setdefault(who, []).append(
                        (used - before[who]) / gib
                    )
            cpu[name].append(spent / gib)
            rates[name].append(size / seconds / 1e6)
            busy[name].append(machine.busy)
    return rates, cpu, busy, others


async def _less(run: Awaitable[float], setup: float) -> float:
    """The seconds of ``run`` less its connection setup."""
    return max(await run - setup, 1e-6)


async def _boots(
    clouds: dict[str, tuple[LocalCloud, Manager]], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """``provision_server()`` on each cloud in turn (the server terminated after each)."""
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in clouds}
    for r in range(rounds):
        for side in _in_turn(r, list(clouds)):
            cloud, m = clouds[side]
            found[side].append(await _concurrent(cloud, m, 1))
    return found


def _paired(top: list[float], bottom: list[float]) -> tuple[float, list[float] | None]:
    """The median of the rounds' ratios, and [lowest, highest] (None with one round)."""
    pairs = [ratio(a, b) for a, b in zip(top, bottom, strict=True)]
    return round(statistics.median(pairs), 3), paired_spread(top, bottom)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def main() -> None:
    argv = sys.argv[1:]
    before = None
    if "--before" in argv:
        at = argv.index("--before")
        before, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    args = parse_args(__doc__ or "", argv)
    if before is not None:
        await _before_after(args.quick, args.results, before)
        return
    quick = args.quick
    size = 4 * MiB if quick else 384 * MiB
    rounds = 1 if quick else 12
    blocks, per_block = (2, 5) if quick else (20, 20)
    boot_rounds = 1 if quick else 6
    report = Report("network", quick, args.results)
    report.params = {
        "realism": "off (instant profile), boot delay 0",
        "stream_bytes": size,
        "stream_rounds": rounds,
        "latency_blocks": blocks,
        "latency_samples_per_block": per_block,
        "boot_rounds": boot_rounds,
        "command": "true",
    }
    off = Realism.off()
    async with (
        local_cloud(0.0, off, network="vpc", jump_host=BASTION) as vpc,
        local_cloud(0.0, off, network="loopback") as loop,
    ):
        vpc_m, loop_m = vpc[1], loop[1]
        direct, bastion, looped = await _gather(
            vpc_m.provision_server("netbench-direct"),
            vpc_m.provision_server(BASTION),
            loop_m.provision_server("netbench-loopback"),
        )
        bastion.host.hop = "in-process"  # the "jump" side: the hop in this process
        private = await _private_server(vpc_m, PRIVATE)
        if "PublicIpAddress" in private.instance or private.jump_host != BASTION:
            raise RuntimeError(f"{PRIVATE} is not reached through {BASTION}")
        child_hop = _child_hop(bastion)
        other = await _private_server(vpc_m, f"{PRIVATE}-2")
        other.jump_host = child_hop
        ssh_hop = _copy(bastion.host, "hop in ssh -W", hop="openssh")
        third = await _private_server(vpc_m, f"{PRIVATE}-3")
        third.jump_host = ssh_hop
        # the order the streams run in, each round (reversed every other): each jump
        # side's ratio is to "vpc", so the default hop's streams run next to it, and
        # "vpc" next to "loopback" (load that comes and goes hits neighbours alike)
        by_side = {
            "loopback": looped,
            "vpc": direct,
            "jump-openssh": third,
            "jump": private,
            "jump-child": other,
        }
        for server in by_side.values():
            await server.scmd("true")  # warm: connection open, host key pinned
            await _read(server, min(size, 16 * MiB))
        if (
            bastion.host._conn.hops.hop is not None
            or not isinstance(child_hop._conn.hops.hop, _jumphop.Hop)
            or not isinstance(ssh_hop._conn.hops.hop, _jumphop.OpenSSHHop)
        ):
            raise RuntimeError("the jump sides do not use the hop they are named for")
        report.params["addresses"] = {k: s.host.address for k, s in by_side.items()}
        report.params["jump_host_address"] = bastion.host.address
        report.params["clouds_network"] = {"vpc": vpc[0].network, "loopback": loop[0].network}
        cipher = _negotiated(private)
        report.params["cipher"] = {"jump": cipher, "vpc": _negotiated(direct)}
        samples, blocks_med = await _latency(by_side, blocks, per_block)
        connects = await _connects(
            {k: s for k, s in by_side.items() if k != "loopback"}, 2 if quick else 10
        )
        report.mark_load("after_latency")
        pair = {"vpc": direct, "jump": private}
        jumped = {"vpc": direct, "jump": private, "jump-child": other, "jump-openssh": third}
        hops = {"jump-child": child_hop, "jump-openssh": ssh_hop}
        beside = _Beside(vpc[0], bastion, jumped, hops)
        with _SshCPU() as ssh_cpu:
            rates, cpu, busy, others = await _streams(
                by_side, size, rounds, pair, cipher, ssh_cpu, beside
            )
        await child_hop.close()
        await ssh_hop.close()
        report.mark_load("after_streams")
        boots = await _boots({"vpc": vpc, "loopback": loop}, boot_rounds)
        report.mark_load("after_boots")
    _report(report, size, samples, blocks_med, rates, cpu, busy, others, boots)
    report.table(
        "A new connection's first command, scmd('true') (sides in turn)",
        ["server", "median ms", "lowest ms", "highest ms", "n"],
        [
            [k, ms(statistics.median(v)), ms(min(v)), ms(max(v)), len(v)]
            for k, v in connects.items()
        ],
    )
    report.results["connect_s"] = {k: [round(x, 4) for x in v] for k, v in connects.items()}
    report.results["connect_median_s"] = {
        k: round(statistics.median(v), 4) for k, v in connects.items()
    }
    report.save()


# -- before and after: the hop's code at another revision against this checkout's ---------

_AB_SIDES = ("direct", "jump", "jump-child")


async def _before_after(quick: bool, results: Path, rev: str) -> None:
    """The streams of each side with ``rev``'s code and with this checkout's, in turn."""
    size = 16 * MiB if quick else 512 * MiB
    rounds = 1 if quick else 7
    report = Report("network_before_after", quick, results)
    report.params = {"revision_before": rev, "stream_bytes": size, "stream_rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="asyncstage-bench-before-") as tree:
        old_wire = _checkout(rev, Path(tree))
        off = Realism.off()
        async with local_cloud(0.0, off, network="vpc", jump_host=BASTION) as (cloud, m):
            direct, bastion = await _gather(
                m.provision_server("netbench-direct"), m.provision_server(BASTION)
            )
            private = await _private_server(m, PRIVATE)
            await private.scmd("true")  # its host key pinned through the bastion
            hosts: dict[str, SSHHost] = {}
            for when in ("before", "after"):
                with _code_of(when, tree, old_wire):
                    for side in _AB_SIDES:
                        jump = None
                        if side != "direct":
                            jump = _copy(bastion.host, side, hop_process=side == "jump-child")
                        target = direct if side == "direct" else private
                        host = _copy(target.host, side, jump)
                        await host.scmd("true")  # connected now, with this side's code
                        await _read(cast(Any, host), min(size, 16 * MiB))
                        hosts[f"{side} {when}"] = host
            machines = cloud._engine.machines
            inits = {
                "server": {
                    "direct": machines[direct.instance_id].host.init_pid,
                    "jump": machines[private.instance_id].host.init_pid,
                },
                "bastion": machines[bastion.instance_id].host.init_pid,
            }
            rates, cpu = await _ab_streams(hosts, size, rounds, inits)
            for host in hosts.values():
                await host.close()
                if host.jump is not None:
                    await host.jump.close()
    _ab_report(report, rates, cpu, size)
    report.save()


def _checkout(rev: str, tree: Path) -> ModuleType:
    """``rev``'s asyncstage package in ``tree`` (for the hop's child), and its wire layer
    loaded as a module of its own (for this process)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "asyncstage"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location(
        "_sshwire_before", tree / "asyncstage" / "_sshwire.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _code_of(when: str, tree: str, old_wire: ModuleType) -> Iterator[None]:
    """Connections made inside run ``rev``'s code (``when == "before"``): its gathered
    writes and keepalive handling in this process, its whole package in the hop's child."""
    if when != "before":
        yield
        return
    swapped: list[tuple[ModuleType, str, Any]] = [
        (_sshwire, "_GatheredWrites", old_wire._GatheredWrites),
        (_sshwire, "_coarse_keepalive", getattr(old_wire, "_coarse_keepalive", _unchanged)),
        (_jumphop, "_PACKAGE_ROOT", tree),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swapped]
    for module, name, value in swapped:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _unchanged(conn: object) -> None:
    """asyncssh's keepalive handling as it is (the code before had none of its own)."""


def _copy(
    host: SSHHost,
    side: str,
    jump: SSHHost | None = None,
    *,
    hop_process: bool = False,
    hop: HopMode | None = None,
) -> SSHHost:
    """A host of its own for ``host`` (a connection of its own), its host key pinned."""
    copy = SSHHost(
        host.address,
        port=host.port,
        username=host.username,
        client_keys=host.client_keys,
        known_hosts=host.known_hosts,
        host_key_policy="strict",
        label=f"{host.label} ({side})",
        jump=jump,
    )
    copy.hop_process = hop_process  # False: the hop in this process
    if hop is not None:
        copy.hop = hop
    return copy


async def _ab_streams(
    hosts: dict[str, SSHHost], size: int, rounds: int, inits: dict[str, Any]
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """MB/s of each stream per round, and the CPU s/GiB of each process carrying it."""
    rates: dict[str, list[float]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    gib = size / (1 << 30)
    names = [f"{d} {side}" for d in ("read", "write") for side in hosts]
    for r in range(rounds):
        for name in _in_turn(r, names):
            direction, side = name.split(" ", 1)
            host = hosts[side]
            kind = side.split(" ")[0]
            hop = host.jump._conn.hops.hop if host.jump is not None else None

            def used(hop: Any = hop, kind: str = kind) -> dict[str, float]:
                got = {"client": process_cpu()}
                if hop is not None:
                    got["hop"] = _pid_cpu(hop.pid)
                if kind != "direct":
                    got["bastion"] = descendants_cpu(inits["bastion"])
                server = inits["server"]["direct" if kind == "direct" else "jump"]
                got["server"] = descendants_cpu(server)
                return got

            start = used()
            seconds = await (_read if direction == "read" else _write)(cast(Any, host), size)
            end = used()
            rates.setdefault(name, []).append(size / seconds / 1e6)
            for who, value in end.items():
                cpu.setdefault(name, {}).setdefault(who, []).append((value - start[who]) / gib)
    return rates, cpu


def _ab_report(
    report: Report,
    rates: dict[str, list[float]],
    cpu: dict[str, dict[str, list[float]]],
    size: int,
) -> None:
    mb_s = {k: _median(v) for k, v in rates.items()}
    cpu_gib = {
        k: {who: round(statistics.median(v), 2) for who, v in by.items()} for k, by in cpu.items()
    }
    report.table(
        f"Before / after, {size // MiB} MiB streams (median of {len(rates[next(iter(rates))])} "
        "rounds), CPU s/GiB of each process",
        ["stream", "MB/s", "this process", "hop's child", "bastion's sshd", "server's sshd"],
        [
            [k, mb_s[k], *(cpu_gib[k].get(w, "-") for w in ("client", "hop", "bastion", "server"))]
            for k in rates
        ],
    )
    report.results.update({"mb_per_s_median": mb_s, "cpu_s_per_gib": cpu_gib})


def _before_after_evidence(results: Path, streams: list[str]) -> str:
    """What ``streams`` cost before and after the hop's last changes, from a run of
    their own (``--before``), or nothing without one."""
    path = results / "network_before_after.json"
    if not path.exists():
        return ""
    found = json.loads(path.read_text())
    if found.get("quick"):
        return ""
    cpu = found["results"]["cpu_s_per_gib"]
    parts = []
    for stream in streams:
        direction, side = stream.split(" ")
        side = {"vpc": "direct"}.get(side, side)
        old, new = cpu.get(f"{direction} {side} before"), cpu.get(f"{direction} {side} after")
        if old and new:
            changes = ", ".join(
                f"{_WHO.get(who, who)} {old[who]} → {new[who]}" for who in new if who in old
            )
            parts.append(f"{'direct' if side == 'direct' else 'through the bastion'} {changes}")
    if not parts:
        return ""
    return (
        f". Before → after the hop's changes since {found['params']['revision_before']}, "
        f"CPU s/GiB in one run of their own (network_before_after.json): {'; '.join(parts)}"
    )


def _child_hop(bastion: Server) -> SSHHost:
    """The bastion as a jump host whose tunnels run in a child process (the opt-in)."""
    return _copy(bastion.host, "hop in a child", hop_process=True)


def _negotiated(server: Server) -> str:
    """The cipher the library's connection to ``server`` uses (OpenSSH is given the same)."""
    link = server.host._conn.open_link()
    if link is None:
        raise RuntimeError(f"{server} has no open connection")
    return str(link.conn.get_extra_info("send_cipher"))


async def _gather(*calls: Awaitable[Server]) -> list[Server]:
    out: list[Server | None] = [None] * len(calls)

    async def one(i: int, call: Awaitable[Server]) -> None:
        out[i] = await call

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return [s for s in out if s is not None]


def _report(
    report: Report,
    size: int,
    samples: dict[str, list[float]],
    blocks_med: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    busy: dict[str, list[float]],
    others: dict[str, dict[str, list[float]]],
    boots: dict[str, list[dict[str, Any]]],
) -> None:
    latency = {k: summary(v) for k, v in samples.items()}
    report.table(
        "Warm command latency, scmd('true') (blocks taken in turn)",
        ["server", "median ms", "p90 ms", "n", "× loopback (median of blocks)"],
        [
            [
                side,
                ms(s["median"]),
                ms(s["p90"]),
                s["n"],
                _paired(blocks_med[side], blocks_med["loopback"])[0],
            ]
            for side, s in latency.items()
        ],
    )
    mb_s = {k: _median(v) for k, v in rates.items()}
    cpu_gib = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
    busy_med = {k: round(statistics.median(v), 2) for k, v in busy.items()}
    beside_gib = {
        k: {who: round(statistics.median(v), 2) for who, v in by.items()}
        for k, by in others.items()
    }
    report.table(
        f"Streaming {size // MiB} MiB, 1 MiB pieces (median of {len(rates['read vpc'])} rounds)",
        ["stream", "MB/s", "lowest", "highest", "client CPU s/GiB", "machine busy"],
        [[k, mb_s[k], min(v), max(v), cpu_gib[k], busy_med[k]] for k, v in rates.items()],
    )
    boot = {
        side: {
            "cloud_running_s": [r["cloud_last_running_s"] for r in runs],
            "answering_ssh_s": [r["wall_s"] for r in runs],
        }
        for side, runs in boots.items()
    }
    boot_ratio = {
        key: _paired(boot["vpc"][key], boot["loopback"][key])
        for key in ("cloud_running_s", "answering_ssh_s")
    }
    report.table(
        "Instance boot, provision_server() on each cloud in turn (medians)",
        ["until", "vpc s", "loopback s", "vpc / loopback (median of rounds)", "spread"],
        [
            [
                key.removesuffix("_s").replace("_", " "),
                round(statistics.median(boot["vpc"][key]), 3),
                round(statistics.median(boot["loopback"][key]), 3),
                boot_ratio[key][0],
                "-" if boot_ratio[key][1] is None else f"{boot_ratio[key][1]}",
            ]
            for key in ("cloud_running_s", "answering_ssh_s")
        ],
    )
    report.results.update(
        {
            "latency": latency,
            "latency_block_medians_s": {k: [round(x, 6) for x in v] for k, v in blocks_med.items()},
            "mb_per_s_median": mb_s,
            "mb_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "client_cpu_s_per_gib": cpu_gib,
            "machine_busy_share": busy_med,
            "beside_cpu_s_per_gib": beside_gib,
            "cores": os.cpu_count(),
            "boot": boot,
            "boot_vpc_vs_loopback": {
                k: {"ratio": v[0], "spread": v[1]} for k, v in boot_ratio.items()
            },
        }
    )
    for key, (top, bottom) in {
        "latency_jump_child_vs_in_process": ("jump-child", "jump"),
        "latency_jump_openssh_vs_in_process": ("jump-openssh", "jump"),
        "latency_jump_vs_direct": ("jump", "vpc"),
    }.items():
        value, spread = _paired(blocks_med[top], blocks_med[bottom])
        report.results[key] = {"ratio": value, "spread": spread}
    _targets(report, latency, blocks_med, rates, mb_s, cpu_gib, busy_med)
    _jump_targets(report, rates, mb_s, cpu_gib, beside_gib, busy_med)


def _targets(
    report: Report,
    latency: dict[str, dict[str, float]],
    blocks_med: dict[str, list[float]],
    rates: dict[str, list[float]],
    mb_s: dict[str, float],
    cpu_gib: dict[str, float],
    busy: dict[str, float],
) -> None:
    value, spread = _paired(blocks_med["vpc"], blocks_med["loopback"])
    path = (
        "the VPC side's packets cross two veth pairs, a bridge and the router's nftables "
        "NAT on this machine's cores"
    )
    report.target(
        "command_latency_vpc_vs_loopback",
        value,
        "<=",
        1.1,
        "warm command latency through the namespaced network / on loopback, same run "
        f"(median of {len(blocks_med['vpc'])} blocks' ratios)",
        spread=spread,
        bound="library",
        evidence=(
            f"medians: vpc {ms(latency['vpc']['median'])} ms (p90 {ms(latency['vpc']['p90'])}), "
            f"loopback {ms(latency['loopback']['median'])} ms "
            f"(p90 {ms(latency['loopback']['p90'])}), n={latency['vpc']['n']} each; {path}"
        ),
    )
    for direction in ("read", "write"):
        value, spread = _paired(rates[f"{direction} vpc"], rates[f"{direction} loopback"])
        vpc_cpu, loop_cpu = cpu_gib[f"{direction} vpc"], cpu_gib[f"{direction} loopback"]
        cap = ratio(loop_cpu, vpc_cpu)
        limit = 0.9
        evidence = (
            f"vpc {mb_s[f'{direction} vpc']} MB/s, loopback {mb_s[f'{direction} loopback']} "
            f"MB/s; this process's CPU {vpc_cpu} s/GiB through the namespaces against "
            f"{loop_cpu} on loopback (the same asyncstage and asyncssh code on both: the "
            "kernel's forwarding through veth pairs, bridge and NAT is counted to the "
            f"processes that send and receive): on its one core at most "
            f"{_rate_cap(vpc_cpu)} and {_rate_cap(loop_cpu)} MB/s, a ratio of {cap}× at most; "
            f"machine busy {busy[f'{direction} vpc']:.0%} / {busy[f'{direction} loopback']:.0%}"
        )
        bound = (
            "library"
            if value >= limit or cap >= limit
            else "machine: the namespaced path (veth pairs, a bridge, nftables NAT and "
            "conntrack) runs in this machine's kernel on the controller's own core; on EC2 "
            "the VPC's network is not the controller's CPU"
        )
        report.target(
            f"scmd_{direction}_vpc_vs_loopback",
            value,
            ">=",
            limit,
            f"scmd_{direction} MB/s through the namespaced network / on loopback, same run "
            f"(median of {len(rates['read vpc'])} rounds)",
            spread=spread,
            bound=bound,
            evidence=evidence,
        )


# Who carries a stream, as the evidence names them; OpenSSH's ``ssh`` through the bastion
# is two processes (``ssh`` and its ProxyCommand ``ssh -W``), measured together.
_WHO = {
    "client": "this process",
    "hop": "the hop's child process",
    "ssh-w": "the hop's ssh -W",
    "ssh": "ssh",
    "bastion": "the bastion's sshd",
    "server": "the server's sshd",
}


# The two hop modes streamed through the bastion: side, target suffix, how the rows name it.
_HOPS = {
    "jump": ("jump", 'its hop in this process, hop = "in-process"'),
    "jump-child": ("jump_child", 'its hop in a Python child process, hop = "python"'),
    "jump-openssh": ("jump_openssh", 'its hop in OpenSSH\'s ssh -W, hop = "openssh"'),
}
# The process beside this one that encrypts the bastion's layer, per hop mode.
_HOP_PROCESS = {"jump-child": "hop", "jump-openssh": "ssh-w"}


def _jump_targets(
    report: Report,
    rates: dict[str, list[float]],
    mb_s: dict[str, float],
    cpu_gib: dict[str, float],
    beside: dict[str, dict[str, float]],
    busy: dict[str, float],
) -> None:
    """Through the bastion against direct, each hop mode, and what caps that ratio on
    this machine's cores: every process carrying each stream, measured in the same rounds."""
    cores = os.cpu_count() or 1
    for side, direction in itertools.product(_HOPS, ("read", "write")):
        suffix, mode = _HOPS[side]
        child = _HOP_PROCESS.get(side)  # the hop's process beside this one, if any
        jump, direct = f"{direction} {side}", f"{direction} vpc"
        value, spread = _paired(rates[jump], rates[direct])
        path = {"client": cpu_gib[jump], **beside.get(jump, {})}
        straight = {"client": cpu_gib[direct], **beside.get(direct, {})}
        (cap, tight), (straight_cap, _) = _cap(path, cores), _cap(straight, cores)
        here = ratio(cap, straight_cap)
        # On EC2 the bastion and the server are machines of their own: this process's (and
        # the hop's child's) CPU per byte, each on a core of its own, is what is left on the
        # controller's.
        ours_most = max(cpu_gib[jump], beside.get(jump, {}).get(child or "", 0.0))
        alone = ratio(cpu_gib[direct], ours_most)
        controller = f"this process and {_WHO[child]}" if child else "this process"
        own = "each on a core of its own" if child else "on a core of its own"
        twice = (
            f"for the server here and again for the bastion in {_WHO[child]}"
            if child
            else "for the server and again for the bastion, both in this process"
        )
        evidence = (
            f"through the bastion {mb_s[jump]} MB/s, direct {mb_s[direct]} MB/s (machine "
            f"busy {busy[jump]:.0%} / {busy[direct]:.0%}). CPU s/GiB of every process "
            f"carrying the stream, same rounds: through the bastion {_listed(path)}; direct "
            f"{_listed(straight)}. Each on one core at most, all on these {cores} cores: at "
            f"most {_gib_mb(cap)} against {_gib_mb(straight_cap)} MB/s, a ratio of {here}× "
            f"at most here ({tight} the tightest through the bastion); measured "
            f"{ratio(value, here)}× that cap. {controller.capitalize()} alone, {own} (EC2, "
            "where the bastion and the server run on machines of their own): "
            f"{_listed(_ours(path))} s/GiB through the bastion against {cpu_gib[direct]} "
            f"direct (every byte encrypted {twice}), at most {alone}×"
        )
        evidence += _before_after_evidence(report.results_dir, [jump, direct])
        if side == "jump":
            evidence += _openssh_evidence(report, direction, rates, mb_s, cpu_gib, beside, cores)
        limit = 0.8
        if value >= limit or here >= limit:
            bound = "library"
        elif alone < limit and tight in (_tightest("client"), _tightest(child or "client")):
            # One of our processes' one core is the cap, here as on EC2: the hop's design,
            # not this machine's cores or the sshd beside it.
            bound = (
                f"design: {tight} caps the stream through the bastion "
                f"({_listed(_ours(path))} s/GiB against {cpu_gib[direct]} direct): at most "
                f"{alone}× here and with the bastion and the server on machines of their "
                "own (EC2) alike"
            )
        else:
            carriers = f"this one, {_WHO[child]}," if child else "this one,"
            bound = (
                f"machine: the processes carrying the stream ({carriers} the bastion's and "
                f"the server's sshd) on these {cores} cores allow at most {here}× ({tight} "
                f"the tightest); on EC2, each on a core of its own, {controller} allow "
                f"{alone}×"
            )
        report.target(
            f"scmd_{direction}_{suffix}_vs_direct",
            value,
            ">=",
            limit,
            f"scmd_{direction} MB/s through a jump host ({mode}) / direct to a server with a "
            f"public address, same VPC cloud, same run (median of {len(rates[direct])} rounds)",
            spread=spread,
            bound=bound,
            evidence=evidence,
        )
        found = report.results
        found.setdefault(f"{suffix}_cap_here", {})[direction] = here
        found.setdefault(f"{suffix}_cap_this_process_alone", {})[direction] = alone


def _openssh_evidence(
    report: Report,
    direction: str,
    rates: dict[str, list[float]],
    mb_s: dict[str, float],
    cpu_gib: dict[str, float],
    beside: dict[str, dict[str, float]],
    cores: int,
) -> str:
    """OpenSSH's ssh -J against its ssh direct, same rounds: what double encryption
    costs any client (also kept in the results)."""
    ours, theirs = f"{direction} openssh jump", f"{direction} openssh vpc"
    openssh_value, _ = _paired(rates[ours], rates[theirs])
    two = {"ssh": 2}
    o_path = {"ssh": cpu_gib[ours], **beside.get(ours, {})}
    o_straight = {"ssh": cpu_gib[theirs], **beside.get(theirs, {})}
    o_here = ratio(_cap(o_path, cores, two)[0], _cap(o_straight, cores)[0])
    o_alone = ratio(
        _cap({"ssh": cpu_gib[ours]}, cores, two)[0], _cap({"ssh": cpu_gib[theirs]}, cores)[0]
    )
    found = report.results
    found.setdefault("openssh_jump_vs_direct", {})[direction] = openssh_value
    found.setdefault("openssh_jump_cap_here", {})[direction] = o_here
    return (
        f". OpenSSH's ssh -J (ssh and its ssh -W), same cipher, same rounds: {mb_s[ours]} "
        f"MB/s through the bastion against {mb_s[theirs]} direct ({openssh_value}×); CPU "
        f"s/GiB through the bastion {_listed(o_path)}, direct {_listed(o_straight)}: at "
        f"most {o_here}× here, measured {ratio(openssh_value, o_here)}× that cap; its ssh "
        f"processes alone (the two sharing the work evenly at best) allow {o_alone}×"
    )


def _ours(cpu_s_per_gib: dict[str, float]) -> dict[str, float]:
    """The controller's processes among those carrying a stream."""
    return {who: v for who, v in cpu_s_per_gib.items() if who in ("client", *_HOP_PROCESS.values())}


def _cap(
    cpu_s_per_gib: dict[str, float], cores: int, processes: dict[str, int] | None = None
) -> tuple[float, str]:
    """GiB/s at most that processes using these CPU seconds per GiB allow, and which
    limit it is: each on one core at most (a group of ``processes[who]`` processes
    measured together, that many cores at most), all of them on ``cores`` together."""
    groups = processes or {}
    each = {who: v / groups.get(who, 1) for who, v in cpu_s_per_gib.items()}
    worst = max(each, key=lambda who: each[who])
    shared = sum(cpu_s_per_gib.values()) / cores
    if shared >= each[worst]:
        return (1 / shared if shared else float("inf")), f"the {cores} cores shared"
    return 1 / each[worst], _tightest(worst)


def _tightest(who: str) -> str:
    return f"{_WHO.get(who, who)}'s one core"


def _listed(cpu_s_per_gib: dict[str, float]) -> str:
    return ", ".join(f"{_WHO.get(who, who)} {v}" for who, v in cpu_s_per_gib.items())


def _gib_mb(gib_per_s: float) -> float:
    return round(gib_per_s * (1 << 30) / 1e6, 1)


def _rate_cap(cpu_s_per_gib: float) -> float:
    """MB/s one core allows at this many CPU seconds per GiB."""
    return round((1 << 30) / 1e6 / cpu_s_per_gib, 1) if cpu_s_per_gib else float("inf")


if __name__ == "__main__":
    anyio.run(main)
