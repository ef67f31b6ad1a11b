"""Transfers: rsync server→server and dd volume→volume vs the plain pipelines.

- rsync of a directory of random data from one server to another. asyncstage:
  ``rsync(f"{s1}:/srv/bench/data/", f"{s2}:/srv/bench/copy/")`` (direct host→host with
  a temporary key it authorises and revokes). Baseline: plain ``rsync -a -e ssh`` run
  on the source server with a key set up beforehand (its set-up not timed).
- dd of a volume filled with random data onto another server's volume. asyncstage:
  ``dd(src, dst)`` (zero blocks skipped, destination kept sparse; ``verify=False``
  for the comparison, and again with the default ``verify=True``). Baseline: ``dd
  if=SRC bs=1M | ssh s2 dd of=DST bs=1M`` run on the source server.
- dd of a 4 GiB volume holding 256 MiB of data (an ext4 filesystem with one file).
- 8 rsync transfers between 8 pairs of servers at once vs one after another.

Both sides use OpenSSH's default cipher between the servers and run as root on the
servers (``sudo``). The source device is read once before timing (page cache warm for
both). The machine's CPU use during each run is recorded (1.0 = both cores busy): on
this 2-core machine the servers, their sshd and the controller share the same cores.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import anyio
from _common import GiB, MachineCPU, MiB, Report, local_cloud, parse_args, ratio

from asyncstage import Manager, Server, Volume
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

    async def setup(self) -> None:
        await self.src.scmd("rm", "-f", self.key, self.key + ".pub")
        await self.src.scmd("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        pub = (await self.src.scmd("cat", self.key + ".pub")).strip()
        await self.dst.scmd("sh", "-c", 'echo "$1" >> ~/.ssh/authorized_keys', "-", pub)
        host_key = " ".join((await self.dst.host.host_public_key()).split()[:2])
        line = f"{self.dst.address} {host_key}"
        await self.src.scmd("sh", "-c", 'echo "$1" > "$2"', "-", line, self.known)

    def ssh(self) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            self.key,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known}",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    @property
    def target(self) -> str:
        return f"{self.dst.username}@{self.dst.address}"


async def _plain_rsync(link: PlainLink, src_dir: str, dst_dir: str) -> float:
    from asyncstage.ssh import command_line

    t = time.perf_counter()
    await link.src.scmd(
        "rsync",
        "-a",
        "-e",
        command_line(*link.ssh()),
        "--rsync-path=sudo -n rsync",
        src_dir,
        f"{link.target}:{dst_dir}",
        sudo=True,
    )
    return time.perf_counter() - t


async def _plain_dd(link: PlainLink, src_dev: str, dst_dev: str) -> float:
    from asyncstage.ssh import command_line, quote

    remote = command_line("sudo", "-n", "dd", f"of={dst_dev}", "bs=1M", "status=none")
    ssh = command_line(*link.ssh(), link.target, "--", remote)
    line = f"dd if={quote(src_dev)} bs=1M status=none | {ssh}"
    t = time.perf_counter()
    await link.src.scmd("sh", "-c", line, sudo=True)
    return time.perf_counter() - t


async def _fill_dir(server: Server, path: str, total: int, files: int) -> None:
    await server.scmd("mkdir", "-p", path, sudo=True)
    each = total // files
    for i in range(files):
        await server.scmd("sh", "-c", f"head -c {each} /dev/urandom > {path}/f{i}", sudo=True)


async def _warm(server: Server, path: str) -> None:
    await server.scmd("sh", "-c", f"cat {path} > /dev/null", sudo=True)


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    rsync_size = 16 * MiB if quick else GiB
    pair_size = 4 * MiB if quick else 64 * MiB
    n_parallel = 2 if quick else 8
    report = Report("transfers", quick, args.results)
    report.params = {
        "rsync_bytes": rsync_size,
        "dd_full_volume_gib": None if quick else 1,
        "dd_sparse_volume_gib": 1 if quick else 4,
        "dd_sparse_data_bytes": (16 if quick else 256) * MiB,
        "parallel_transfers": n_parallel,
        "parallel_bytes_each": pair_size,
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

        # rsync server -> server
        await _fill_dir(s1, "/srv/bench/data", rsync_size, 4)
        await _warm(s1, "/srv/bench/data/*")
        with MachineCPU() as cpu_a:
            t = time.perf_counter()
            stats = await _rsync(m, f"{s1}:/srv/bench/data/", f"{s2}:/srv/bench/copy/")
            a = time.perf_counter() - t
        with MachineCPU() as cpu_b:
            b = await _plain_rsync(link, "/srv/bench/data/", "/srv/bench/plain/")
        same = await s2.scmd("sh", "-c", "cd /srv/bench && du -sb copy plain", sudo=True)
        res["rsync"] = {
            "asyncstage_s": round(a, 3),
            "plain_s": round(b, 3),
            "ratio": ratio(b, a),
            "route": stats.route,
            "cpu_busy": [cpu_a.busy, cpu_b.busy],
            "du": same.split(),
        }
        rows.append(
            ["rsync server→server", rsync_size // MiB, a, b, ratio(b, a), cpu_a.busy, cpu_b.busy]
        )
        await s1.scmd("rm", "-rf", "/srv/bench/data", sudo=True)
        await s2.scmd("rm", "-rf", "/srv/bench/copy", "/srv/bench/plain", sudo=True)
        report.mark_load("after_rsync")

        # dd of a volume full of data
        if not quick:
            src = await s1.provision_volume(size=1, fstype="raw")
            dst = await s2.provision_volume(size=1, fstype="raw")
            assert src.mtdev and dst.mtdev
            await s1.scmd(
                "dd",
                "if=/dev/urandom",
                f"of={src.mtdev}",
                "bs=1M",
                "status=none",
                sudo=True,
                check=False,  # "no space left" at the end of the device
            )
            await _warm(s1, src.mtdev)
            with MachineCPU() as cpu_a:
                t = time.perf_counter()
                await _dd(m, src, dst, verify=False)
                a = time.perf_counter() - t
            t = time.perf_counter()
            await _dd(m, src, dst, verify=True)
            a_verified = time.perf_counter() - t
            with MachineCPU() as cpu_b:
                b = await _plain_dd(link, src.mtdev, dst.mtdev)
            res["dd_full"] = {
                "asyncstage_s": round(a, 3),
                "asyncstage_verified_s": round(a_verified, 3),
                "plain_s": round(b, 3),
                "ratio": ratio(b, a),
                "cpu_busy": [cpu_a.busy, cpu_b.busy],
            }
            rows.append(["dd 1 GiB volume, full", 1024, a, b, ratio(b, a), cpu_a.busy, cpu_b.busy])
            rows.append(["  same, verify=True", 1024, a_verified, b, ratio(b, a_verified), "", ""])
            for v in (src, dst):
                await v.delete()
            report.mark_load("after_dd_full")

        # dd of a mostly empty volume
        vol_gib = 1 if quick else 4
        data = (16 if quick else 256) * MiB
        src = await s1.provision_volume(size=vol_gib)
        dst = await s2.provision_volume(size=vol_gib, fstype="raw")
        assert src.mtpt and src.mtdev and dst.mtdev
        await s1.scmd(
            "sh", "-c", f"head -c {data} /dev/urandom > {src.mtpt}/data && sync", sudo=True
        )
        await src.unmount()
        await _warm(s1, src.mtdev)
        with MachineCPU() as cpu_a:
            t = time.perf_counter()
            stats = await _dd(m, src, dst, verify=False)
            a = time.perf_counter() - t
        t = time.perf_counter()
        await _dd(m, src, dst, verify=True)
        a_verified = time.perf_counter() - t
        with MachineCPU() as cpu_b:
            b = await _plain_dd(link, src.mtdev, dst.mtdev)
        res["dd_sparse"] = {
            "volume_gib": vol_gib,
            "data_bytes": data,
            "asyncstage_s": round(a, 3),
            "asyncstage_verified_s": round(a_verified, 3),
            "plain_s": round(b, 3),
            "ratio": ratio(b, a),
            "bytes_sent": stats.wire_bytes,
            "cpu_busy": [cpu_a.busy, cpu_b.busy],
        }
        label = f"dd {vol_gib} GiB volume, {data // MiB} MiB data"
        rows.append([label, vol_gib * 1024, a, b, ratio(b, a), cpu_a.busy, cpu_b.busy])
        rows.append(["  same, verify=True", vol_gib * 1024, a_verified, b, ratio(b, a_verified)])
        rows[-1] += ["", ""]
        for v in (src, dst):
            await v.delete()
        report.mark_load("after_dd_sparse")

        # n transfers at once vs one after another
        pairs = [(servers[2 * i], servers[2 * i + 1]) for i in range(n_parallel)]
        async with anyio.create_task_group() as tg:
            for src_server, _ in pairs:
                tg.start_soon(_fill_dir, src_server, "/srv/bench/p", pair_size, 1)
        for src_server, _ in pairs:
            await _warm(src_server, "/srv/bench/p/*")

        async def one(i: int, tag: str) -> None:
            a_srv, b_srv = pairs[i]
            await _rsync(m, f"{a_srv}:/srv/bench/p/", f"{b_srv}:/srv/bench/{tag}/")

        with MachineCPU() as cpu_serial:
            t = time.perf_counter()
            for i in range(n_parallel):
                await one(i, "serial")
            serial = time.perf_counter() - t
        with MachineCPU() as cpu_conc:
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(n_parallel):
                    tg.start_soon(one, i, "concurrent")
            concurrent = time.perf_counter() - t
        res["parallel"] = {
            "transfers": n_parallel,
            "bytes_each": pair_size,
            "serial_s": round(serial, 3),
            "concurrent_s": round(concurrent, 3),
            "speedup": ratio(serial, concurrent),
            "cpu_busy": {"serial": cpu_serial.busy, "concurrent": cpu_conc.busy},
        }
        report.mark_load("after_parallel")
    report.table(
        "Transfers (asyncstage vs the plain pipeline, run on the source server)",
        ["transfer", "MiB", "asyncstage s", "plain s", "speed-up", "CPU busy a", "CPU busy p"],
        rows,
    )
    report.table(
        f"{n_parallel} rsync transfers of {pair_size // MiB} MiB between {n_parallel} "
        "pairs of servers",
        ["mode", "s", "CPU busy (1.0 = both cores)"],
        [
            ["one after another", serial, cpu_serial.busy],
            ["all at once", concurrent, cpu_conc.busy],
            ["speed-up", ratio(serial, concurrent), ""],
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
        "parallel_speedup",
        res["parallel"]["speedup"],
        ">=",
        4,
        f"{n_parallel} transfers one after another / all at once",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
