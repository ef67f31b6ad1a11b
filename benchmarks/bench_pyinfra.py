"""pyinfra as a baseline: a command, facts and a file put on every server of one fleet.

On the same N servers of one local cloud, in the same run, asyncstage and pyinfra take
turns (a b, b a, ...; medians, and the spread of the rounds' ratios):

- command: ``hostname`` on every server, connecting. pyinfra: ``connect_all``, a
  ``server.shell`` operation, ``run_ops`` (what ``pyinfra INVENTORY exec -- hostname``
  does); asyncstage: ``scmd("hostname")`` on every server in one task group, its
  connections closed first. Also the controller's CPU for it, per server (what
  decides on EC2, where every server has its own CPUs, while here the servers' sshd
  share the controller's cores): asyncstage's process (the local cloud's threads in
  it left out), pyinfra's (its driver's, children included), and raw asyncssh's
  (``_baselines.raw_fleet``: ``asyncssh.connect`` and ``conn.run``, no asyncstage code)
  right before each of asyncstage's rounds, the floor of the library it is built on.
- facts: ``uname -a`` and ``df -P /`` from every server, over the open connections
  (both sides connected: the connecting is the command's figure).
  pyinfra: ``get_facts(state, Command, ...)``, one fact at a time over the fleet;
  asyncstage: ``scmd`` on every server, one command at a time over the fleet. A
  round is short (a tenth of a second of work) and the machine is shared, so each
  side takes it ``FACT_REPEATS`` times in its turn and its round's figure is their
  median. The answers are compared: both sides must see the same servers.
- put: one file of random bytes to every server at once. pyinfra ``files.put``
  (SFTP; its connections opened before the clock starts); asyncstage ``Server.put``
  (rsync over OpenSSH). The remote file is removed before every run and its size
  checked on every server after.

pyinfra runs in a process of its own (``pyinfra_driver.py``: gevent, as its CLI) that
times each job itself, so its start-up is left out. It connects with the manager's key
and each server's known_hosts, host keys verified (``ssh_strict_host_key_checking=yes``),
no agent, no other keys, to the servers' loopback addresses only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _baselines import (
    Alternate,
    BaselineReport,
    client_cpu,
    left_out,
    make_file,
    raw_fleet,
    set_cloud_aside,
)
from _common import (
    HERE,
    CPUAccounting,
    CPUSample,
    MiB,
    cpu_split,
    local_cloud,
    parse_args,
    settled_sample,
    to_thread,
)

from asyncstage import Server
from asyncstage.localcloud._network import RUNNING_RANGES

DRIVER = HERE / "pyinfra_driver.py"
REMOTE = "/tmp/bench-pyinfra-put.bin"
FACTS = ("uname -a", "df -P /")
FACT_REPEATS = 7
JOBS = ("command", "facts", "put")


def _pyinfra_missing() -> str | None:
    """Why pyinfra cannot run here (None: it can)."""
    if (reason := left_out("pyinfra")) is not None:
        return reason
    if importlib.util.find_spec("pyinfra") is None:
        return "pyinfra is not installed: pip install 'asyncstage[bench]' (make bench does)"
    return None


def _spec(servers: list[Server], local: Path, work: Path) -> Path:
    first = servers[0]
    spec = {
        # the running local cloud's public range: the driver connects there or to loopback
        "cloud_ranges": [str(r) for r in RUNNING_RANGES],
        "user": first.username,
        "key": str(first.keyfile),
        "hosts": [
            {
                "address": s.host.address,
                "port": s.host.port,
                "known_hosts": str(s.host.known_hosts.path),
            }
            for s in servers
        ],
        "put_src": str(local),
        "put_dest": REMOTE,
        "fact_repeats": FACT_REPEATS,
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _pyinfra_round(spec: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"pyinfra driver failed ({done.returncode}): {done.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(lines[-1])
    answer["facts_s"] = statistics.median(answer.pop("facts_runs_s"))
    return answer


async def _on_all(servers: list[Server], *cmd: str, sudo: bool = False) -> list[str]:
    out: dict[int, str] = {}

    async def one(i: int, server: Server) -> None:
        out[i] = await server.scmd(*cmd, sudo=sudo)

    async with anyio.create_task_group() as tg:
        for i, server in enumerate(servers):
            tg.start_soon(one, i, server)
    return [out[i] for i in range(len(servers))]


async def _ours_round(servers: list[Server], local: Path) -> dict[str, Any]:
    async with anyio.create_task_group() as tg:  # connecting, as pyinfra's command does
        for server in servers:
            tg.start_soon(server.host.close)
    start: CPUSample = await to_thread(settled_sample)
    t = time.perf_counter()
    names = await _on_all(servers, "hostname")
    out: dict[str, Any] = {"command_s": time.perf_counter() - t, "hostnames": names}
    # What the command cost the instances (their sshd: fork, key exchange, auth, the
    # session, the shell), the same whoever connects: a floor under both sides' times.
    end = CPUSample.now()
    out["command_cpu"] = cpu_split(start, end, await to_thread(settled_sample))
    times = []
    for _ in range(FACT_REPEATS):
        t = time.perf_counter()
        uname = await _on_all(servers, FACTS[0])
        df = await _on_all(servers, FACTS[1])
        times.append(time.perf_counter() - t)
    out["facts_s"] = statistics.median(times)
    out["facts"] = {s.host.address: [u, d] for s, u, d in zip(servers, uname, df, strict=True)}

    async def put(server: Server) -> None:
        await server.put(str(local), REMOTE)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for server in servers:
            tg.start_soon(put, server)
    out["put_s"] = time.perf_counter() - t
    return out


async def _check_put(servers: list[Server], size: int) -> None:
    sizes = await _on_all(servers, "stat", "-c", "%s", REMOTE)
    wrong = [(s.host.address, got.strip()) for s, got in zip(servers, sizes, strict=True)]
    wrong = [w for w in wrong if w[1] != str(size)]
    if wrong:
        raise RuntimeError(f"{REMOTE} has the wrong size on {len(wrong)} servers: {wrong[:3]}")


def _same_facts(ours: dict[str, list[str]], theirs: dict[str, list[str]]) -> None:
    """Both sides saw the same servers: uname alike, a df table from each."""
    for address, (uname, df) in ours.items():
        other = theirs.get(address)
        if other is None:
            raise RuntimeError(f"pyinfra gave no facts of {address}")
        if other[0].strip() != uname.strip() or not other[1].startswith("Filesystem"):
            raise RuntimeError(f"pyinfra's facts of {address} differ: {other!r} vs {uname!r}")
        if not df.startswith("Filesystem"):
            raise RuntimeError(f"df on {address} gave {df[:80]!r}")


async def _rounds(
    servers: list[Server], local: Path, size: int, spec: Path, reps: int, missing: str | None
) -> tuple[dict[str, Alternate], list[float], dict[str, list[float]]]:
    """Each job's rounds, the instances' CPU seconds in each of our command runs, and
    each side's controller CPU seconds in each of its command runs."""
    alts = {job: Alternate() for job in JOBS}
    sshd: list[float] = []
    cpu: dict[str, list[float]] = {"asyncstage": [], "raw_asyncssh": [], "pyinfra": []}
    expected = [(await s.scmd("hostname")) for s in servers]
    facts: dict[str, dict[str, list[str]]] = {}
    for rep in range(reps):
        order = ["a", "b"] if rep % 2 == 0 else ["b", "a"]
        for side in order:
            if side == "b" and missing is not None:
                continue
            await _on_all(servers, "rm", "-f", REMOTE, sudo=True)  # Server.put's is root's
            if side == "a":
                raw = await raw_fleet(servers, [e.strip() for e in expected])
                cpu["raw_asyncssh"].append(raw.splits["cold"]["controller_cpu_s"])
                got = await _ours_round(servers, local)
                if got["hostnames"] != expected:
                    raise RuntimeError(f"hostname gave {got['hostnames'][:3]}...")
                facts["asyncstage"] = got["facts"]
                sshd.append(got["command_cpu"]["instances_cpu_s"])
                cpu["asyncstage"].append(got["command_cpu"]["controller_cpu_s"])
            else:
                got = await to_thread(_pyinfra_round, spec)
                facts["pyinfra"] = got["facts"]
                cpu["pyinfra"].append(got["command_cpu_s"])
            await _check_put(servers, size)
            who = "asyncstage" if side == "a" else "pyinfra"
            print(f"  {who}: " + ", ".join(f"{j} {got[f'{j}_s']:.3f} s" for j in JOBS))
            for job in JOBS:
                getattr(alts[job], side).append(got[f"{job}_s"])
    if missing is not None:
        for alt in alts.values():
            alt.not_run = missing
    else:
        _same_facts(facts["asyncstage"], facts["pyinfra"])
    return alts, sshd, cpu


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    n_servers = 3 if quick else 50
    put_bytes = (1 if quick else 100) * MiB
    reps = 1 if quick else 3
    # A shorter run on a shared machine: ASYNCSTAGE_BENCH_PYINFRA="SERVERS,MIB,ROUNDS"
    # (recorded in the JSON's params like every size).
    if tune := os.environ.get("ASYNCSTAGE_BENCH_PYINFRA"):
        n_text, mib_text, reps_text = tune.split(",")
        n_servers, put_bytes, reps = int(n_text), int(mib_text) * MiB, int(reps_text)
    missing = _pyinfra_missing()
    report = BaselineReport("pyinfra", quick, args.results)
    report.params = {
        "servers": n_servers,
        "put_bytes": put_bytes,
        "repeats": reps,
        "facts": list(FACTS),
        "fact_repeats_per_round": FACT_REPEATS,
        "pyinfra_missing": missing,
    }
    if missing is None:
        from importlib.metadata import version

        report.params |= {"pyinfra": version("pyinfra"), "paramiko": version("paramiko")}
    work = Path(tempfile.mkdtemp(prefix="asyncstage-bench-pyinfra-"))
    try:
        local = make_file(work / "put.bin", put_bytes)
        # before the cloud starts: its instances are then in the group with this process
        with CPUAccounting() as accounting:
            report.params["instances_cpu_from"] = accounting.counted_by
            async with local_cloud(0.0) as (_cloud, m):
                servers = await m.provision_servers(n_servers)
                set_cloud_aside()
                spec = _spec(servers, local, work)
                alts, sshd, cpu = await _rounds(servers, local, put_bytes, spec, reps, missing)
                report.mark_load("after_rounds")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {job: alt.figures("pyinfra") for job, alt in alts.items()}
    if sshd:
        figures["command"]["instances_cpu_s"] = round(statistics.median(sshd), 4)
    client = client_cpu(n_servers, cpu, "pyinfra")
    if client["ratio"] is None:
        client["not_run"] = missing
    figures["command_client_cpu"] = client
    report.results.update(figures)
    mb = put_bytes * n_servers / 1e6
    put = figures["put"]
    put["asyncstage_mb_s"] = round(mb / put["asyncstage_s"], 1)
    put["pyinfra_mb_s"] = round(mb / put["pyinfra_s"], 1) if put["pyinfra_s"] else None
    report.table(
        f"asyncstage vs pyinfra on the same {n_servers} servers "
        "(medians, seconds; ratio = pyinfra / asyncstage, [lowest, highest] round)",
        ["job", "asyncstage s", "pyinfra s", "ratio", "spread"],
        [
            [f"hostname on {n_servers}, connecting", *_row(figures["command"])],
            [f"facts (uname, df) from {n_servers}", *_row(figures["facts"])],
            [f"put {put_bytes // MiB} MiB to {n_servers}", *_row(put)],
        ],
    )
    report.table(
        f"controller CPU per server of hostname on {n_servers}, connecting (medians, ms)",
        ["asyncstage", "raw asyncssh", "pyinfra", "pyinfra / asyncstage", "spread"],
        [
            [
                client["asyncstage_ms_per_server"],
                client.get("raw_asyncssh_ms_per_server", "-"),
                client.get("pyinfra_ms_per_server", "not run"),
                client["ratio"] or "-",
                "-"
                if not client.get("ratio_spread")
                else "{:.2f}-{:.2f}".format(*client["ratio_spread"]),
            ]
        ],
    )
    report.target_of(
        "fleet_command_vs_pyinfra",
        figures["command"],
        2,
        f"pyinfra exec of hostname on {n_servers} servers (connecting) / asyncstage",
    )
    report.target_of(
        "fleet_command_client_cpu_vs_pyinfra",
        client,
        2,
        f"controller CPU per server of the fleet command on {n_servers} servers (connecting): "
        "pyinfra / asyncstage (what decides on EC2, where every server has its own CPUs)",
    )
    report.target_of(
        "facts_vs_pyinfra",
        figures["facts"],
        1,
        f"pyinfra get_facts (uname -a, df -P /) from {n_servers} servers / asyncstage scmd",
        **_facts_evidence(figures["facts"], reps),
    )
    report.target_of(
        "put_vs_pyinfra",
        put,
        1,
        f"put of a {put_bytes // MiB} MiB file to {n_servers} servers: pyinfra files.put "
        "(SFTP) / asyncstage Server.put (rsync)",
    )
    report.save()


def _facts_evidence(facts: dict[str, Any], reps: int) -> dict[str, str]:
    """Both sides connected, each round's figure the median of its repeats."""
    if facts.get("pyinfra_s") is None:
        return {}
    lo, hi = facts.get("ratio_spread") or (facts["ratio"], facts["ratio"])
    return {
        "bound": "library",
        "evidence": (
            f"both sides over open connections; {reps} rounds each side, taken in turn, "
            f"each the median of {FACT_REPEATS} repeats: asyncstage {facts['asyncstage_s']:.3g} "
            f"s, pyinfra {facts['pyinfra_s']:.3g} s; rounds' ratios {lo:g}-{hi:g}"
        ),
    }


def _row(figures: dict[str, Any]) -> list[Any]:
    if figures["pyinfra_s"] is None:
        return [figures["asyncstage_s"], "not run", "-", "-"]
    spread = figures.get("ratio_spread")
    return [
        figures["asyncstage_s"],
        figures["pyinfra_s"],
        figures["ratio"],
        "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}",
    ]


if __name__ == "__main__":
    anyio.run(main)
