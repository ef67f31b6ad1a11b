"""Commands: latency of one command and throughput of many, asyncstage vs OpenSSH.

Latency of ``true``:
- asyncstage: ``server.scmd("true")`` over the warm connection (SSHHost);
- raw asyncssh (reference): ``conn.run("true")`` on a connection of its own;
- OpenSSH with ControlMaster: ``ssh -o ControlPath=... host -- true`` (a forked
  client that asks the master for a session);
- OpenSSH with a new connection per command (the Perl module's way).
Both OpenSSH variants use the library's key and known_hosts with
StrictHostKeyChecking=yes. The local cloud's ``admin`` user has a clean shell
start-up (no rc file work), so nothing hides the transport's own cost. The samples
of the methods are interleaved in small blocks, so load from other processes hits all
of them alike.

Throughput: N commands on one server and spread over 10 servers, all started at once
(asyncstage queues them below each connection's session limit) vs OpenSSH
ControlMaster clients, 10 at a time.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import asyncssh
from _common import (
    ControlMaster,
    OwnCPU,
    Report,
    local_cloud,
    ms,
    openssh_argv,
    parse_args,
    ratio,
    summary,
    to_thread,
)

from asyncstage import Server


def _ssh_loop(argv: list[str], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t)
    return samples


def _parallel_ssh(argvs: list[list[str]], workers: int) -> float:
    def one(argv: list[str]) -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, argvs))
    return time.perf_counter() - t


async def _raw_asyncssh(server: Server) -> asyncssh.SSHClientConnection:
    """A plain asyncssh connection with the same key and host key (the reference)."""
    known = asyncssh.import_public_key(await server.host.host_public_key())
    return await asyncssh.connect(
        server.host.address,
        username=server.username,
        client_keys=[str(server.keyfile)],
        known_hosts=([known], [], []),
        config=[],
        agent_path=None,
    )


async def _fanout(servers: list[Server], total: int) -> float:
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(total):
            tg.start_soon(servers[i % len(servers)].scmd, "true")
    return time.perf_counter() - t


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    blocks = 3 if quick else 20
    per_block = {"asyncstage": 5, "asyncssh": 5, "controlmaster": 5, "new_connection": 1}
    if not quick:
        per_block = {"asyncstage": 20, "asyncssh": 20, "controlmaster": 20, "new_connection": 2}
    total_cmds = 60 if quick else 1000
    n_servers = 2 if quick else 10
    report = Report("commands", quick, args.results)
    report.params = {
        "command": "true",
        "user": "admin (local cloud login user, clean shell start-up)",
        "latency_blocks": blocks,
        "samples_per_block": per_block,
        "throughput_commands": total_cmds,
        "throughput_servers": n_servers,
    }
    workdir = Path(tempfile.mkdtemp(prefix="asyncstage-bench-cm-"))
    atexit.register(shutil.rmtree, workdir, True)  # ControlMaster sockets
    async with local_cloud(0.0) as (_cloud, m):
        servers = await m.provision_servers(n_servers)
        for s in servers:
            await s.scmd("true")  # warm: connection open, host key pinned
        one = servers[0]
        raw = await _raw_asyncssh(one)
        masters = [ControlMaster(s.host, workdir) for s in servers]
        try:
            for cm in masters:
                await to_thread(cm.start)
            new_conn = openssh_argv(one.host, "true")
            cm_argv = masters[0].client_argv("true")
            await to_thread(_ssh_loop, cm_argv, 3)  # warm the master and the page cache
            await to_thread(_ssh_loop, new_conn, 1)
            samples: dict[str, list[float]] = {k: [] for k in per_block}
            for _ in range(blocks):
                for _ in range(per_block["asyncstage"]):
                    t = time.perf_counter()
                    await one.scmd("true")
                    samples["asyncstage"].append(time.perf_counter() - t)
                for _ in range(per_block["asyncssh"]):
                    t = time.perf_counter()
                    await raw.run("true", check=True)
                    samples["asyncssh"].append(time.perf_counter() - t)
                samples["controlmaster"] += await to_thread(
                    _ssh_loop, cm_argv, per_block["controlmaster"]
                )
                samples["new_connection"] += await to_thread(
                    _ssh_loop, new_conn, per_block["new_connection"]
                )
            report.mark_load("after_latency")
            lat = {k: summary(v) for k, v in samples.items()}
            a = lat["asyncstage"]["median"]
            rows = []
            for key, label in (
                ("asyncstage", "asyncstage Server.scmd (warm connection)"),
                ("asyncssh", "raw asyncssh conn.run (reference)"),
                ("controlmaster", "OpenSSH ssh, ControlMaster"),
                ("new_connection", "OpenSSH ssh, new connection per command"),
            ):
                s = lat[key]
                rows.append([label, s["n"], ms(s["median"]), ms(s["p90"]), ratio(s["median"], a)])
            report.table(
                "Latency of one command (`true`)",
                ["method", "n", "median ms", "p90 ms", "× asyncstage"],
                rows,
            )

            # throughput
            cpu: dict[str, float] = {}
            with OwnCPU() as c:
                one_server = await _fanout([one], total_cmds)
            cpu["asyncstage_one_server"] = c.seconds
            with OwnCPU() as c:
                spread = await _fanout(servers, total_cmds)
            cpu["asyncstage_spread"] = c.seconds
            with OwnCPU() as c:
                cm_one = await to_thread(_parallel_ssh, [cm_argv] * total_cmds, 10)
            cpu["controlmaster_one_server"] = c.seconds
            spread_argv = [masters[i % len(masters)].client_argv("true") for i in range(total_cmds)]
            with OwnCPU() as c:
                cm_spread = await to_thread(_parallel_ssh, spread_argv, 10)
            cpu["controlmaster_spread"] = c.seconds
            report.mark_load("after_throughput")
        finally:
            raw.close()
            for cm in masters:
                cm.stop()
    serial_new = lat["new_connection"]["median"] * total_cmds
    tp: dict[str, Any] = {
        "asyncstage_one_server_s": round(one_server, 3),
        "asyncstage_spread_s": round(spread, 3),
        "controlmaster_10_parallel_one_server_s": round(cm_one, 3),
        "controlmaster_10_parallel_spread_s": round(cm_spread, 3),
        "new_connection_serial_s_derived": round(serial_new, 3),
    }
    report.table(
        f"Throughput: {total_cmds} commands (`true`)",
        ["method", "1 server: s", "cmd/s", f"{n_servers} servers: s", "cmd/s"],
        [
            [
                "asyncstage, all at once",
                one_server,
                total_cmds / one_server,
                spread,
                total_cmds / spread,
            ],
            [
                "OpenSSH ControlMaster, 10 clients at a time",
                cm_one,
                total_cmds / cm_one,
                cm_spread,
                total_cmds / cm_spread,
            ],
            [
                "OpenSSH new connection, one after another (median × N)",
                serial_new,
                total_cmds / serial_new,
                serial_new,
                total_cmds / serial_new,
            ],
        ],
    )
    tp["own_cpu_s"] = cpu
    report.table(
        f"CPU seconds for {total_cmds} commands (this process, the hosts' sshd and shells, "
        "the ssh clients; other people's processes excluded)",
        ["method", "1 server", f"{n_servers} servers"],
        [
            ["asyncstage", cpu["asyncstage_one_server"], cpu["asyncstage_spread"]],
            [
                "OpenSSH ControlMaster",
                cpu["controlmaster_one_server"],
                cpu["controlmaster_spread"],
            ],
        ],
    )
    report.results.update({"latency": lat, "throughput": tp})
    cm_ratio = ratio(a, lat["controlmaster"]["median"])
    new_ratio = ratio(lat["new_connection"]["median"], a)
    report.target(
        "latency_vs_controlmaster", cm_ratio, "<=", 0.75, "warm command latency / ControlMaster's"
    )
    report.target(
        "speedup_vs_new_connection",
        new_ratio,
        ">=",
        30,
        "new-connection-per-command latency / warm command latency",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
