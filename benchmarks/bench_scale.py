"""Scale: a fleet of 200, a controller with 250 connected servers, 2,000 commands at once.

- fleet: ``provision_servers(N)`` until every server answers ssh, N = 1 and 200 (the
  local cloud's ``boot_delay`` emulates EC2's pending time), as in ``bench_fleet.py``:
  wall time against one server's, DescribeInstances calls per poll round (counted at
  the endpoint, ``cloud.api_calls``), and the calls the fleet made (a throttled call
  is retried by botocore and counted again: none beyond one per server and round).
  "cloud all running" is when the cloud itself switched the last instance to running
  (its own boot work for N hosts on this machine's cores), "then up" the library's part.
  CPU seconds of every process involved (this process, which runs the cloud and the
  controller, and its descendants: the hosts, their sshd) and how busy the machine
  was show what the emulation of N hosts costs on this machine's cores.
- controller: a fresh process (``bench_controller.py``'s ``servers`` scenario)
  provisions 250 servers, runs one command on each and keeps the 250 connections open;
  its peak RSS (``VmHWM``).
- commands: 2,000 ``scmd`` at once spread over 50 servers (40 each, every one with its
  own output checked): how many succeeded, the wall time.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import anyio
from _common import MachineCPU, OwnCPU, Report, local_cloud, parse_args, ratio, to_thread
from bench_controller import _child_info, _run_child
from bench_fleet import _concurrent

from asyncstage import Manager, Server
from asyncstage.localcloud import LocalCloud


async def _commands(m: Manager, n_servers: int, n_commands: int) -> dict[str, Any]:
    """``n_commands`` scmd at once over ``n_servers`` servers: successes, failures, time."""
    servers = await m.provision_servers(n_servers)
    ok = 0
    failures: Counter[str] = Counter()

    async def one(server: Server, i: int) -> None:
        nonlocal ok
        try:
            out = await server.scmd("echo", str(i))
        except Exception as e:  # counted and reported: the target is that none fail
            failures[f"{type(e).__name__}: {e}"[:200]] += 1
            return
        if out == f"{i}\n":
            ok += 1
        else:
            failures[f"wrong output {out[:40]!r}"] += 1

    try:
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n_commands):
                tg.start_soon(one, servers[i % n_servers], i)
        wall = time.perf_counter() - t
    finally:
        await m.terminate_servers(servers)
    return {
        "servers": n_servers,
        "commands": n_commands,
        "succeeded": ok,
        "failed": sum(failures.values()),
        "failures": dict(failures.most_common(5)),
        "wall_s": round(wall, 3),
        "per_second": round(n_commands / wall, 1) if wall else None,
    }


async def _controller(cloud: LocalCloud, m: Manager, n: int) -> dict[str, Any]:
    """Peak RSS of a fresh controller process with ``n`` connected servers."""
    info = _child_info(cloud, m)
    idle = await to_thread(_run_child, "idle", info, 0, 0)
    servers = await to_thread(_run_child, "servers", info, n, 0)
    await m.ec2.terminate_instances([iid for iid, _ in servers["servers"]])
    return {
        "servers": n,
        "connected": servers.get("connected"),
        "idle_peak_rss_mb": idle["peak_rss_mb"],
        "peak_rss_mb": servers["peak_rss_mb"],
        "rss_at_end_mb": servers["rss_now_mb"],
        "wall_s": servers["wall_s"],
        "cpu_s": servers["cpu_s"],
        "rss_per_server_mb": round((servers["rss_now_mb"] - idle["rss_now_mb"]) / n, 3),
    }


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    fleet = 4 if quick else 200
    connected = 4 if quick else 250
    spread, n_commands = (2, 40) if quick else (50, 2000)
    boot_delay = 0.3 if quick else 5.0
    cores = os.cpu_count() or 1
    report = Report("scale", quick, args.results)
    report.params = {
        "fleet_sizes": [1, fleet],
        "boot_delay_s": boot_delay,
        "poll_interval_s": 0.5,
        "controller_servers": connected,
        "command_servers": spread,
        "commands": n_commands,
    }
    async with local_cloud(boot_delay, poll_interval=0.5) as (cloud, m):
        runs = []
        for n in (1, fleet):
            # CPU: every process of the run (the cloud's hosts and their sshd, this
            # process); the machine's share busy: whether the cores were the limit.
            with OwnCPU() as cpu, MachineCPU() as busy:
                run = await _concurrent(cloud, m, n)
            runs.append(run | {"own_cpu_s": cpu.seconds, "machine_busy": busy.busy})
            runs[-1]["cpu_floor_s"] = round(cpu.seconds / cores, 3)
            print(f"fleet of {n}: {runs[-1]}")
        report.mark_load("after_fleet")
        commands = await _commands(m, spread, n_commands)
        print(f"commands: {commands}")
        report.mark_load("after_commands")
        controller = await _controller(cloud, m, connected)
        print(f"controller: {controller}")
        report.mark_load("after_controller")
    single, big = runs
    report.table(
        f"Fleet at scale: provision N servers until all answer ssh (boot_delay {boot_delay:g} s)",
        [
            "N",
            "wall s",
            "× single",
            "cloud all running s",
            "then up s",
            "poll rounds",
            "Describe/round",
            "own CPU s",
            "machine busy",
            "API calls",
        ],
        [
            [
                r["n"],
                r["wall_s"],
                ratio(r["wall_s"], single["wall_s"]),
                r["cloud_last_running_s"],
                round(r["wall_s"] - r["cloud_last_running_s"], 3),
                r["describe_rounds"],
                r["describe_calls_per_round"],
                r["own_cpu_s"],
                r["machine_busy"],
                ", ".join(f"{k} {v}" for k, v in r["api_calls"].items()),
            ]
            for r in runs
        ],
    )
    report.table(
        "Commands at once and a controller with many connections",
        ["what", "figure"],
        [
            [
                f"{n_commands} scmd at once over {spread} servers",
                f"{commands['succeeded']} succeeded, {commands['failed']} failed, "
                f"{commands['wall_s']} s ({commands['per_second']}/s)",
            ],
            [
                f"controller with {connected} connected servers",
                f"peak RSS {controller['peak_rss_mb']} MB (idle Manager "
                f"{controller['idle_peak_rss_mb']} MB), {controller['cpu_s']} CPU s",
            ],
        ],
    )
    report.results.update({"fleet": runs, "commands": commands, "controller": controller})
    report.target(
        f"fleet_{fleet}_vs_single",
        ratio(big["wall_s"], single["wall_s"]),
        "<=",
        1.3,
        f"wall time of a fleet of {fleet} relative to a single server",
    )
    report.target(
        f"fleet_{fleet}_describe_calls_per_round",
        max(r["describe_calls_per_round"] for r in runs),
        "<=",
        1,
        f"DescribeInstances calls per poll round, fleets of 1 and {fleet}",
        unit="",
    )
    report.target(
        f"peak_rss_{connected}_servers_mb",
        controller["peak_rss_mb"],
        "<",
        250,
        f"controller peak RSS with {connected} connected servers",
        unit=" MB",
    )
    report.target(
        f"commands_{n_commands}_failed",
        commands["failed"] + (n_commands - commands["succeeded"] - commands["failed"]),
        "<=",
        0,
        f"of {n_commands} concurrent commands over {spread} servers, how many failed",
        unit="",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
