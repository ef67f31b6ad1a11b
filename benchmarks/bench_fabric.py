"""Fabric as a baseline: the same commands and put, asyncstage vs Fabric, same servers.

On one local cloud, in the same run, the two taking turns (a b, b a, ...):

- fleet command: ``hostname`` on N servers at once. Fabric ``ThreadingGroup.run``;
  asyncstage ``scmd`` on every server in one task group. "cold" opens the connections
  (what a script running ``ThreadingGroup(...).run(...)`` does: Fabric builds new
  Connections, asyncstage's hosts are closed first); "warm" runs again over them.
- commands: ``true`` M times, one after another, on one server: through one Fabric
  ``Connection`` vs ``scmd`` (both connections open beforehand).
- put: one file of random bytes to one server: Fabric ``Connection.put`` (SFTP) vs
  asyncstage ``Server.put`` (rsync over OpenSSH); the remote file is removed before
  every run and its size checked after.

Fabric connects with the manager's key and its known_hosts, host keys verified
(paramiko's RejectPolicy: an unknown or changed host key fails), no ssh_config files,
no agent, no other keys; ``in_stream=False`` (nothing of this process's stdin is sent).

The fleet command also runs on raw asyncssh (``asyncssh.connect`` and ``conn.run``, no
asyncstage code on the way) before each of asyncstage's rounds: the same key, the same
pinned host key, cipher order and default key exchange, no config files, no agent. Its
controller CPU per server is the floor of the library asyncstage is built on, so the
CPU row shows asyncstage's own overhead apart from asyncssh's. asyncstage prepares
the connection options once for the fleet, which ``asyncssh.connect`` does for every
connection: it can come in under that floor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _baselines import (
    Alternate,
    BaselineReport,
    FleetRun,
    NotRun,
    Phases,
    client_cpu,
    left_out,
    make_file,
    median_splits,
    raw_fleet,
    set_cloud_aside,
)
from _common import (
    CPUAccounting,
    CPUSample,
    MiB,
    local_cloud,
    parse_args,
    to_thread,
)

from asyncstage import Manager, Server


def _fabric_missing() -> str | None:
    """Why Fabric cannot run here (None: it can)."""
    if (reason := left_out("fabric")) is not None:
        return reason
    try:
        import fabric  # noqa: F401
    except ImportError:
        return "fabric is not installed: pip install 'asyncstage[bench]' (make bench does)"
    return None


def _connection(m: Manager, server: Server) -> Any:
    """A Fabric Connection to ``server`` that verifies its host key."""
    import paramiko
    from fabric import Config, Connection

    host = server.host
    conn = Connection(
        host.address,
        user=host.username,
        port=host.port,
        config=Config(lazy=True, overrides={"load_ssh_configs": False}),
        connect_kwargs={
            "key_filename": [str(m.keyfile)],
            "look_for_keys": False,
            "allow_agent": False,
        },
        connect_timeout=30,
    )
    # Fabric's default is paramiko's AutoAddPolicy (any host key accepted): verify instead.
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client.load_host_keys(str(host.known_hosts.path))
    return conn


def _fabric_fleet(m: Manager, servers: list[Server], expected: list[str]) -> FleetRun:
    """ThreadingGroup.run("hostname"): new connections, then over them again, then closed."""
    from fabric import ThreadingGroup

    def check(results: Any) -> None:
        got = [results[c].stdout.strip() for c in conns]
        if got != expected:
            raise RuntimeError(f"Fabric hostname gave {got[:3]}... expected {expected[:3]}...")

    phases = Phases()
    t = time.perf_counter()
    conns = [_connection(m, s) for s in servers]
    group = ThreadingGroup.from_connections(conns)
    try:
        results = group.run("hostname", hide=True, in_stream=False)
        cold = time.perf_counter() - t
        phases.end("cold", CPUSample.now())
        check(results)
        t = time.perf_counter()
        results = group.run("hostname", hide=True, in_stream=False)
        warm = time.perf_counter() - t
        phases.end("warm", CPUSample.now())
        check(results)
    finally:
        group.close()
    phases.end("close", CPUSample.now())
    return FleetRun(cold, warm, phases.splits)


async def _ours_fleet(servers: list[Server], expected: list[str]) -> FleetRun:
    """scmd("hostname") on every server at once: connecting, connected, then closed."""
    out: dict[int, str] = {}

    async def one(i: int, server: Server) -> None:
        out[i] = (await server.scmd("hostname")).strip()

    async def run_all() -> float:
        out.clear()
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, server in enumerate(servers):
                tg.start_soon(one, i, server)
        wall = time.perf_counter() - t
        got = [out[i] for i in range(len(servers))]
        if got != expected:
            raise RuntimeError(f"hostname gave {got[:3]}... expected {expected[:3]}...")
        return wall

    async def close_all() -> None:
        async with anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(server.host.close)

    await close_all()  # cold: every connection opened anew, as Fabric's are
    phases: Phases = await to_thread(Phases)
    cold = await run_all()
    await to_thread(phases.end, "cold", CPUSample.now())
    warm = await run_all()
    await to_thread(phases.end, "warm", CPUSample.now())
    await close_all()
    await to_thread(phases.end, "close", CPUSample.now())
    return FleetRun(cold, warm, phases.splits)


async def _fleet(
    m: Manager, servers: list[Server], reps: int, missing: str | None
) -> dict[str, Any]:
    expected = [(await s.scmd("hostname")).strip() for s in servers]
    samples: dict[str, list[float]] = {"a_warm": [], "b_warm": []}
    splits: dict[str, list[dict[str, dict[str, Any]]]] = {
        "asyncstage": [],
        "fabric": [],
        "raw_asyncssh": [],
    }

    async def a() -> float:
        run = await _ours_fleet(servers, expected)
        samples["a_warm"].append(run.warm)
        splits["asyncstage"].append(run.splits)
        return run.cold

    async def b() -> float:
        if missing is not None:
            raise NotRun(missing)
        run: FleetRun = await to_thread(_fabric_fleet, m, servers, expected)
        samples["b_warm"].append(run.warm)
        splits["fabric"].append(run.splits)
        return run.cold

    async def before(side: str) -> None:
        if side == "a":  # raw asyncssh, untimed by Alternate: its CPU is in its own splits
            splits["raw_asyncssh"].append((await raw_fleet(servers, expected)).splits)

    cold = await Alternate().run(reps, a, b, before)
    # The warm runs ride on the cold ones: a baseline that did not run, did not run either.
    warm = Alternate(a=samples["a_warm"], b=samples["b_warm"], not_run=cold.not_run)
    return {
        "n": len(servers),
        "cold": cold.figures("fabric"),
        "warm": warm.figures("fabric"),
        "cpu": {side: median_splits(runs) for side, runs in splits.items()},
        "cold_controller_cpu_runs_s": {
            side: [r["cold"]["controller_cpu_s"] for r in runs] for side, runs in splits.items()
        },
    }


async def _commands(
    m: Manager, server: Server, n: int, reps: int, missing: str | None
) -> dict[str, Any]:
    conn = None if missing else _connection(m, server)
    if conn is not None:
        await to_thread(conn.open)
    await server.scmd("true")  # both connections open before the clock starts

    def fabric_run() -> None:
        if conn is None:
            raise NotRun(missing)
        for _ in range(n):
            conn.run("true", hide=True, in_stream=False)

    async def a() -> None:
        for _ in range(n):
            await server.scmd("true")

    async def b() -> None:
        await to_thread(fabric_run)

    try:
        alt = await Alternate().run(reps, a, b)
    finally:
        if conn is not None:
            conn.close()
    return alt.figures("fabric") | {"n": n}


async def _put(
    m: Manager, server: Server, local: Path, size: int, reps: int, missing: str | None
) -> dict[str, Any]:
    remote = "/tmp/bench-put.bin"
    conn = None if missing else _connection(m, server)
    if conn is not None:
        await to_thread(conn.open)

    async def check() -> None:
        got = int(await server.scmd("stat", "-c", "%s", remote))
        if got != size:
            raise RuntimeError(f"{remote} has {got} bytes, not {size}")

    async def a() -> float:
        t = time.perf_counter()
        await server.put(str(local), remote)
        wall = time.perf_counter() - t
        await check()
        return wall

    async def b() -> float:
        if conn is None:
            raise NotRun(missing or "")
        t = time.perf_counter()
        await to_thread(conn.put, str(local), remote)
        wall = time.perf_counter() - t
        await check()
        return wall

    async def before(_side: str) -> None:
        await server.scmd("rm", "-f", remote, sudo=True)

    try:
        alt = await Alternate().run(reps, a, b, before)
    finally:
        if conn is not None:
            conn.close()
    return alt.figures("fabric") | {"bytes": size}


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    n_servers = 3 if quick else 50
    n_commands = 20 if quick else 1000
    put_bytes = (4 if quick else 100) * MiB
    reps = 1 if quick else 3
    fleet_reps = 1 if quick else 5  # its CPU figures are judged on their median
    missing = _fabric_missing()
    report = BaselineReport("fabric", quick, args.results)
    report.params = {
        "servers": n_servers,
        "commands": n_commands,
        "put_bytes": put_bytes,
        "repeats": reps,
        "fleet_repeats": fleet_reps,
        "fabric_missing": missing,
    }
    if missing is None:
        import fabric
        import paramiko

        report.params |= {"fabric": fabric.__version__, "paramiko": paramiko.__version__}
    work = Path(tempfile.mkdtemp(prefix="asyncstage-bench-fabric-"))
    res: dict[str, Any] = {}
    try:
        local = make_file(work / "put.bin", put_bytes)
        # before the cloud starts: its instances are then in the group with this process
        with CPUAccounting() as accounting:
            report.params["instances_cpu_from"] = accounting.counted_by
            await _run_all(
                report, res, n_servers, n_commands, local, put_bytes, (fleet_reps, reps), missing
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.results.update(res)
    fleet, cmds, put = res["fleet"], res["commands"], res["put"]
    mb = put_bytes / 1e6
    report.table(
        "asyncstage vs Fabric on the same servers (medians, seconds; ratio = Fabric / asyncstage)",
        ["job", "asyncstage s", "Fabric s", "ratio"],
        [
            [f"hostname on {n_servers}, connecting", *_row(fleet["cold"])],
            [f"hostname on {n_servers}, connected", *_row(fleet["warm"])],
            [f"{n_commands} commands, one server", *_row(cmds)],
            [f"put {put_bytes // MiB} MiB file", *_row(put)],
        ],
    )
    _cpu_table(report, fleet)
    put["asyncstage_mb_s"] = round(mb / put["asyncstage_s"], 1)
    put["fabric_mb_s"] = round(mb / put["fabric_s"], 1) if put["fabric_s"] else None
    report.target_of(
        "fleet_command_vs_fabric",
        fleet["cold"],
        3,
        f"Fabric ThreadingGroup.run('hostname') on {n_servers} servers (connecting) / asyncstage",
    )
    client = _client_cpu(fleet)
    report.target_of(
        "fleet_command_client_cpu_vs_fabric",
        client,
        3,
        f"controller CPU per server of the fleet command on {n_servers} servers (connecting): "
        "Fabric / asyncstage (what decides on EC2, where every server has its own CPUs)",
    )
    report.target_of(
        "fleet_command_warm_vs_fabric",
        fleet["warm"],
        1,
        f"the same over open connections, Fabric / asyncstage ({n_servers} servers)",
    )
    report.target_of(
        "commands_vs_fabric",
        cmds,
        1,
        f"{n_commands} sequential commands: Fabric Connection.run / asyncstage scmd",
    )
    report.target_of(
        "put_vs_fabric", put, 1, f"put of a {put_bytes // MiB} MiB file: Fabric SFTP / asyncstage"
    )
    report.save()


async def _run_all(
    report: BaselineReport,
    res: dict[str, Any],
    n_servers: int,
    n_commands: int,
    local: Path,
    put_bytes: int,
    repeats: tuple[int, int],
    missing: str | None,
) -> None:
    """The three jobs on one local cloud, their figures into ``res`` (``repeats``: the
    fleet's rounds, the others')."""
    fleet_reps, reps = repeats
    async with local_cloud(0.0) as (cloud, m):
        servers = await m.provision_servers(n_servers)
        set_cloud_aside()
        print(f"hostname on {n_servers} servers")
        calls = sum(cloud.api_calls.values())
        res["fleet"] = await _fleet(m, servers, fleet_reps, missing)
        res["fleet"]["api_calls"] = sum(cloud.api_calls.values()) - calls
        report.mark_load("after_fleet")
        print(f"{n_commands} commands on one server")
        res["commands"] = await _commands(m, servers[0], n_commands, max(1, reps - 1), missing)
        report.mark_load("after_commands")
        print(f"put of {put_bytes // MiB} MiB")
        res["put"] = await _put(m, servers[0], local, put_bytes, reps, missing)
        report.mark_load("after_put")


def _client_cpu(fleet: dict[str, Any]) -> dict[str, Any]:
    """The controller's CPU per server of the cold fleet command, against Fabric and raw
    asyncssh (:func:`_baselines.client_cpu`), kept in ``fleet["client_cpu"]``."""
    figures = client_cpu(fleet["n"], fleet["cold_controller_cpu_runs_s"], "fabric")
    if figures["ratio"] is None:
        figures["not_run"] = fleet["cold"].get("not_run")
    fleet["client_cpu"] = figures
    return figures


def _cpu_table(report: BaselineReport, fleet: dict[str, Any]) -> None:
    """Where the time of the fleet command went, side by side."""
    n, cores = fleet["n"], os.cpu_count() or 1
    rows: list[list[Any]] = []
    sides = (("asyncstage", "asyncstage"), ("raw_asyncssh", "raw asyncssh"), ("fabric", "Fabric"))
    for side, label in sides:
        for phase, splits in fleet["cpu"].get(side, {}).items():
            rows.append(
                [
                    f"{label} {phase}",
                    splits["wall_s"],
                    splits["controller_cpu_s"],
                    round(1000 * splits["controller_cpu_s"] / n, 2),
                    splits["instances_cpu_s"],
                    round(splits["instances_cpu_s"] / cores, 3),
                    splits["cloud_cpu_s"],
                    splits.get("idle_share", "-"),
                ]
            )
    report.table(
        f"where the fleet command's time went, {n} servers on {cores} cores (medians; CPU s)",
        [
            "side, phase",
            "wall s",
            "controller",
            "ms/server",
            "instances",
            f"/ {cores} cores",
            "cloud",
            "idle share",
        ],
        rows,
    )


def _row(figures: dict[str, Any]) -> list[Any]:
    if figures["fabric_s"] is None:
        return [figures["asyncstage_s"], "not run", "-"]
    return [figures["asyncstage_s"], figures["fabric_s"], figures["ratio"]]


if __name__ == "__main__":
    anyio.run(main)
