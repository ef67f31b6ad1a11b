"""Fleets at EC2's pace: provision N servers until all answer ssh, with EC2's pending time.

EC2 keeps a new instance ``pending`` for 10-40 s while it boots on hardware of its own.
The local cloud plays that with ``Realism(pending=...)``: an instance is ``pending`` at
least that long from its launch, and the host's own boot (overlay, host keys, sshd),
done here on this machine's cores, runs inside it, as it would on EC2. Measured for
N = 1, 10, 50, 100, 200 (one server again between the larger fleets: the figure they
are compared with, as a median with its spread):

- the wall time of ``provision_servers(N)`` against one server's;
- the library's own share: from the moment the cloud reported the last instance
  running (its sshd listening) to the moment ``provision_servers`` returned with every
  server answering ssh; split at the first DescribeInstances round after it, into the
  wait for the next poll round (the poll schedule) and the rest (host keys from the
  console outputs, ssh handshakes, each server's first command);
- the controller's CPU seconds per server: the threads of this process that are not
  the local cloud's (the event loop, asyncio's and anyio's worker threads), by their
  scheduler run time.

The realistic cloud (the default profile: eventual consistency, AWS's API token
buckets, late consoles ...) with the pending time added; ``poll_interval`` 0.5 s with
the library's default back-off.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from typing import Any

import anyio
from _common import Report, _is_cloud_thread, _thread_cpu, local_cloud, parse_args, ratio
from bench_fleet import _concurrent

from asyncstage import Manager
from asyncstage.localcloud import LocalCloud, Realism

# Threads of the benchmark itself (its samplers), neither controller nor cloud.
BENCH_THREAD = "bench-"


def controller_cpu() -> float:
    """CPU seconds so far of this process's live threads that are the controller's."""
    return sum(
        _thread_cpu(t.native_id)
        for t in threading.enumerate()
        if t.native_id is not None
        and not _is_cloud_thread(t)
        and not t.name.startswith(BENCH_THREAD)
    )


async def _fleet(cloud: LocalCloud, m: Manager, n: int) -> dict[str, Any]:
    cpu = controller_cpu()
    run = await _concurrent(cloud, m, n, keep_times=True)
    run["controller_cpu_s"] = round(controller_cpu() - cpu, 3)
    run["controller_cpu_ms_per_server"] = round(1000 * run["controller_cpu_s"] / n, 2)
    last = run.pop("_last_running_at")
    polls = [t for t in run.pop("_describe_at") if t >= last]
    run["library_share_s"] = round(run["wall_s"] - run["cloud_last_running_s"], 3)
    run["poll_wait_s"] = round(polls[0] - last, 3) if polls else None
    if run["poll_wait_s"] is not None:
        run["after_poll_s"] = round(run["library_share_s"] - run["poll_wait_s"], 3)
    return run


async def main() -> None:
    args = parse_args(__doc__ or "")
    quick = args.quick
    sizes = [1, 3] if quick else [1, 10, 50, 100, 200]
    pending = 1.0 if quick else 20.0
    order = [1, 3, 1] if quick else [1, 10, 50, 1, 100, 200, 1]
    poll_interval = 0.5
    report = Report("fleet_ec2", quick, args.results)
    report.params = {
        "sizes": sizes,
        "order": order,
        "pending_s": pending,
        "poll_interval_s": poll_interval,
        "realism": "aws, pending added",
    }
    realism = dataclasses.replace(Realism(), pending=pending)
    runs: list[dict[str, Any]] = []
    async with local_cloud(0.0, realism, poll_interval=poll_interval) as (cloud, m):
        for n in order:
            runs.append(await _fleet(cloud, m, n))
            print(f"fleet of {n}: {runs[-1]}")
    report.mark_load("after_fleets")
    singles = [r for r in runs if r["n"] == 1]
    single = statistics.median(r["wall_s"] for r in singles)
    single_share = statistics.median(r["library_share_s"] for r in singles)
    fleets = [next(r for r in runs if r["n"] == n) for n in sizes[1:]]
    one = min(singles, key=lambda r: abs(r["wall_s"] - single))
    table = [one, *fleets]
    report.table(
        f"Fleets at EC2's pace (pending {pending:g} s from the launch; one server: median of "
        f"{len(singles)})",
        [
            "N",
            "wall s",
            "× one",
            "cloud all running s",
            "library s",
            "of it poll wait s",
            "then up s",
            "controller CPU s",
            "ms/server",
            "Describe/round",
        ],
        [
            [
                r["n"],
                r["wall_s"],
                ratio(r["wall_s"], single),
                r["cloud_last_running_s"],
                r["library_share_s"],
                r["poll_wait_s"] if r["poll_wait_s"] is not None else "-",
                r.get("after_poll_s", "-"),
                r["controller_cpu_s"],
                r["controller_cpu_ms_per_server"],
                r["describe_calls_per_round"],
            ]
            for r in table
        ],
    )
    big = fleets[-1]
    walls = [r["wall_s"] for r in singles]
    spread = [ratio(big["wall_s"], max(walls)), ratio(big["wall_s"], min(walls))]
    report.results.update(
        {"runs": runs, "single_s": single, "single_library_share_s": single_share}
    )
    n = big["n"]
    report.target(
        f"fleet_ec2_{n}_vs_single",
        ratio(big["wall_s"], single),
        "<=",
        1.3,
        f"wall time of a fleet of {n} relative to one server, EC2's pace (pending {pending:g} s)",
        spread=spread,
    )
    report.target(
        f"fleet_ec2_{n}_library_share",
        big["library_share_s"],
        "<=",
        1.0,
        f"the library's share of a fleet of {n}: from the last instance running (sshd "
        "listening) to all ready",
        unit=" s",
    )
    per_server = [r["controller_cpu_ms_per_server"] for r in fleets if r["n"] >= 10]
    report.target(
        "fleet_ec2_controller_cpu_flat",
        ratio(max(per_server), min(per_server)) if per_server else 1.0,
        "<=",
        1.5,
        "controller CPU per server, highest / lowest over fleets of 10 and more (flat in N)",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
