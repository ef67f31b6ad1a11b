"""Controller cost: CPU seconds and peak RSS of the process that drives the fleet.

The local cloud runs in this (parent) process; the controller runs in a fresh
subprocess (``--child SCENARIO``) with a Manager pointed at the cloud's endpoint,
so that its RSS and CPU are its own. Peak RSS is the child's ``VmHWM`` (getrusage's
``ru_maxrss`` would show the parent's RSS, carried over fork and exec); CPU is
``getrusage(RUSAGE_SELF)``:

- ``idle``: Python, asyncstage and the EC2 client loaded, a Manager opened — the floor;
- ``servers``: ``provision_servers(100)``, then ``scmd("true")`` on every one, all 100
  connections left open while measuring;
- ``transfers``: 8 rsync transfers server→server at once (data flows between the
  servers directly; the controller only orchestrates).

Baseline for ``servers``: 100 OpenSSH ControlMaster processes to the same servers
(what a shell-script controller keeps open to have warm connections), their summed
peak RSS (VmHWM) and CPU seconds, one ``true`` run through each.
"""

from __future__ import annotations

import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from _common import (
    HERE,
    ControlMaster,
    MiB,
    Report,
    cpu_times_of,
    local_cloud,
    parse_args,
    ratio,
    to_thread,
)

if TYPE_CHECKING:
    from asyncstage import Manager
    from asyncstage.localcloud import LocalCloud


@dataclass
class _CloudInfo:
    """What ``local_manager`` needs of a LocalCloud, passed to the child."""

    endpoint_url: str
    region: str
    image_id: str
    default_username: str
    access: dict[str, str]
    checkip_url: str = ""  # the cloud's checkip (its network): where this machine comes from

    def session_kwargs(self) -> dict[str, str]:
        return self.access


def _status_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM ...) in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def _usage() -> dict[str, float]:
    # Peak RSS is VmHWM, the high-water mark of this process's own memory: getrusage's
    # ru_maxrss would report the parent's RSS, inherited across fork and exec.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": round(r.ru_utime + r.ru_stime, 3),
        "peak_rss_mb": _status_mb("VmHWM"),
    }


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


async def _child(scenario: str, info: dict[str, Any], count: int, size: int) -> dict[str, Any]:
    from asyncstage import transfer
    from asyncstage.manager import local_manager

    cloud = _CloudInfo(**info["cloud"])
    out: dict[str, Any] = {"scenario": scenario}
    t = time.perf_counter()
    async with local_manager(
        cloud, dotdir=info["dotdir"], scan=False, on_exit="run", verbosity=0
    ) as m:
        if scenario == "idle":
            pass
        elif scenario == "servers":
            servers = await m.provision_servers(count)
            async with anyio.create_task_group() as tg:
                for s in servers:
                    tg.start_soon(s.scmd, "true")
            out["connected"] = sum(1 for s in servers if s.host._conn.open_link() is not None)
            out["servers"] = [[s.instance_id, s.address] for s in servers]
        elif scenario == "transfers":
            servers = await m.provision_servers(2 * count)
            pairs = [(servers[2 * i], servers[2 * i + 1]) for i in range(count)]

            async def prepare(a: Any, b: Any) -> None:
                await a.scmd(
                    "sh",
                    "-c",
                    f"mkdir -p /srv/c && head -c {size} /dev/urandom > /srv/c/data",
                    sudo=True,
                )
                await b.scmd("mkdir", "-p", "/srv/c", sudo=True)

            async with anyio.create_task_group() as tg:
                for a, b in pairs:
                    tg.start_soon(prepare, a, b)
            before = _usage()
            t2 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for a, b in pairs:
                    tg.start_soon(transfer.rsync, m, f"{a}:/srv/c/data", f"{b}:/srv/c/copy")
            out["transfer_wall_s"] = round(time.perf_counter() - t2, 3)
            out["transfer_cpu_s"] = round(_usage()["cpu_s"] - before["cpu_s"], 3)
            out["servers"] = [[s.instance_id, s.address] for s in servers]
        out["wall_s"] = round(time.perf_counter() - t, 3)
        out["rss_now_mb"] = _rss_now_mb()
        out.update(_usage())
    return out


def _child_info(cloud: LocalCloud, m: Manager) -> dict[str, Any]:
    """What a child process needs to reach the cloud and the manager's key pair."""
    return {
        "cloud": {
            "endpoint_url": cloud.endpoint_url,
            "region": cloud.region,
            "image_id": cloud.image_id,
            "default_username": cloud.default_username,
            "access": cloud.session_kwargs(),
            "checkip_url": cloud.checkip_url,
        },
        "dotdir": str(m.dotdir),
    }


def _run_child(scenario: str, info: dict[str, Any], count: int, size: int) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "bench_controller.py"), "--child", scenario]
    done = subprocess.run(
        [*argv, "--info", json.dumps(info), "--count", str(count), "--size", str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"controller child {scenario} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _peak_rss_mb(pid: int) -> float:
    return _status_mb("VmHWM", pid)


async def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index
        scenario = sys.argv[i("--child") + 1]
        info = json.loads(sys.argv[i("--info") + 1])
        count = int(sys.argv[i("--count") + 1])
        size = int(sys.argv[i("--size") + 1])
        print(json.dumps(await _child(scenario, info, count, size)))
        return
    args = parse_args(__doc__ or "")
    n_servers = 2 if args.quick else 100
    n_transfers = 2 if args.quick else 8
    size = 4 * MiB if args.quick else 64 * MiB
    report = Report("controller", args.quick, args.results)
    report.params = {
        "servers": n_servers,
        "transfers": n_transfers,
        "transfer_bytes_each": size,
    }
    workdir = Path(tempfile.mkdtemp(prefix="asyncstage-bench-cm-"))
    atexit.register(shutil.rmtree, workdir, True)  # ControlMaster sockets
    async with local_cloud(0.0) as (cloud, m):
        info = _child_info(cloud, m)
        idle = await to_thread(_run_child, "idle", info, 0, 0)
        servers = await to_thread(_run_child, "servers", info, n_servers, 0)
        report.mark_load("after_servers_child")

        # baseline: one OpenSSH ControlMaster per server, same key and known_hosts
        from asyncstage.ssh import SSHHost

        hosts = [
            SSHHost(
                address,
                username=cloud.default_username,
                client_keys=[m.keyfile],
                known_hosts=m.known_hosts.path,
                host_key_policy="strict",
            )
            for _, address in servers["servers"]
        ]
        masters = [ControlMaster(h, workdir) for h in hosts]
        t = time.perf_counter()
        try:
            for cm in masters:
                cm.spawn()
            for cm in masters:
                while not await to_thread(cm.ready):  # noqa: ASYNC110 (polling a process)
                    await anyio.sleep(0.05)

            def run_all() -> None:
                procs = [subprocess.Popen(cm.client_argv("true")) for cm in masters]
                for p in procs:
                    p.wait()

            await to_thread(run_all)
            cm_wall = time.perf_counter() - t
            pids = [cm.proc.pid for cm in masters if cm.proc is not None]
            cm_rss = sum(_peak_rss_mb(p) for p in pids)
            cm_cpu = cpu_times_of(pids)
        finally:
            for cm in masters:
                cm.stop()
        await m.ec2.terminate_instances([iid for iid, _ in servers["servers"]])
        report.mark_load("after_controlmaster")

        transfers = await to_thread(_run_child, "transfers", info, n_transfers, size)
        await m.ec2.terminate_instances([iid for iid, _ in transfers["servers"]])
        report.mark_load("after_transfers_child")
    per_server_mb = (servers["rss_now_mb"] - idle["rss_now_mb"]) / n_servers
    report.table(
        "Controller cost (a fresh process each; peak RSS = VmHWM)",
        ["scenario", "wall s", "CPU s", "peak RSS MB", "RSS at end MB"],
        [
            [
                "idle: Manager open, nothing else",
                idle["wall_s"],
                idle["cpu_s"],
                idle["peak_rss_mb"],
                idle["rss_now_mb"],
            ],
            [
                f"{n_servers} servers provisioned, connected, 1 command each",
                servers["wall_s"],
                servers["cpu_s"],
                servers["peak_rss_mb"],
                servers["rss_now_mb"],
            ],
            [
                f"baseline: {n_servers} OpenSSH ControlMasters (sum), 1 command each",
                round(cm_wall, 3),
                round(cm_cpu, 3),
                round(cm_rss, 1),
                "",
            ],
            [
                f"{n_transfers} rsync transfers at once ({size // MiB} MiB each)",
                transfers["transfer_wall_s"],
                transfers["transfer_cpu_s"],
                transfers["peak_rss_mb"],
                transfers["rss_now_mb"],
            ],
        ],
    )
    report.results.update(
        {
            "idle": idle,
            "servers": {k: v for k, v in servers.items() if k != "servers"},
            "controlmaster_baseline": {
                "masters": len(masters),
                "wall_s": round(cm_wall, 3),
                "cpu_s": round(cm_cpu, 3),
                "peak_rss_mb_sum": round(cm_rss, 1),
            },
            "transfers": {k: v for k, v in transfers.items() if k != "servers"},
            "rss_per_connected_server_mb": round(per_server_mb, 2),
            "rss_vs_controlmasters": ratio(servers["peak_rss_mb"], cm_rss),
        }
    )
    report.target(
        f"peak_rss_{n_servers}_servers_mb",
        servers["peak_rss_mb"],
        "<",
        200,
        f"controller peak RSS with {n_servers} connected servers",
        unit=" MB",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
