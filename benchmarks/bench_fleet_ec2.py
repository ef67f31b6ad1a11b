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
  scheduler run time;
- what EC2's API rate allows of the share: each new server's host key comes from its
  console (one ``GetConsoleOutput`` each, strict host key policy), a call of EC2's
  non-mutating token bucket (100 at once, then 20 a second, as Describe*): the
  consoles of a fleet that runs within the same second cannot all be read sooner
  than ``(N - 100) / 20`` seconds, however the library asks. The local cloud
  keeps every instance of one launch ``pending`` for the same time, so they do.

The realistic cloud (the default profile: eventual consistency, AWS's API token
buckets, late consoles ...) with the pending time added; ``poll_interval`` 0.5 s with
the library's default back-off.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from collections import Counter
from typing import Any

import anyio
from _common import Report, _is_cloud_thread, _thread_cpu, local_cloud, parse_args, ratio
from bench_fleet import _concurrent

from asyncstage import Manager
from asyncstage.localcloud import LocalCloud, Realism
from asyncstage.localcloud._realism import BUCKETS

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


def console_floor(consoles: int, api_rate: float | None) -> float:
    """Seconds EC2's API rate needs for so many GetConsoleOutput calls at once (a full
    non-mutating bucket first, then its refill)."""
    if not api_rate:
        return 0.0
    bucket = BUCKETS["describe"]
    return max(0.0, consoles - bucket.burst * api_rate) / (bucket.refill * api_rate)


async def _fleet(cloud: LocalCloud, m: Manager, n: int, api_rate: float | None) -> dict[str, Any]:
    cpu = controller_cpu()
    throttled = Counter(cloud.throttled)
    run = await _concurrent(cloud, m, n, keep_times=True)
    run["controller_cpu_s"] = round(controller_cpu() - cpu, 3)
    run["throttled_by_action"] = dict(Counter(cloud.throttled) - throttled)
    consoles = int(run["api_calls"].get("GetConsoleOutput", 0))
    run["console_calls"] = consoles
    run["console_floor_s"] = round(console_floor(consoles, api_rate), 3)
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
            runs.append(await _fleet(cloud, m, n, realism.api_rate))
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
            "consoles",
            "their API floor s",
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
                r["console_calls"],
                r["console_floor_s"],
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
    vs_single = ratio(big["wall_s"], single)
    report.target(
        f"fleet_ec2_{n}_vs_single",
        vs_single,
        "<=",
        1.3,
        f"wall time of a fleet of {n} relative to one server, EC2's pace (pending {pending:g} s)",
        spread=spread,
        **_ratio_bound(big, single, pending, vs_single),
    )
    report.target(
        f"fleet_ec2_{n}_library_share",
        big["library_share_s"],
        "<=",
        1.0,
        f"the library's share of a fleet of {n}: from the last instance running (sshd "
        "listening) to all ready",
        unit=" s",
        **_share_bound(big, single_share),
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


API_BOUND = (
    "EC2's API rate: one GetConsoleOutput per new server (its host key), in the "
    "non-mutating token bucket (100 at once, 20 a second)"
)


def _console_text(big: dict[str, Any]) -> str:
    throttled = big["throttled_by_action"].get("GetConsoleOutput", 0)
    return (
        f"{big['console_calls']} GetConsoleOutput calls for the {big['n']} host keys "
        f"({throttled} throttled): reading them all once they run in the same second takes "
        f"at least {big['console_floor_s']:g} s at EC2's rate"
    )


def _split_text(big: dict[str, Any]) -> str:
    if big.get("poll_wait_s") is None:
        return "no poll round after the last one ran (seen running at once)"
    return (
        f"{big['poll_wait_s']:g} s until the next poll round, {big['after_poll_s']:g} s after "
        "it (host keys from the consoles, ssh)"
    )


def _share_bound(big: dict[str, Any], single_share: float) -> dict[str, str]:
    """The share target's bound: EC2's API rate when its floor alone misses the target."""
    text = (
        f"of it {_split_text(big)}; {_console_text(big)}; the controller used "
        f"{big['controller_cpu_s']:g} CPU s ({big['controller_cpu_ms_per_server']:g} ms per "
        f"server); one server's share {single_share:g} s"
    )
    floor = big["console_floor_s"]
    if floor <= 1.0:  # a client could meet the target within EC2's rate
        return {"bound": "library", "evidence": text}
    return {
        "bound": API_BOUND,
        "evidence": text + f"; the share is {big['library_share_s'] / floor:.2f}× that floor",
    }


def _ratio_bound(
    big: dict[str, Any], single: float, pending: float, vs_single: float
) -> dict[str, str]:
    """The ratio target's bound: the cloud's own time plus the consoles' floor, when
    that alone misses the target."""
    cloud, floor = big["cloud_last_running_s"], big["console_floor_s"]
    limit = cloud + floor
    text = (
        f"the cloud had all {big['n']} running (sshd listening) {cloud:g} s after the launch "
        f"(pending {pending:g} s); {_console_text(big)}: no client can have them all ready "
        f"before {limit:.1f} s = {limit / single:.2f}× one server's {single:g} s; all ready "
        f"at {big['wall_s']:g} s, {big['wall_s'] / limit:.2f}× that limit"
    )
    if limit / single <= 1.3:  # a client could meet the target within EC2's rate
        return {"bound": "library", "evidence": text}
    bound = API_BOUND
    if cloud > pending + 1.0:
        bound += f"; and the machine: the {big['n']} hosts' boot outlasted the pending time"
    return {"bound": bound, "evidence": text}


if __name__ == "__main__":
    anyio.run(main)
