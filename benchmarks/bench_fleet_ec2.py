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
  console (one ``GetConsoleOutput`` each, strict host key policy), an action whose
  token bucket holds 100 at once and refills 20 a second: the consoles of a fleet that
  runs within the same second cannot all be read sooner than ``(N - 100) / 20``
  seconds, however the library asks. The floor under the share is that of a client
  that reads each console once, the moment the cloud switched its instance to running
  (each instance's time, sampled), at that rate: when the last read can be, after the
  last instance ran. The local cloud keeps every instance of one launch ``pending``
  for the same time, so they run together unless their boot outlasts it;
- where the share goes: each GetConsoleOutput call and each throttled one as the
  cloud's endpoint counted them, when each server's host key was known and when it
  was ready (its first command answered), the controller's CPU seconds within the
  share (``timeline`` in the JSON, times from the last instance running).

The realistic cloud (the default profile: eventual consistency, AWS's API token
buckets, late consoles ...) with the pending time added; ``poll_interval`` 0.5 s with
the library's default back-off.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
from _common import (
    Report,
    _busy_jiffies,
    _is_cloud_thread,
    _thread_cpu,
    local_cloud,
    parse_args,
    ratio,
)
from bench_fleet import _concurrent

from asyncstage import Manager, hostkeys
from asyncstage.localcloud import LocalCloud, Realism
from asyncstage.localcloud._realism import BUCKETS
from asyncstage.server import Server

CORES = os.cpu_count() or 1

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


def ideal_reads(running: list[float], api_rate: float | None) -> float:
    """When a client that reads each console once, the moment its instance runs, at
    EC2's rate (the action's bucket full at the launch) has read the last one: the
    same time scale as ``running``."""
    if not running:
        return 0.0
    if not api_rate:
        return max(running)
    bucket = BUCKETS["describe"]
    burst, refill = bucket.burst * api_rate, bucket.refill * api_rate
    level, stamp = burst, min(running)
    for t in sorted(running):
        t = max(t, stamp)
        level = min(burst, level + (t - stamp) * refill)
        if level < 1.0:  # wait for the next token
            t += (1.0 - level) / refill
            level = 1.0
        level -= 1.0
        stamp = t
    return stamp


def machine_busy() -> float:
    """CPU seconds the machine's cores have been busy so far (all processes)."""
    return _busy_jiffies()[0] / os.sysconf("SC_CLK_TCK")


class _Timeline:
    """When things happened during a fleet's wait (``time.perf_counter()``): each
    GetConsoleOutput call and each throttled one as the cloud's endpoint counted them
    (sampled every 5 ms), each server's host key known (its fingerprints read) and each
    server ready (its first command answered), and the controller's CPU seconds by time
    (sampled every 50 ms)."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.calls: list[float] = []
        self.throttled: list[float] = []
        self.cpu: list[tuple[float, float, float]] = []  # time, controller, machine busy
        self.key_known: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-timeline")
        self._saved: list[tuple[object, str, object]] = []

    def _run(self) -> None:
        action = "GetConsoleOutput"
        seen = self.cloud.api_calls[action], self.cloud.throttled[action]
        step = 0
        while not self._stop.is_set():
            now = time.perf_counter()
            calls, throttled = self.cloud.api_calls[action], self.cloud.throttled[action]
            self.calls += [now] * (calls - seen[0])
            self.throttled += [now] * (throttled - seen[1])
            seen = calls, throttled
            if step % 10 == 0:
                self.cpu.append((now, controller_cpu(), machine_busy()))
            step += 1
            self._stop.wait(0.005)

    def _wrap(
        self, owner: object, name: str, times: dict[str, float], key: Callable[..., str]
    ) -> None:
        inner = getattr(owner, name)

        async def timed(*args: Any) -> Any:
            result = await inner(*args)
            times[key(*args)] = time.perf_counter()
            return result

        self._saved.append((owner, name, inner))
        setattr(owner, name, timed)

    def __enter__(self) -> _Timeline:
        self._wrap(hostkeys, "wait_for_fingerprints", self.key_known, lambda ctx, s: s.name)
        self._wrap(Server, "_wait_ssh", self.ready, lambda s, deadline: s.name)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, inner in reversed(self._saved):
            setattr(owner, name, inner)
        self._stop.set()
        self._thread.join()

    def cpu_between(self, start: float, end: float) -> tuple[float, float, float]:
        """Seconds, the controller's CPU seconds and the machine's busy CPU seconds from
        ``start`` to ``end`` (between the samples nearest inside)."""
        inside = [c for c in self.cpu if start <= c[0] <= end]
        if len(inside) < 2:
            return 0.0, 0.0, 0.0
        first, last = inside[0], inside[-1]
        return last[0] - first[0], last[1] - first[1], last[2] - first[2]

    def summary(self, last_running: float, end: float) -> dict[str, Any]:
        """The share's timeline, in seconds from the last instance running."""

        def rel(t: float) -> float:
            return round(t - last_running, 3)

        gaps = sorted(self.ready[s] - self.key_known[s] for s in self.ready if s in self.key_known)
        in_share = [t for t in self.calls if last_running <= t <= end]
        keys = sorted(self.key_known.values())
        span, controller, busy = self.cpu_between(last_running, end)
        return {
            "console_calls_at_s": [rel(t) for t in self.calls],
            "console_throttled_at_s": [rel(t) for t in self.throttled],
            "console_calls_in_share": len(in_share),
            "first_console_call_s": rel(in_share[0]) if in_share else None,
            "last_console_call_s": rel(in_share[-1]) if in_share else None,
            "first_key_known_s": rel(keys[0]) if keys else None,
            "last_key_known_s": rel(keys[-1]) if keys else None,
            "last_ready_s": rel(max(self.ready.values())) if self.ready else None,
            "key_to_ready_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "key_to_ready_max_s": round(gaps[-1], 3) if gaps else None,
            "share_controller_cpu_s": round(controller, 3),
            "share_machine_busy_s": round(busy, 3),
            "share_machine_busy_share": round(busy / (span * CORES), 3) if span else None,
            "share_s": rel(end),
        }


async def _fleet(cloud: LocalCloud, m: Manager, n: int, api_rate: float | None) -> dict[str, Any]:
    cpu = controller_cpu()
    throttled = Counter(cloud.throttled)
    with _Timeline(cloud) as timeline:
        run = await _concurrent(cloud, m, n, keep_times=True)
    run["controller_cpu_s"] = round(controller_cpu() - cpu, 3)
    run["throttled_by_action"] = dict(Counter(cloud.throttled) - throttled)
    consoles = int(run["api_calls"].get("GetConsoleOutput", 0))
    run["console_calls"] = consoles
    run["console_floor_s"] = round(console_floor(consoles, api_rate), 3)
    run["controller_cpu_ms_per_server"] = round(1000 * run["controller_cpu_s"] / n, 2)
    last = run.pop("_last_running_at")
    running = run.pop("_running_at")
    run["timeline"] = timeline.summary(last, last + run["wall_s"] - run["cloud_last_running_s"])
    # what EC2's rate leaves of the share to any client: the last console it can read
    run["share_floor_s"] = round(max(0.0, ideal_reads(running, api_rate) - last), 3)
    run["running_spread_s"] = round(last - min(running), 3) if running else 0.0
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
            print(f"fleet of {n}: {dict(runs[-1], timeline='...')}")
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
            "EC2-rate floor s",
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
                r["share_floor_s"],
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
    "EC2's API rate: one GetConsoleOutput per new server (its host key), in the action's "
    "token bucket (100 at once, 20 a second)"
)


def _floor_text(big: dict[str, Any]) -> str:
    """What EC2's rate leaves to any client, from the instances' own running times."""
    return (
        f"at EC2's rate a client that reads each console once, as soon as its instance "
        f"runs (the {big['n']} ran within {big['running_spread_s']:g} s), has read the last "
        f"{big['share_floor_s']:g} s after the last one ran"
    )


def _console_text(big: dict[str, Any]) -> str:
    throttled = big["throttled_by_action"].get("GetConsoleOutput", 0)
    tl = big["timeline"]
    return (
        f"{big['console_calls']} GetConsoleOutput calls for the {big['n']} host keys "
        f"({throttled} throttled), {tl['console_calls_in_share']} of them after the last "
        f"instance ran; {_floor_text(big)}"
    )


def _split_text(big: dict[str, Any]) -> str:
    if big.get("poll_wait_s") is None:
        return "no poll round after the last one ran (seen running at once)"
    return (
        f"{big['poll_wait_s']:g} s until the next poll round, {big['after_poll_s']:g} s after "
        "it (host keys from the consoles, ssh)"
    )


def _tail_text(big: dict[str, Any]) -> str:
    tl = big["timeline"]
    if tl["last_key_known_s"] is None or tl["last_ready_s"] is None:
        return "no host key read"
    return (
        f"the last host key known {tl['last_key_known_s']:g} s after the last instance ran, "
        f"the last server ready {tl['last_ready_s'] - tl['last_key_known_s']:.3f} s after "
        f"that (from its key to its first command: median {tl['key_to_ready_median_s']:g} s, "
        f"at most {tl['key_to_ready_max_s']:g} s)"
    )


def _cpu_text(big: dict[str, Any]) -> str:
    tl = big["timeline"]
    busy = tl.get("share_machine_busy_share")
    return (
        f"in the share the controller used {tl['share_controller_cpu_s']:g} CPU s "
        f"({big['controller_cpu_s']:g} s for the whole fleet) and the machine's {CORES} "
        f"cores were busy {tl['share_machine_busy_s']:g} CPU s"
        + (f" ({busy:.0%} of them: the instances' sshd and the cloud share them)" if busy else "")
    )


def _share_bound(big: dict[str, Any], single_share: float) -> dict[str, str]:
    """The share target's bound: EC2's API rate when its floor alone misses the target;
    the machine when its cores were saturated in the share."""
    text = (
        f"of it {_split_text(big)}; {_console_text(big)}; {_tail_text(big)}; "
        f"{_cpu_text(big)}; one server's share {single_share:g} s"
    )
    floor = big["share_floor_s"]
    parts = []
    if floor > 1.0:  # no client can meet the target within EC2's rate
        parts.append(API_BOUND)
        text += (
            f"; the share is {big['library_share_s'] / floor:.2f}× that floor "
            f"(+{big['library_share_s'] - floor:.2f} s beyond it)"
        )
    if (big["timeline"].get("share_machine_busy_share") or 0) >= 0.9:
        parts.append(
            f"the machine: its {CORES} cores saturated in the share (the ssh handshakes' "
            "two ends, the instances' sshd here on the controller's cores)"
        )
    return {"bound": "; and ".join(parts) or "library", "evidence": text}


def _ratio_bound(
    big: dict[str, Any], single: float, pending: float, vs_single: float
) -> dict[str, str]:
    """The ratio target's bound: the cloud's own time plus the consoles' floor, when
    that alone misses the target."""
    cloud = big["cloud_last_running_s"]
    limit = cloud + big["share_floor_s"]
    text = (
        f"the cloud had all {big['n']} running (sshd listening) {cloud:g} s after the launch "
        f"(pending {pending:g} s); {_console_text(big)}: no client can have them all ready "
        f"before {limit:.1f} s = {limit / single:.2f}× one server's {single:g} s; all ready "
        f"at {big['wall_s']:g} s, {big['wall_s'] / limit:.2f}× that limit"
    )
    if limit / single <= 1.3:  # a client could meet the target within EC2's rate
        return {"bound": "library", "evidence": text}
    parts = [API_BOUND] if big["share_floor_s"] > 1.0 else []
    if cloud > pending + 1.0:
        parts.append(f"the machine: the {big['n']} hosts' boot outlasted the pending time")
    return {"bound": "; and ".join(parts) or "library", "evidence": text}


if __name__ == "__main__":
    anyio.run(main)
