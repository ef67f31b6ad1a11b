"""Keeping backups: a cross-region copy against a same-region snapshot, and ``forget``
over many snapshots.

1. **Copy against snapshot** (the local cloud): one volume holding some data; the time of
   ``create_snapshot(wait=True)`` in its region against ``Manager.copy_snapshot`` of that
   snapshot to another region (until completed), each three times in turn. The ratio
   shows what a copy costs here: the realism's ``copy_per_gib`` of the data the source
   holds, on top of a snapshot's own pending time.
2. **forget over 1,000 snapshots** (plain moto: records only, no disks): the API calls of
   ``backup.forget`` (DescribeSnapshots pages, one DescribeImages per reading, then one
   DeleteSnapshot per removed snapshot) and its time, against a naive retention of the
   same history that describes each snapshot before deleting it.

Quick mode: 30 snapshots, 16 MiB of data.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Any

import anyio
from _common import MiB, Report, local_cloud, parse_args, ratio

from asyncstage import Manager, backup
from asyncstage.retention import Policy, plan
from tests.backup_support import backup_history

OTHER = "eu-west-1"


async def copy_against_snapshot(report: Report, data_mib: int, rounds: int) -> None:
    async with (
        local_cloud() as (cloud, m),
        cloud.manager(
            region=OTHER, dotdir=m.dotdir, scan=False, verbosity=0, on_exit="terminate"
        ) as away,
    ):
        server = await m.provision_server("keep-bench")
        volume = await server.provision_volume("keep-bench-data", size=1)
        await server.scmd(
            f"head -c {data_mib * MiB} /dev/urandom > {volume.mtpt}/data && sync", sudo=True
        )
        snaps, copies = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            snapshot = await volume.create_snapshot(wait=True)
            snaps.append(time.perf_counter() - t)
            t = time.perf_counter()
            copy = await m.copy_snapshot(snapshot, away)
            copies.append(time.perf_counter() - t)
            await away.ec2.delete_snapshot(copy)
            await m.ec2.delete_snapshot(snapshot)
        realism = cloud._engine.realism
        report.results["copy"] = {
            "data_mib": data_mib,
            "snapshot_s": [round(x, 3) for x in snaps],
            "copy_s": [round(x, 3) for x in copies],
            "realism_snapshot_s": list(realism.snapshot),
            "realism_copy_per_gib_s": realism.copy_per_gib,
        }
        each = [ratio(c, s) for c, s in zip(copies, snaps, strict=True)]
        report.table(
            f"cross-region copy against a same-region snapshot ({data_mib} MiB of data)",
            ["round", "snapshot s", "copy s", "copy / snapshot"],
            [[i + 1, s, c, r] for i, (s, c, r) in enumerate(zip(snaps, copies, each, strict=True))],
        )
        report.target(
            "keep_copy_vs_snapshot",
            median(each),
            "<=",
            10.0,
            f"CopySnapshot to {OTHER} until completed, against CreateSnapshot of the same "
            f"volume ({data_mib} MiB) until completed (medians of {rounds})",
            bound=f"machine: the local cloud's realism (snapshot {realism.snapshot} s, "
            f"copy {realism.copy_per_gib} s per GiB held)",
            evidence=f"snapshot median {median(snaps):.2f} s, copy median {median(copies):.2f} s",
            spread=[min(each), max(each)],
        )


async def _naive(m: Manager, name: str, policy: Policy) -> None:
    """Retention the plain way: list, then describe each snapshot before deleting it."""
    for decision in plan(await m.snapshots(name), policy):
        if not decision.keep:
            (snap,) = await m.ec2.describe_snapshots([decision.snapshot_id])
            if snap.get("State") == "completed":
                await m.ec2.delete_snapshot(decision.snapshot_id)


async def forget_many(report: Report, count: int) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    policy = Policy(last=10)
    found: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as dot:
            async with Manager(
                region="us-east-1",
                endpoint_url=f"http://{host}:{port}",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                image="*",
                dotdir=Path(dot),
                scan=False,
                verbosity=0,
            ) as m:
                for label, run in (
                    ("forget", lambda n: backup.forget(m, [n], policy, report=lambda _: None)),
                    ("naive", lambda n: _naive(m, n, policy)),
                ):
                    name = f"keep-{label}"
                    await backup_history(m, name, count, "us-east-1a")
                    before = Counter(m.ec2.calls)
                    t = time.perf_counter()
                    await run(name)
                    found[label] = {
                        "seconds": round(time.perf_counter() - t, 3),
                        "calls": dict(Counter(m.ec2.calls) - before),
                        "left": len(await m.snapshots(name)),
                    }
    finally:
        server.stop()
    report.results["forget"] = {"snapshots": count, "policy": "keep_last=10", **found}
    ours, naive = found["forget"], found["naive"]
    report.table(
        f"forget over {count} snapshots (keep_last=10; plain moto)",
        ["method", "seconds", "DescribeSnapshots", "DeleteSnapshot", "DescribeImages", "left"],
        [
            [
                label,
                f["seconds"],
                f["calls"].get("DescribeSnapshots", 0),
                f["calls"].get("DeleteSnapshot", 0),
                f["calls"].get("DescribeImages", 0),
                f["left"],
            ]
            for label, f in found.items()
        ],
    )
    describes = ours["calls"].get("DescribeSnapshots", 0)
    report.target(
        "keep_forget_describe_calls",
        describes,
        "<=",
        2 * (count // 1000 + 2),
        f"DescribeSnapshots calls of forget over {count} snapshots (two readings, by page)",
        unit="",
        bound="library",
        evidence=f"the naive way made {naive['calls'].get('DescribeSnapshots', 0)}; "
        f"both deleted {ours['calls'].get('DeleteSnapshot', 0)} (EC2 has no batch delete)",
    )
    report.target(
        "keep_forget_vs_naive_time",
        ratio(ours["seconds"], naive["seconds"]),
        "<=",
        1.0,
        f"forget's time over {count} snapshots against describing each before deleting it",
        bound="library",
        evidence=f"forget {ours['seconds']:.2f} s, naive {naive['seconds']:.2f} s",
    )


async def main() -> None:
    args = parse_args(__doc__ or "")
    report = Report("keep", args.quick, args.results)
    count = 30 if args.quick else 1000
    data_mib = 16 if args.quick else 256
    rounds = 1 if args.quick else 3
    report.params = {"snapshots": count, "data_mib": data_mib, "rounds": rounds}
    await forget_many(report, count)
    report.mark_load("after_forget")
    await copy_against_snapshot(report, data_mib, rounds)
    report.save()


if __name__ == "__main__":
    anyio.run(main)
