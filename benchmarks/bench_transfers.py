"""Transfers: rsync server→server and dd volume→volume vs the plain pipelines.

- rsync of a directory of random data from one server to another. asyncstage:
  ``rsync(f"{s1}:/srv/bench/data/", f"{s2}:/srv/bench/copy/")`` (direct host→host with
  a temporary key it authorises and revokes). Baseline: plain ``rsync -a -e ssh`` run
  on the source server with a key set up beforehand (its set-up not timed).
- dd of a volume filled with random data onto another server's volume. asyncstage:
  ``dd(src, dst)`` (zero blocks skipped, destination kept sparse; ``verify=False``
  for the comparison, and again with the default ``verify=True``). Baseline: ``dd
  if=SRC bs=1M | ssh s2 dd of=DST bs=1M`` run on the source server.
- dd of a 4 GiB volume holding 256 MiB of data (an ext4 filesystem with one file):
  the copier reads only the blocks the filesystem uses (its block bitmaps; how much
  it read is recorded), the baseline reads and sends all 4 GiB.
- 8 rsync transfers between 8 pairs of servers at once vs one after another, and
  against the CPU-bound limit: the CPU seconds the 8 took (every process involved:
  this process, which runs the controller and the cloud, and its descendants — the
  instances' sshd, rsync and ssh on both ends) per byte, over all cores. Their
  aggregate throughput is compared with ``cores / (CPU seconds per byte)``; the share
  of the cores' time that was idle meanwhile shows whether anything else held them.

Both sides use OpenSSH's default cipher between the servers and run as root on the
servers (``sudo``). asyncstage and the plain pipeline take turns (a b, b a, a b ...;
the median is reported), and the source device's cache is dropped before every dd run:
each reads its source from the (loop-device) disk. CPU seconds are those of the
benchmark's own process tree — the cloud's hosts, their sshd and commands, and the
controller — without other people's processes on this shared machine; with the whole
machine's CPU use (1.0 = every core busy) they show where the limit lies.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from _common import GiB, MachineCPU, MiB, OwnCPU, Report, local_cloud, parse_args, ratio

from asyncstage import Manager, Server, Volume, shell
from asyncstage import transfer as _transfer


async def _rsync(m: Manager, src: str, dst: str) -> Any:
    method = getattr(m, "rsync", None)
    if method is not None:
        return await method(src, dst)
    return await _transfer.rsync(m, src, dst)


async def _dd(m: Manager, src: Volume, dst: Volume, verify: bool) -> Any:
    method = getattr(m, "dd", None)
    if method is not None:
        return await method(src, dst, verify=verify, unmount=True)
    return await _transfer.dd(m, src, dst, verify=verify, unmount=True)


class PlainLink:
    """A key on ``src`` authorised on ``dst`` for the plain baselines (set up untimed)."""

    def __init__(self, src: Server, dst: Server) -> None:
        self.src = src
        self.dst = dst
        self.key = "/home/admin/.ssh/bench_plain"
        self.known = "/home/admin/.ssh/bench_plain_known_hosts"
        # the destination's private address, as an EC2 user reaches a server of the same
        # VPC (its group admits its members' private addresses, not their public ones)
        self.target = str(dst.instance.get("PrivateIpAddress") or dst.address)

    async def setup(self) -> None:
        await self.src.scmd("rm", "-f", self.key, self.key + ".pub")
        await self.src.scmd("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        pub = (await self.src.scmd("cat", self.key + ".pub")).strip()
        await self.dst.scmd("sh", "-c", 'echo "$1" >> ~/.ssh/authorized_keys', "-", pub)
        host_key = " ".join((await self.dst.host.host_public_key()).split()[:2])
        line = f"{self.target} {host_key}"
        await self.src.scmd("sh", "-c", 'echo "$1" > "$2"', "-", line, self.known)

    def options(self) -> list[str]:
        return shell.openssh_options(port=22, known_hosts=self.known, client_keys=[self.key])


async def _plain_rsync(link: PlainLink, src_dir: str, dst_dir: str) -> float:
    t = time.perf_counter()
    await link.src.scmd(
        "rsync",
        "-a",
        "-e",
        shell.command_line("ssh", *link.options()),
        *shell.rsync_path(True),
        src_dir,
        f"{shell.user_at_host(link.dst.host.username, link.target)}:{dst_dir}",
        sudo=True,
    )
    return time.perf_counter() - t


async def _plain_dd(link: PlainLink, src_dev: str, dst_dev: str) -> float:
    remote = shell.sudo_line(["dd", f"of={dst_dev}", "bs=1M", "status=none"])
    ssh = shell.openssh_argv(link.options(), link.dst.host.username, link.target, remote)
    line = f"dd if={shell.quote(src_dev)} bs=1M status=none | {shell.command_line(*ssh)}"
    t = time.perf_counter()
    await link.src.scmd("sh", "-c", line, sudo=True)
    return time.perf_counter() - t


async def _fill_dir(server: Server, path: str, total: int, files: int) -> None:
    await server.scmd("mkdir", "-p", path, sudo=True)
    each = total // files
    for i in range(files):
        await server.scmd("sh", "-c", f"head -c {each} /dev/urandom > {path}/f{i}", sudo=True)


_DROP = """
import fcntl, os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x1261, 0)  # BLKFLSBUF
    except OSError:
        pass
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
"""


async def _drop_cache(server: Server, *paths: str) -> None:
    """Start each run with the source's cache dropped: every run reads it from its disk."""
    await server.scmd("python3", "-c", _DROP, *paths, sudo=True)


class CopierDetails(logging.Handler):
    """The block copier's last result, as dd logs it at debug level (what it read)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ": details " in message:
            with contextlib.suppress(ValueError, SyntaxError):
                self.last = ast.literal_eval(message.split(": details ", 1)[1])


@dataclass
class Pair:
    """Alternating runs of asyncstage (a) and the plain pipeline (b): a b, b a, a b ..."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    a_cpu: list[float] = field(default_factory=list)
    b_cpu: list[float] = field(default_factory=list)

    async def run(
        self,
        reps: int,
        a: Callable[[], Awaitable[Any]],
        b: Callable[[], Awaitable[Any]],
        before: Callable[[], Awaitable[Any]],
    ) -> None:
        for rep in range(reps):
            order = [("a", a), ("b", b)] if rep % 2 == 0 else [("b", b), ("a", a)]
            for name, fn in order:
                await before()
                with OwnCPU() as cpu:
                    t = time.perf_counter()
                    await fn()
                    elapsed = time.perf_counter() - t
                getattr(self, name).append(elapsed)
                getattr(self, name + "_cpu").append(cpu.seconds)

    def figures(self) -> dict[str, Any]:
        a, b = statistics.median(self.a), statistics.median(self.b)
        return {
            "asyncstage_s": round(a, 3),
            "plain_s": round(b, 3),
            "ratio": ratio(b, a),
            "asyncstage_runs_s": [round(x, 3) for x in self.a],
            "plain_runs_s": [round(x, 3) for x in self.b],
            "asyncstage_cpu_s": round(statistics.median(self.a_cpu), 3),
            "plain_cpu_s": round(statistics.median(self.b_cpu), 3),
        }

    def alone(self, label: str, mib: int) -> list[Any]:
        """A row for asyncstage's runs only."""
        f = self.figures()
        return [label, mib, f["asyncstage_s"], "", "", f["asyncstage_cpu_s"], ""]

    def row(self, label: str, mib: int) -> list[Any]:
        f = self.figures()
        return [
            label,
            mib,
            f["asyncstage_s"],
            f["plain_s"],
            f["ratio"],
            f["asyncstage_cpu_s"],
            f["plain_cpu_s"],
        ]


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    reps = 1 if quick else 3
    rsync_size = 4 * MiB if quick else GiB
    pair_size = 4 * MiB if quick else 64 * MiB
    n_parallel = 2 if quick else 8
    sparse_gib = 1 if quick else 4
    sparse_data = (4 if quick else 256) * MiB
    report = Report("transfers", quick, args.results)
    report.params = {
        "repeats": reps,
        "rsync_bytes": rsync_size,
        "dd_full_volume_gib": None if quick else 1,
        "dd_sparse_volume_gib": sparse_gib,
        "dd_sparse_data_bytes": sparse_data,
        "parallel_transfers": n_parallel,
        "parallel_bytes_each": pair_size,
        "cpus": os.cpu_count(),
    }
    rows: list[list[Any]] = []
    res: dict[str, Any] = {}
    async with local_cloud(0.0) as (_cloud, m):
        servers = await m.provision_servers(2 * n_parallel)
        s1, s2 = servers[0], servers[1]
        async with anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(partial(server.scmd, "mkdir", "-p", "/srv/bench", sudo=True))
        link = PlainLink(s1, s2)
        await link.setup()

        # rsync server -> server (the destination emptied before every run)
        await _fill_dir(s1, "/srv/bench/data", rsync_size, 4)
        routes: list[str] = []

        async def rsync_a() -> None:
            stats = await _rsync(m, f"{s1}:/srv/bench/data/", f"{s2}:/srv/bench/copy/")
            routes.append(stats.route)

        async def rsync_b() -> None:
            await _plain_rsync(link, "/srv/bench/data/", "/srv/bench/copy/")

        async def rsync_before() -> None:
            await s2.scmd("rm", "-rf", "/srv/bench/copy", sudo=True)

        rs = Pair()
        await rs.run(reps, rsync_a, rsync_b, rsync_before)
        res["rsync"] = rs.figures() | {"route": routes[0]}
        rows.append(rs.row("rsync server→server", rsync_size // MiB))
        await s1.scmd("rm", "-rf", "/srv/bench/data", sudo=True)
        await s2.scmd("rm", "-rf", "/srv/bench/copy", sudo=True)
        report.mark_load("after_rsync")

        async def dd_pair(src: Volume, dst: Volume) -> tuple[Pair, Pair, list[Any]]:
            assert src.mtdev and dst.mtdev
            sent: list[Any] = []

            async def a() -> None:
                sent.append(await _dd(m, src, dst, verify=False))

            async def a_verified() -> None:
                await _dd(m, src, dst, verify=True)

            async def b() -> None:
                await _plain_dd(link, str(src.mtdev), str(dst.mtdev))

            async def before() -> None:
                await _drop_cache(s1, str(src.mtdev))

            plain, verified = Pair(), Pair()
            await plain.run(reps, a, b, before)
            await verified.run(1, a_verified, _nothing, before)
            return plain, verified, sent

        # dd of a volume full of data
        if not quick:
            src = await s1.provision_volume(size=1, fstype="raw")
            dst = await s2.provision_volume(size=1, fstype="raw")
            await s1.scmd(
                "dd",
                "if=/dev/urandom",
                f"of={src.mtdev}",
                "bs=1M",
                "status=none",
                sudo=True,
                check=False,  # "no space left" at the end of the device
            )
            plain, verified, _ = await dd_pair(src, dst)
            res["dd_full"] = plain.figures() | {
                "asyncstage_verified_s": verified.figures()["asyncstage_s"]
            }
            rows.append(plain.row("dd 1 GiB volume, full of data", 1024))
            rows.append(verified.alone("  same, verify=True", 1024))
            for v in (src, dst):
                await v.delete()
            report.mark_load("after_dd_full")

        # dd of a mostly empty volume: an ext4 filesystem with one file
        src = await s1.provision_volume(size=sparse_gib)
        dst = await s2.provision_volume(size=sparse_gib, fstype="raw")
        assert src.mtpt
        await s1.scmd(
            "sh", "-c", f"head -c {sparse_data} /dev/urandom > {src.mtpt}/data && sync", sudo=True
        )
        await src.unmount()
        details = CopierDetails()
        copier_log = logging.getLogger("asyncstage.transfer")
        copier_log.addHandler(details)
        level = copier_log.level
        copier_log.setLevel(logging.DEBUG)
        try:
            plain, verified, sent = await dd_pair(src, dst)
        finally:
            copier_log.removeHandler(details)
            copier_log.setLevel(level)
        res["dd_sparse"] = plain.figures() | {
            "volume_gib": sparse_gib,
            "data_bytes": sparse_data,
            "bytes_sent": sent[0].wire_bytes,
            "source_layout": details.last.get("layout"),
            "source_bytes_read": details.last.get("read_bytes"),
            "asyncstage_verified_s": verified.figures()["asyncstage_s"],
        }
        label = f"dd {sparse_gib} GiB volume, {sparse_data // MiB} MiB data"
        rows.append(plain.row(label, sparse_gib * 1024))
        rows.append(verified.alone("  same, verify=True", sparse_gib * 1024))
        for v in (src, dst):
            await v.delete()
        report.mark_load("after_dd_sparse")

        # n transfers at once vs one after another
        pairs = [(servers[2 * i], servers[2 * i + 1]) for i in range(n_parallel)]
        async with anyio.create_task_group() as tg:
            for src_server, _ in pairs:
                tg.start_soon(_fill_dir, src_server, "/srv/bench/p", pair_size, 1)

        async def one(i: int) -> None:
            a_srv, b_srv = pairs[i]
            await _rsync(m, f"{a_srv}:/srv/bench/p/", f"{b_srv}:/srv/bench/copy/")

        async def clean() -> None:
            async with anyio.create_task_group() as tg:
                for _, b_srv in pairs:
                    tg.start_soon(partial(b_srv.scmd, "rm", "-rf", "/srv/bench/copy", sudo=True))

        async def serial() -> None:
            for i in range(n_parallel):
                await one(i)

        async def concurrent() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(n_parallel):
                    tg.start_soon(one, i)

        par = Pair()
        busy: dict[str, list[float]] = {"concurrent": [], "serial": []}

        async def measured_serial() -> None:
            with MachineCPU() as cpu:
                await serial()
            busy["serial"].append(cpu.busy)

        async def measured_concurrent() -> None:
            with MachineCPU() as cpu:
                await concurrent()
            busy["concurrent"].append(cpu.busy)

        await par.run(max(1, reps - 1), measured_concurrent, measured_serial, clean)
        f = par.figures()
        cores = os.cpu_count() or 1
        total = n_parallel * pair_size
        # The CPU-bound limit: the CPU seconds all 8 transfers took (controller, rsync
        # and ssh on both servers, the instances' sshd: this process tree) per byte,
        # spread over every core. 8 at once can go no faster than that.
        cpu_per_byte = f["asyncstage_cpu_s"] / total
        limit = cores / cpu_per_byte if cpu_per_byte else float("inf")
        aggregate = total / f["asyncstage_s"]
        conc_busy = statistics.median(busy["concurrent"])
        res["parallel"] = {
            "transfers": n_parallel,
            "bytes_each": pair_size,
            "serial_s": f["plain_s"],
            "concurrent_s": f["asyncstage_s"],
            "speedup": f["ratio"],
            "own_cpu_s": {"serial": f["plain_cpu_s"], "concurrent": f["asyncstage_cpu_s"]},
            "cpu_floor_s": round(f["asyncstage_cpu_s"] / cores, 3),
            "machine_busy": busy,
            "best_possible_speedup_on_these_cores": ratio(
                f["plain_s"], f["asyncstage_cpu_s"] / cores
            ),
            "cpu_s_per_gib": round(cpu_per_byte * GiB, 3),
            "cpu_limit_mb_s": round(limit / 1e6, 1),
            "aggregate_mb_s": round(aggregate / 1e6, 1),
            "vs_cpu_limit": ratio(aggregate, limit),
            # Of the cores' time during the 8 at once: ours, others' (the machine is
            # shared), idle. Idle near 0 says nothing but the CPU held the transfers back.
            "own_share_concurrent": round(f["asyncstage_cpu_s"] / (cores * f["asyncstage_s"]), 3),
            "idle_concurrent": round(1 - conc_busy, 3),
        }
        report.mark_load("after_parallel")
    report.table(
        f"Transfers: asyncstage vs the plain pipeline run on the source server (median of {reps}; "
        "CPU = seconds used by the cloud's hosts and this process, others' excluded)",
        ["transfer", "MiB", "asyncstage s", "plain s", "speed-up", "CPU s a", "CPU s plain"],
        rows,
    )
    p = res["parallel"]
    report.table(
        f"{n_parallel} rsync transfers of {pair_size // MiB} MiB, {n_parallel} pairs of servers",
        ["mode", "s", "own CPU s", "machine busy (1.0 = all cores)"],
        [
            ["one after another", p["serial_s"], p["own_cpu_s"]["serial"], str(busy["serial"])],
            [
                "all at once",
                p["concurrent_s"],
                p["own_cpu_s"]["concurrent"],
                str(busy["concurrent"]),
            ],
            ["speed-up", p["speedup"], "", ""],
            [f"CPU floor: own CPU s / {cores} cores", p["cpu_floor_s"], "", ""],
            ["best speed-up these cores allow", p["best_possible_speedup_on_these_cores"], "", ""],
            [f"CPU-bound limit MB/s ({p['cpu_s_per_gib']} CPU s/GiB)", p["cpu_limit_mb_s"], "", ""],
            ["all at once MB/s", p["aggregate_mb_s"], "", ""],
            ["  / CPU-bound limit", p["vs_cpu_limit"], "", ""],
            [
                "cores' time at once: ours / idle",
                p["own_share_concurrent"],
                "",
                p["idle_concurrent"],
            ],
        ],
    )
    report.results.update(res)
    report.target(
        "dd_sparse_vs_plain",
        res["dd_sparse"]["ratio"],
        ">=",
        5,
        "plain dd|ssh dd time / asyncstage dd time, mostly empty volume",
    )
    report.target(
        "parallel_vs_cpu_limit",
        res["parallel"]["vs_cpu_limit"],
        ">=",
        0.9,
        f"{n_parallel} transfers at once: aggregate throughput / the CPU-bound limit "
        "(cores / CPU seconds per byte, same run)",
    )
    report.save()


async def _nothing() -> None:
    return None


if __name__ == "__main__":
    anyio.run(main)
