"""Fleet: provision N servers until every one answers ssh, concurrently vs one after another.

asyncstage: ``manager.provision_servers(N)`` (one RunInstances call, one
DescribeInstances per poll round for the whole fleet, then ssh to all at once).
Baseline (the Perl module's way): ``provision_server()`` N times, one after another.
The local cloud's ``boot_delay`` emulates EC2's pending time; "cloud all running"
is when the cloud itself switched the last instance to running (its own boot work
for N hosts on this machine's cores is in there), "then up" is the library's part
after that (seeing it in a poll round, host keys, ssh). API calls are
counted at the endpoint (``cloud.api_calls``); a poll round is a burst of
DescribeInstances calls (closer than 0.15 s to each other).

The fleets run on the realistic cloud (the default profile: eventual consistency, AWS's
API token buckets, late consoles, ...) and again on the instant one (``realism="off"``),
side by side with the throttled answers and what the library absorbed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import anyio
from _common import CallWatcher, Report, local_cloud, parse_args, ratio

from asyncstage import Manager
from asyncstage.localcloud import LocalCloud, Realism


class _CloudClock:
    """When the cloud itself reported the last instance running (its own view, sampled)."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.last_running = 0.0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self.last_running_at = 0.0  # the same, as time.perf_counter()
        self.running_at: list[float] = []  # each instance's, as time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-clock")
        self._seen: set[str] = set()

    def _run(self) -> None:
        engine = getattr(self.cloud, "_engine", None)
        while engine is not None and not self._stop.is_set():
            for iid in list(engine.machines):
                if iid in self._seen:
                    continue
                try:
                    state = engine.api.instance_state(iid)
                except Exception:  # terminated meanwhile, or not in the API yet
                    continue
                if state == "running":
                    self._seen.add(iid)
                    self.last_running_at = time.perf_counter()
                    self.running_at.append(self.last_running_at)
                    self.last_running = self.last_running_at - self.t0
            self._stop.wait(0.02)

    def __enter__(self) -> _CloudClock:
        self._seen = set(getattr(getattr(self.cloud, "_engine", None), "machines", {}))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _concurrent(
    cloud: LocalCloud, m: Manager, n: int, keep_times: bool = False
) -> dict[str, Any]:
    """``provision_servers(n)``; with ``keep_times`` also ``_last_running_at``,
    ``_running_at`` and ``_describe_at`` (``time.perf_counter()`` of the last instance
    running, of each one's and of each DescribeInstances call)."""
    before = Counter(cloud.api_calls)
    throttled, absorbed = Counter(cloud.throttled), Counter(m.ec2.absorbed)
    with CallWatcher(cloud, "DescribeInstances") as watch, _CloudClock(cloud) as clock:
        t = time.perf_counter()
        servers = await m.provision_servers(n)
        wall = time.perf_counter() - t
    calls = Counter(cloud.api_calls) - before
    answered = sum([await s.ping() for s in servers])
    await m.terminate_servers(servers)
    rounds = watch.rounds()
    times = {
        "_last_running_at": clock.last_running_at,
        "_running_at": clock.running_at,
        "_describe_at": watch.times,
    }
    return (times if keep_times else {}) | {
        "n": n,
        "wall_s": round(wall, 3),
        "cloud_last_running_s": round(clock.last_running, 3),
        "answered_ssh": answered,
        "api_calls": dict(sorted(calls.items())),
        "describe_rounds": len(rounds),
        "describe_calls_per_round": round(max(rounds) if rounds else 0, 2),
        "throttled": sum((Counter(cloud.throttled) - throttled).values()),
        "absorbed": dict(Counter(m.ec2.absorbed) - absorbed),
    }


async def _instant(boot_delay: float, poll_interval: float, sizes: list[int]) -> list[Any]:
    """The concurrent fleets again on the instant cloud (``realism="off"``)."""
    async with local_cloud(boot_delay, Realism.off(), poll_interval=poll_interval) as (cloud, m):
        return [await _concurrent(cloud, m, n) for n in sizes]


async def _networks(sizes: list[int], poll_interval: float) -> dict[str, list[Any]]:
    """The same fleets on the instant cloud with instances in namespaces of their own
    (``network="vpc"``) and on the machine's loopback addresses, one after the other."""
    found: dict[str, list[Any]] = {}
    for network in ("vpc", "loopback"):
        async with local_cloud(
            0.0, Realism.off(), network=network, poll_interval=poll_interval
        ) as (cloud, m):
            found[network] = [await _concurrent(cloud, m, n) for n in sizes]
    return found


async def _serial(cloud: LocalCloud, m: Manager, n: int) -> dict[str, Any]:
    before = Counter(cloud.api_calls)
    servers = []
    t = time.perf_counter()
    for _ in range(n):
        servers.append(await m.provision_server())
    wall = time.perf_counter() - t
    calls = Counter(cloud.api_calls) - before
    await m.terminate_servers(servers)
    return {"n": n, "wall_s": round(wall, 3), "api_calls": dict(sorted(calls.items()))}


async def main() -> None:
    args = parse_args(__doc__ or "")
    sizes = [1, 3] if args.quick else [1, 10, 50, 100]
    serial_max = 3 if args.quick else 10
    boot_delay = 0.3 if args.quick else 5.0
    poll_interval = 0.5
    report = Report("fleet", args.quick, args.results)
    report.params = {
        "sizes": sizes,
        "serial_measured_up_to": serial_max,
        "boot_delay_s": boot_delay,
        "poll_interval_s": poll_interval,
    }
    async with local_cloud(boot_delay, poll_interval=poll_interval) as (cloud, m):
        concurrent = []
        for n in sizes:
            concurrent.append(await _concurrent(cloud, m, n))
            print(f"concurrent {n}: {concurrent[-1]}")
        report.mark_load("after_concurrent")
        # The same without the poll back-off (every poll_interval): how much of the wall
        # time is the poll schedule's granularity rather than the work.
        backoff, m.ec2.poll_backoff = m.ec2.poll_backoff, 1.0
        fixed = []
        for n in (sizes[0], sizes[-1]):
            fixed.append(await _concurrent(cloud, m, n))
            print(f"concurrent {n}, fixed poll interval: {fixed[-1]}")
        m.ec2.poll_backoff = backoff
        serial = []
        for n in sizes:
            if n <= serial_max:
                serial.append(await _serial(cloud, m, n) | {"measured": True})
            else:  # one after another is linear in n: scale the largest measured run
                base = serial[-1]
                wall = base["wall_s"] * n / base["n"]
                serial.append({"n": n, "wall_s": round(wall, 3), "measured": False})
            print(f"serial {n}: {serial[-1]}")
        report.mark_load("after_serial")
    instant = await _instant(boot_delay, poll_interval, sizes)
    report.mark_load("after_instant")
    networks = await _networks(sizes[:2], poll_interval)
    report.mark_load("after_networks")
    single = concurrent[0]["wall_s"]
    rows = []
    for c, s in zip(concurrent, serial, strict=True):
        rows.append(
            [
                c["n"],
                c["wall_s"],
                ratio(c["wall_s"], single),
                s["wall_s"] if s["measured"] else f"~{s['wall_s']:.0f} (extrapolated)",
                ratio(s["wall_s"], single),
                ratio(s["wall_s"], c["wall_s"]),
                c["cloud_last_running_s"],
                round(c["wall_s"] - c["cloud_last_running_s"], 3),
                c["describe_rounds"],
                c["describe_calls_per_round"],
                c["api_calls"].get("DescribeInstances", 0),
                s.get("api_calls", {}).get("DescribeInstances", "-"),
            ]
        )
    report.table(
        f"Fleet: provision N servers until all answer ssh (boot_delay {boot_delay:g} s)",
        [
            "N",
            "concurrent s",
            "× single",
            "serial s",
            "serial × single",
            "speed-up",
            "cloud all running s",
            "then up s",
            "poll rounds",
            "Describe/round",
            "Describe total",
            "serial Describe",
        ],
        rows,
    )
    report.table(
        f"Same, polling every {poll_interval:g} s without back-off (what the schedule costs)",
        ["N", "concurrent s", "× single", "cloud all running s", "then up s", "poll rounds"],
        [
            [
                f["n"],
                f["wall_s"],
                ratio(f["wall_s"], fixed[0]["wall_s"]),
                f["cloud_last_running_s"],
                round(f["wall_s"] - f["cloud_last_running_s"], 3),
                f["describe_rounds"],
            ]
            for f in fixed
        ],
    )
    report.table(
        "The realistic cloud (eventual consistency, AWS's API rates, late consoles ...) "
        "beside the instant one (realism='off'), same fleets",
        [
            "N",
            "realistic s",
            "instant s",
            "realistic / instant",
            "Describe/round",
            "throttled answers",
            "absorbed by the library",
        ],
        [
            [
                c["n"],
                c["wall_s"],
                i["wall_s"],
                ratio(c["wall_s"], i["wall_s"]),
                c["describe_calls_per_round"],
                c["throttled"],
                sum(c["absorbed"].values()),
            ]
            for c, i in zip(concurrent, instant, strict=True)
        ],
    )
    report.table(
        "Instance boot in namespaces of their own (network='vpc') against on the "
        "machine's loopback addresses, instant cloud, same run",
        ["N", "vpc: cloud all running s", "loopback: cloud all running s", "vpc / loopback"],
        [
            [
                v["n"],
                v["cloud_last_running_s"],
                lo["cloud_last_running_s"],
                ratio(v["cloud_last_running_s"], lo["cloud_last_running_s"]),
            ]
            for v, lo in zip(networks["vpc"], networks["loopback"], strict=True)
        ],
    )
    report.results.update(
        {
            "networks": networks,
            "realism": "aws (the default); 'instant' is realism='off'",
            "instant": instant,
            "concurrent": concurrent,
            "serial": serial,
            "single_s": single,
            "fixed_poll_interval": fixed,
            "poll_backoff": backoff,
        }
    )
    largest = concurrent[-1]
    report.target(
        f"fleet_{largest['n']}_vs_single",
        ratio(largest["wall_s"], single),
        "<=",
        1.3,
        f"wall time of a fleet of {largest['n']} relative to a single server",
    )
    per_round = [c["describe_calls_per_round"] for c in concurrent]
    report.target(
        "describe_calls_per_round_max",
        max(per_round),
        "<=",
        1,
        "DescribeInstances calls per poll round, whatever N (independent of N)",
        unit="",
    )
    report.save()


if __name__ == "__main__":
    anyio.run(main)
