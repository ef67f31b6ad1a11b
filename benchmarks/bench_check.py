"""``backup check --read-data`` against a plain ``sha256sum`` of the same files.

One server, one data volume of generated files (large ones, and many small ones, where
the cost per file shows), one backup of it. Then, on one scratch volume made from the
backup's snapshot and mounted read-only on the same server, in turn (a b, b a, a b ...):

- asyncstage: the manifest helper's ``check ... read-data`` pass (the reading part of
  ``backup check --read-data``: the manifest against its digest, every path's metadata,
  every file's sha256), run over ssh as the library runs it;
- baseline: ``find . -type f -print0 | xargs -0 sha256sum`` of the same files, over ssh
  too, its output thrown away.

Both read the same page-cached blocks (an untimed ``sha256sum`` pass warms them first),
so the figure is the hashing and walking itself. Target: asyncstage's throughput >= 0.8x
sha256sum's (median of the rounds). The whole ``backup.check(read_data=True)``, scratch
volume included, is timed once beside it. Quick mode: a few MiB, one round.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
from _common import MiB, Report, local_cloud, parse_args

from asyncstage import Server, backup
from asyncstage.backup.check import check_mounted
from asyncstage.backup.manifest import MANIFEST_NAME, recorded
from asyncstage.backup.scratch import volume_from

NAME = "bench-check"


async def _fill(server: Server, root: str, big: int, big_size: int, small: int) -> None:
    """``big`` files of ``big_size`` bytes and ``small`` files of 1-8 KiB, random."""
    await server.scmd(
        "sh",
        "-c",
        'mkdir -p "$1/big" "$1/small" && i=0; while [ $i -lt "$2" ]; do '
        'head -c "$3" /dev/urandom > "$1/big/f$i"; i=$((i+1)); done; i=0; '
        'while [ $i -lt "$4" ]; do head -c $((1024 * (i % 8 + 1))) /dev/urandom '
        '> "$1/small/f$i"; i=$((i+1)); done',
        "fill",
        root,
        str(big),
        str(big_size),
        str(small),
        sudo=True,
    )


async def _timed_helper(server: Server, root: str, digest: str) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    reply = await check_mounted(server, root, digest, read_data=True)
    return time.perf_counter() - t, reply


async def _timed_sha256sum(server: Server, root: str) -> float:
    t = time.perf_counter()
    await server.scmd(
        "sh",
        "-c",
        f'cd "$1" && find . -type f ! -path "./{MANIFEST_NAME}" -print0 '
        "| xargs -0 -r sha256sum > /dev/null",
        "sums",
        root,
        sudo=True,
    )
    return time.perf_counter() - t


async def main() -> None:
    args = parse_args(__doc__ or "")
    big, big_size, small = (2, 2 * MiB, 200) if args.quick else (48, 8 * MiB, 4000)
    rounds = 1 if args.quick else 5
    report = Report("check", args.quick, args.results)
    report.params = {
        "big_files": big,
        "big_file_bytes": big_size,
        "small_files": small,
        "repeats": rounds,
    }
    async with local_cloud() as (_cloud, m):
        server = await m.provision_server("check-bench")
        data = await server.provision_volume("check-data", size=1 if args.quick else 2)
        assert data.mtpt
        await _fill(server, data.mtpt, big, big_size, small)
        done = await backup.backup(m, NAME, [f"{server.name}:{data.mtpt}/"], server=server)
        (snap,) = await m.ec2.describe_snapshots([done.snapshot_id])
        kind, digest = recorded(snap)
        assert kind == "sha256"
        t = time.perf_counter()
        (whole,) = await backup.check(m, NAME, read_data=True, server=server)
        whole_s = time.perf_counter() - t
        assert whole.verified, whole
        helper_s: list[float] = []
        sums_s: list[float] = []
        async with volume_from(m, done.snapshot_id, server, None, None) as scratch:
            root = scratch.mtpt
            assert root
            await server.scmd("mount", "-o", "remount,ro", "--", root, sudo=True)
            await _timed_sha256sum(server, root)  # warms the page cache for both
            for i in range(rounds):
                for side in ("helper", "sums") if i % 2 == 0 else ("sums", "helper"):
                    if side == "helper":
                        took, reply = await _timed_helper(server, root, digest)
                        assert reply["manifest"] == "ok" and not any(reply["counts"].values())
                        helper_s.append(took)
                    else:
                        sums_s.append(await _timed_sha256sum(server, root))
        nbytes = whole.bytes_read
        helper, sums = statistics.median(helper_s), statistics.median(sums_s)
        ratios = sorted(s / h for h, s in zip(helper_s, sums_s, strict=True))
        report.results = {
            "files": whole.files_read,
            "bytes": nbytes,
            "entries": whole.entries,
            "helper_runs_s": [round(x, 3) for x in helper_s],
            "sha256sum_runs_s": [round(x, 3) for x in sums_s],
            "helper_mib_s": round(nbytes / helper / MiB, 1),
            "sha256sum_mib_s": round(nbytes / sums / MiB, 1),
            "whole_check_s": round(whole_s, 2),
            "backup_manifest_s": round(done.manifest_s, 2),
        }
        report.table(
            "check --read-data against sha256sum (same files, same server, warm cache)",
            ["side", "median s", "MiB/s", "files"],
            [
                ["asyncstage check", helper, nbytes / helper / MiB, whole.files_read],
                ["sha256sum", sums, nbytes / sums / MiB, whole.files_read],
                ["backup.check (scratch volume incl.)", whole_s, nbytes / whole_s / MiB, ""],
            ],
        )
        report.target(
            "check_read_data_vs_sha256sum",
            sums / helper,
            ">=",
            0.8,
            "backup check --read-data throughput against sha256sum of the same files",
            spread=[ratios[0], ratios[-1]],
        )
        for s in await m.snapshots(NAME):
            await m.ec2.delete_snapshot(s["SnapshotId"])
        await data.delete()
    report.save()


if __name__ == "__main__":
    anyio.run(main)
