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
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _baselines import Alternate, BaselineReport, NotRun, left_out, make_file
from _common import MiB, local_cloud, parse_args, to_thread

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


def _fabric_fleet(m: Manager, servers: list[Server], expected: list[str]) -> tuple[float, float]:
    """Seconds of ThreadingGroup.run("hostname"): new connections, then over them again."""
    from fabric import ThreadingGroup

    def check(results: Any) -> None:
        got = [results[c].stdout.strip() for c in conns]
        if got != expected:
            raise RuntimeError(f"Fabric hostname gave {got[:3]}... expected {expected[:3]}...")

    t = time.perf_counter()
    conns = [_connection(m, s) for s in servers]
    group = ThreadingGroup.from_connections(conns)
    results = group.run("hostname", hide=True, in_stream=False)
    cold = time.perf_counter() - t
    check(results)
    try:
        t = time.perf_counter()
        results = group.run("hostname", hide=True, in_stream=False)
        warm = time.perf_counter() - t
        check(results)
    finally:
        group.close()
    return cold, warm


async def _ours_fleet(servers: list[Server], expected: list[str]) -> tuple[float, float]:
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

    for server in servers:  # cold: every connection opened again, as Fabric's are
        await server.host.close()
    cold = await run_all()
    warm = await run_all()
    return cold, warm


async def _fleet(
    m: Manager, servers: list[Server], reps: int, missing: str | None
) -> dict[str, Any]:
    expected = [(await s.scmd("hostname")).strip() for s in servers]
    samples: dict[str, list[float]] = {"a_warm": [], "b_warm": []}

    async def a() -> float:
        cold, warm = await _ours_fleet(servers, expected)
        samples["a_warm"].append(warm)
        return cold

    async def b() -> float:
        if missing is not None:
            raise NotRun(missing)
        cold, warm = await to_thread(_fabric_fleet, m, servers, expected)
        samples["b_warm"].append(warm)
        return float(cold)

    cold = await Alternate().run(reps, a, b)
    # The warm runs ride on the cold ones: a baseline that did not run, did not run either.
    warm = Alternate(a=samples["a_warm"], b=samples["b_warm"], not_run=cold.not_run)
    return {"n": len(servers), "cold": cold.figures("fabric"), "warm": warm.figures("fabric")}


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
    n_servers = 5 if quick else 50
    n_commands = 20 if quick else 1000
    put_bytes = (4 if quick else 100) * MiB
    reps = 1 if quick else 3
    missing = _fabric_missing()
    report = BaselineReport("fabric", quick, args.results)
    report.params = {
        "servers": n_servers,
        "commands": n_commands,
        "put_bytes": put_bytes,
        "repeats": reps,
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
        async with local_cloud(0.0) as (_cloud, m):
            servers = await m.provision_servers(n_servers)
            print(f"hostname on {n_servers} servers")
            res["fleet"] = await _fleet(m, servers, reps, missing)
            report.mark_load("after_fleet")
            print(f"{n_commands} commands on one server")
            res["commands"] = await _commands(m, servers[0], n_commands, max(1, reps - 1), missing)
            report.mark_load("after_commands")
            print(f"put of {put_bytes // MiB} MiB")
            res["put"] = await _put(m, servers[0], local, put_bytes, reps, missing)
            report.mark_load("after_put")
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
    put["asyncstage_mb_s"] = round(mb / put["asyncstage_s"], 1)
    put["fabric_mb_s"] = round(mb / put["fabric_s"], 1) if put["fabric_s"] else None
    report.target_of(
        "fleet_command_vs_fabric",
        fleet["cold"],
        3,
        f"Fabric ThreadingGroup.run('hostname') on {n_servers} servers (connecting) / asyncstage",
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


def _row(figures: dict[str, Any]) -> list[Any]:
    if figures["fabric_s"] is None:
        return [figures["asyncstage_s"], "not run", "-"]
    return [figures["asyncstage_s"], figures["fabric_s"], figures["ratio"]]


if __name__ == "__main__":
    anyio.run(main)
