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
  the local cloud's (the event loop, asyncio's and anyio's worker threads; not the
  cloud's API server and its request threads, its engine's and firewall's workers, its
  timers, whose CPU is counted apart), by their scheduler run time. Flat in N is judged
  per further server: beyond one server's launch (its poll rounds over the pending time,
  its calls, whatever N), which spread over ten servers alone would double their figure.
  The fleet of 10 runs three times, interleaved (one server's noise moves its figure
  most: 10 ms of it are 1 ms per further server); it is judged on the median of the three;
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
  share (``timeline`` in the JSON, times from the last instance running);
- each server's way from its instance running (sshd listening) to ready, traced on
  both sides: the cloud's (its engine's moments: running, sshd listening, the console
  shown; its endpoint's time on each request) and the library's (each DescribeInstances
  round sent and answered, each console read, the host key known, the ssh slot taken,
  ready), split by whose time each step was: the cloud's, the poll schedule's pause, the
  client's, ssh (``timeline.last_ready_path`` and ``last_split`` of the last server
  ready, medians and maxima over all, the event loop's lateness in the share).

The same run measures fleets whose host keys come from their user data
(``Manager(host_keys="user-data")``: a key made by the manager, given in the cloud-init
user data, replaced at the first contact), beside the console's: one server three times
and the largest fleet, interleaved with the console runs, on the same cloud and manager
with the same pending time. No ``GetConsoleOutput`` at all, so EC2's rate for that
action is no floor under their share; the replacement of each key (a command on the
server, sshd reloaded) is inside it (``rotation`` in their timeline).

``--sizes 200`` runs one part (one server before and after it) for a look at one size.

The realistic cloud (the default profile: eventual consistency, AWS's API token
buckets, late consoles ...) with the pending time added; ``poll_interval`` 0.5 s with
the library's default back-off.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
from _cloud_apart import cloud_apart
from _common import (
    EndedThreads,
    Report,
    _busy_jiffies,
    _thread_cpu,
    cloud_threads_cpu,
    local_cloud,
    parse_args,
    ratio,
    thread_side,
)
from _cpu_flat import GcMeter, baseline, further_runs, per_further_server
from bench_fleet import _concurrent

from asyncstage import Manager, hostkeys
from asyncstage.ec2.console import console_fingerprints
from asyncstage.localcloud import LocalCloud, Realism
from asyncstage.localcloud._realism import BUCKETS
from asyncstage.manager import local_manager
from asyncstage.server import Server
from asyncstage.settings import HostKeySource

CORES = os.cpu_count() or 1


def controller_cpu() -> float:
    """CPU seconds so far of this process's threads that are the controller's, the live
    ones and those that ended."""
    return EndedThreads.seconds["controller"] + sum(
        _thread_cpu(t.native_id)
        for t in threading.enumerate()
        if t.native_id is not None and thread_side(t) == "controller"
    )


def loop_thread() -> tuple[float, float, int]:
    """This (the event loop's) thread so far: user and kernel CPU seconds, and how often
    it waited (voluntary context switches: on the interpreter's lock among others)."""
    task = Path(f"/proc/self/task/{threading.get_native_id()}")
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    waits = next(
        int(line.split()[1])
        for line in (task / "status").read_text().splitlines()
        if line.startswith("voluntary_ctxt_switches:")
    )
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, waits


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
    """When things happened during a fleet's wait (``time.perf_counter()``), per instance.

    The cloud's side, from its own engine: when it switched each instance to running,
    when its sshd listened, when its console (``Latest=True``) held the boot's output.
    The library's side: each DescribeInstances round (sent, answered) and when each
    instance was first seen running in one, each GetConsoleOutput call (sent, answered,
    whether the fingerprints were on it), when each host key was known, when each
    server's ssh wait began (its slot), and when it was ready (its first command
    answered). Also each GetConsoleOutput and each throttled one as the cloud's endpoint
    counted them (sampled every 20 ms: each sample takes the interpreter's lock, which a
    sampler waking more often would take from the controller's event loop it measures),
    and the controller's CPU seconds by time (sampled every 100 ms)."""

    def __init__(self, cloud: LocalCloud, m: Manager) -> None:
        self.cloud = cloud
        self.m = m
        self.calls: list[float] = []
        self.throttled: list[float] = []
        # time, controller, machine busy, the in-process cloud's threads (CPU seconds)
        self.cpu: list[tuple[float, float, float, float]] = []
        # the cloud's side, by instance id
        self.running: dict[str, float] = {}
        self.listening: dict[str, float] = {}
        self.console_shown: dict[str, float] = {}
        # (action, instance id of a console) -> when the endpoint began and ended each
        self.served: dict[tuple[str, str], list[tuple[float, float]]] = {}
        # the library's side
        self.polls: list[tuple[float, float]] = []  # each DescribeInstances: sent, answered
        self.seen: dict[str, tuple[float, float]] = {}  # first seen running: round sent, answered
        self.reads: dict[str, list[tuple[float, float, bool]]] = {}  # sent, answered, key on it
        self.key_known: dict[str, float] = {}
        self.ssh_start: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.rotate_start: dict[str, float] = {}  # the launch key's replacement: began
        self.rotated: dict[str, float] = {}  # and ended
        self.lags: list[tuple[float, float]] = []  # the event loop's lateness, by time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-timeline")
        self._saved: list[tuple[object, str, object, bool]] = []

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
            if step % 5 == 0:
                self.cpu.append((now, controller_cpu(), machine_busy(), cloud_threads_cpu()))
            step += 1
            self._stop.wait(0.02)

    async def probe_loop(self) -> None:
        """How late the controller's event loop wakes a 50 ms sleeper (its backlog)."""
        while True:
            began = time.perf_counter()
            await anyio.sleep(0.05)
            self.lags.append((began, time.perf_counter() - began - 0.05))

    def _patch(self, owner: object, name: str, new: object) -> None:
        """Put ``new`` in place of ``owner.name`` until the exit (an instance's own
        attribute is removed again, a class's or module's restored)."""
        own = name in getattr(owner, "__dict__", {})
        self._saved.append((owner, name, getattr(owner, name), own))
        setattr(owner, name, new)

    def _hook_cloud(self) -> None:
        engine = self.cloud._engine
        api = engine.api
        set_running, add_devices = api.set_running, engine._add_devices

        def running(instance_id: str) -> None:
            set_running(instance_id)
            now = time.perf_counter()
            self.running.setdefault(instance_id, now)
            machine = engine.machines.get(instance_id)
            if machine is not None:  # its console's time, moved to this clock
                shown = machine.console_latest_at if machine.nitro else machine.console_at
                self.console_shown.setdefault(instance_id, shown - time.monotonic() + now)

        def listening(machine: Any) -> None:  # called as its sshd listens
            self.listening.setdefault(machine.host.instance_id, time.perf_counter())
            add_devices(machine)

        server = api._server  # the endpoint: how long the cloud took over each request
        app = server.app

        def served(environ: dict[str, Any], start_response: Any) -> Any:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(size) if size else b""
            environ["wsgi.input"] = io.BytesIO(body)
            params = dict(parse_qsl(body.decode(errors="replace")))
            began = time.perf_counter()
            try:
                return app(environ, start_response)
            finally:
                what = params.get("Action", ""), params.get("InstanceId", "")
                self.served.setdefault(what, []).append((began, time.perf_counter()))

        self._patch(api, "set_running", running)
        self._patch(engine, "_add_devices", listening)
        self._patch(server, "app", served)

    def _hook_library(self) -> None:
        call = self.m.ec2.call

        async def traced(operation: str, /, **params: Any) -> Any:
            sent = time.perf_counter()
            result = await call(operation, **params)
            answered = time.perf_counter()
            if operation == "DescribeInstances":
                self.polls.append((sent, answered))
                for reservation in result.get("Reservations", []):
                    for inst in reservation.get("Instances", []):
                        if inst.get("State", {}).get("Name") == "running":
                            self.seen.setdefault(inst["InstanceId"], (sent, answered))
            elif operation == "GetConsoleOutput":
                raw = result.get("Output") or ""
                try:  # as the client reads it: base64, or the text itself
                    text = base64.b64decode(raw, validate=True).decode(errors="replace")
                except ValueError:
                    text = str(raw)
                found = bool(console_fingerprints(text))
                self.reads.setdefault(params["InstanceId"], []).append((sent, answered, found))
            return result

        self._patch(self.m.ec2, "call", traced)
        self._wrap(hostkeys, "wait_for_fingerprints", self.key_known, None)
        self._wrap(Server, "_wait_ssh", self.ready, self.ssh_start)
        self._wrap(hostkeys, "rotate", self.rotated, self.rotate_start)

    def _wrap(
        self,
        owner: object,
        name: str,
        ended: dict[str, float],
        began: dict[str, float] | None,
    ) -> None:
        inner = getattr(owner, name)

        async def timed(*args: Any) -> Any:
            server = next(a for a in args if isinstance(a, Server))
            if began is not None:
                began.setdefault(server.instance_id, time.perf_counter())
            result = await inner(*args)
            ended[server.instance_id] = time.perf_counter()
            return result

        self._patch(owner, name, timed)

    def __enter__(self) -> _Timeline:
        self._hook_cloud()
        self._hook_library()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, inner, own in reversed(self._saved):
            if own:
                setattr(owner, name, inner)
            else:
                delattr(owner, name)
        self._stop.set()
        self._thread.join()

    def cpu_between(self, start: float, end: float) -> tuple[float, float, float, float]:
        """Seconds, the controller's CPU seconds, the machine's busy CPU seconds and the
        in-process cloud threads' CPU seconds from ``start`` to ``end`` (between the
        samples nearest inside)."""
        inside = [c for c in self.cpu if start <= c[0] <= end]
        if len(inside) < 2:
            return 0.0, 0.0, 0.0, 0.0
        first, last = inside[0], inside[-1]
        return (
            last[0] - first[0],
            last[1] - first[1],
            last[2] - first[2],
            last[3] - first[3],
        )

    def window(self, start: float, end: float) -> dict[str, float | None]:
        """What the controller's process did from ``start`` to ``end``: its event loop's
        lateness at most, the share of one core the controller's threads used and the
        cloud's threads in this process, the share of all cores the machine was busy.
        A late loop whose threads used little CPU waited for the cores and the
        interpreter's lock (the cloud's threads hold it too), not on its own work."""
        span, controller, busy, cloud = self.cpu_between(start, end)
        lags = [lag for t, lag in self.lags if start <= t <= end]
        return {
            "seconds": round(end - start, 3),
            "loop_lag_max_s": round(max(lags), 3) if lags else None,
            "controller_core_share": round(controller / span, 3) if span else None,
            "cloud_threads_core_share": round(cloud / span, 3) if span else None,
            "machine_busy_share": round(busy / (span * CORES), 3) if span else None,
        }

    def up(self, iid: str) -> float | None:
        """When the cloud had the instance running with its sshd listening."""
        if iid not in self.running:
            return None
        return max(self.running[iid], self.listening.get(iid, self.running[iid]))

    def cloud_time(self, action: str, iid: str, sent: float, answered: float) -> float:
        """How long the cloud's endpoint worked on the request sent and answered so (the
        longest it served in that time: another caller's may have overlapped)."""
        return max(
            (
                end - began
                for began, end in self.served.get((action, iid), [])
                if sent <= began and end <= answered
            ),
            default=0.0,
        )

    def path(self, iid: str, last_up: float) -> dict[str, float | int]:
        """One server's way from running (sshd listening) to ready, in seconds, each
        step split into the cloud's time and the library's: the wait for the poll round
        that saw it running (the library's schedule), that round's answer (the cloud's
        endpoint at work, the rest the client's), its console (not written yet, and the
        endpoint at work: the cloud's; queueing for EC2's rate and the pauses between
        reads: the library's), the wait for an ssh slot, the ssh handshake and the first
        command (both ends here on the machine's cores)."""
        up, seen = self.up(iid), self.seen.get(iid)
        if up is None or seen is None or iid not in self.ready:
            return {}
        key = self.key_known.get(iid, seen[1])
        reads = self.reads.get(iid, [])
        shown = self.console_shown.get(iid, up)
        sent, answered = seen
        poll_cloud = self.cloud_time("DescribeInstances", "", sent, answered)
        # a round sent before it ran and answered after: the cloud was still answering
        in_flight = max(
            (min(b, sent) - up for a, b in self.polls if a < up < b),
            default=0.0,
        )
        first_read = reads[0][0] if reads else key
        console = max(0.0, key - seen[1])
        unwritten = max(0.0, min(shown, key) - seen[1])
        reading = sum(self.cloud_time("GetConsoleOutput", iid, a, b) for a, b, _ in reads)
        ssh_start = self.ssh_start.get(iid, key)
        return {
            "ran_s": round(up - last_up, 3),
            "poll_wait_s": round(max(0.0, sent - up), 3),
            "poll_in_flight_s": round(max(0.0, in_flight), 3),
            "poll_pause_s": round(max(0.0, sent - up - max(0.0, in_flight)), 3),
            "poll_cloud_s": round(poll_cloud, 3),
            "poll_client_s": round(answered - max(sent, up) - poll_cloud, 3),
            "console_cloud_s": round(min(console, unwritten + reading), 3),
            "console_library_s": round(console - min(console, unwritten + reading), 3),
            "console_queue_s": round(max(0.0, first_read - seen[1]), 3),
            "console_reads": len(reads),
            "console_empty_reads": sum(not found for _, _, found in reads),
            "ssh_slot_wait_s": round(max(0.0, ssh_start - key), 3),
            "ssh_s": round(self.ready[iid] - max(key, ssh_start), 3),
            "ready_s": round(self.ready[iid] - last_up, 3),
        }

    def slowest_round(self, rel: Callable[[float], float]) -> dict[str, Any]:
        """The DescribeInstances round with the most time outside the cloud's endpoint."""
        if not self.polls:
            return {}
        client = [
            (b - a - self.cloud_time("DescribeInstances", "", a, b), a, b) for a, b in self.polls
        ]
        outside, sent, answered = max(client)
        return {
            "sent_s": rel(sent),
            "answered_s": rel(answered),
            "outside_cloud_s": round(outside, 3),
            **self.window(sent, answered),
        }

    def ups(self) -> list[float]:
        """When each instance was up (running, sshd listening), in order."""
        return sorted(u for i in self.running if (u := self.up(i)) is not None)

    @property
    def last_up(self) -> float:
        """When the last instance was up (0 when none was)."""
        return max(self.ups(), default=0.0)

    def summary(self, last_running: float, end: float) -> dict[str, Any]:
        """The share's timeline, in seconds from the last instance running."""

        def rel(t: float) -> float:
            return round(t - last_running, 3)

        gaps = sorted(self.ready[s] - self.key_known[s] for s in self.ready if s in self.key_known)
        in_share = [t for t in self.calls if last_running <= t <= end]
        keys = sorted(self.key_known.values())
        span, controller, busy, _ = self.cpu_between(last_running, end)
        last_up = self.last_up
        paths = {i: p for i in self.ready if (p := self.path(i, last_up))}
        last = max(paths, key=lambda i: self.ready[i]) if paths else None
        steps = [k for k in next(iter(paths.values()), {}) if k.endswith("_s")]
        reads = [r for rs in self.reads.values() for r in rs]
        ups = self.ups()
        lags = [lag for t, lag in self.lags if last_running <= t <= end]
        rotations = sorted(
            self.rotated[i] - self.rotate_start[i] for i in self.rotated if i in self.rotate_start
        )
        return {
            "rotations": len(rotations),
            "rotation_median_s": round(statistics.median(rotations), 3) if rotations else None,
            "rotation_max_s": round(rotations[-1], 3) if rotations else None,
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
            # the traced way of each server from its instance up to ready
            "cloud_up_spread_s": round(self.last_up - min(ups), 3) if ups else None,
            "loop_lag_in_share_s": {
                "median": round(statistics.median(lags), 3) if lags else None,
                "max": round(max(lags), 3) if lags else None,
            },
            "polls_at_s": [[rel(a), rel(b)] for a, b in self.polls],
            # the round the client took longest over, beyond the cloud's own time
            "slowest_round": self.slowest_round(rel),
            "share_window": self.window(last_running, end),
            "polls_in_share": sum(1 for a, _ in self.polls if a >= self.last_up),
            "console_reads": len(reads),
            "console_empty_reads": sum(not found for _, _, found in reads),
            "last_ready_path": {"instance": last, **paths[last]} if last else {},
            "steps_median_s": {
                k: round(statistics.median(float(p[k] or 0) for p in paths.values()), 3)
                for k in steps
                if k not in ("ran_s", "ready_s")
            },
            "steps_max_s": {
                k: round(max(float(p[k] or 0) for p in paths.values()), 3)
                for k in steps
                if k not in ("ran_s", "ready_s")
            },
            "paths_last_10": sorted(
                (p for p in paths.values()), key=lambda p: float(p["ready_s"] or 0)
            )[-10:],
        }


def _controller_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if thread_side(t) == "controller"]


async def _fleet(
    cloud: LocalCloud, m: Manager, n: int, api_rate: float | None, gcm: GcMeter
) -> dict[str, Any]:
    cpu, cloud_cpu, loop = controller_cpu(), cloud_threads_cpu(), loop_thread()
    collected = gcm.of(_controller_threads())
    throttled = Counter(cloud.throttled)
    with _Timeline(cloud, m) as timeline:
        async with anyio.create_task_group() as tg:
            tg.start_soon(timeline.probe_loop)
            run = await _concurrent(cloud, m, n, keep_times=True)
            tg.cancel_scope.cancel()
    run["controller_cpu_s"] = round(controller_cpu() - cpu, 3)
    # the collector's share: its full collections scan the whole process (the cloud too)
    gc_s, gc_full_s, _ = (
        b - a for a, b in zip(collected, gcm.of(_controller_threads()), strict=True)
    )
    run["controller_gc_cpu_s"] = round(gc_s, 3)
    run["controller_gc_full_cpu_s"] = round(gc_full_s, 3)
    run["cloud_threads_cpu_s"] = round(cloud_threads_cpu() - cloud_cpu, 3)
    user, kernel, waits = (b - a for a, b in zip(loop, loop_thread(), strict=True))
    run["loop_thread_per_server"] = {
        "user_ms": round(1000 * user / n, 2),
        "kernel_ms": round(1000 * kernel / n, 2),
        "waits": round(waits / n, 1),
    }
    run["throttled_by_action"] = dict(Counter(cloud.throttled) - throttled)
    consoles = int(run["api_calls"].get("GetConsoleOutput", 0))
    run["console_calls"] = consoles
    run["console_floor_s"] = round(console_floor(consoles, api_rate), 3)
    run["controller_cpu_ms_per_server"] = round(1000 * run["controller_cpu_s"] / n, 2)
    sampled = run.pop("_last_running_at")
    run.pop("_running_at")
    end = sampled + run["wall_s"] - run["cloud_last_running_s"]  # provision_servers returned
    # the cloud's own moments (its engine's hooks), not the 20 ms samples
    last = timeline.last_up or sampled
    running = timeline.ups()
    run["timeline"] = timeline.summary(last, end)
    # what EC2's rate leaves of the share to any client: the last console it can read
    # (none when no console was read: host keys from the user data)
    floor = ideal_reads(running, api_rate) - last if consoles else 0.0
    run["share_floor_s"] = round(max(0.0, floor), 3)
    run["host_keys"] = m.host_keys
    run["running_spread_s"] = round(last - min(running), 3) if running else 0.0
    run["last_split"] = _split(run["timeline"].get("last_ready_path", {}))
    polls = [t for t in run.pop("_describe_at") if t >= last]
    run["library_share_s"] = round(end - last, 3)
    run["poll_wait_s"] = round(polls[0] - last, 3) if polls else None
    if run["poll_wait_s"] is not None:
        run["after_poll_s"] = round(run["library_share_s"] - run["poll_wait_s"], 3)
    return run


async def _apart_fleet(m: Manager, n: int, gcm: GcMeter) -> dict[str, Any]:
    """One fleet with the cloud in its own process: the controller's CPU (every thread
    of this process but the benchmark's own is the controller's here)."""
    cpu, loop = controller_cpu(), loop_thread()
    collected = gcm.of(_controller_threads())
    t = time.perf_counter()
    servers = await m.provision_servers(n)
    wall = time.perf_counter() - t
    answered = sum([await s.ping() for s in servers])
    await m.terminate_servers(servers)
    gc_s, gc_full_s, _ = (
        b - a for a, b in zip(collected, gcm.of(_controller_threads()), strict=True)
    )
    user, kernel, waits = (b - a for a, b in zip(loop, loop_thread(), strict=True))
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "answered_ssh": answered,
        "controller_cpu_s": round(controller_cpu() - cpu, 3),
        "controller_gc_cpu_s": round(gc_s, 3),
        "controller_gc_full_cpu_s": round(gc_full_s, 3),
        "loop_thread_per_server": {
            "user_ms": round(1000 * user / n, 2),
            "kernel_ms": round(1000 * kernel / n, 2),
            "waits": round(waits / n, 1),
        },
    }


async def _apart(
    order: list[int], pending: float, poll_interval: float, gcm: GcMeter
) -> list[dict[str, Any]]:
    """The same fleets, in the same order, with the local cloud in a process of its own
    (as on EC2: the controller does not share its interpreter with the cloud)."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="asyncstage-bench-") as dotdir:
        async with (
            cloud_apart(pending) as cloud,
            local_manager(
                cloud,
                dotdir=dotdir,
                on_exit="terminate",
                scan=False,
                verbosity=0,
                poll_interval=poll_interval,
            ) as m,
        ):
            for n in order:
                runs.append(await _apart_fleet(m, n, gcm))
                print(f"fleet of {n}, the cloud in its own process: {runs[-1]}")
    return runs


async def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--sizes", type=lambda v: [int(n) for n in v.split(",")], default=None)
    given, rest = own.parse_known_args()
    args = parse_args(__doc__ or "", rest)
    quick = args.quick
    sizes = [1, 3] if quick else [1, 10, 50, 100, 200]
    pending = 1.0 if quick else 20.0
    # the first single pays the run's one-time work: not part of the baseline; the
    # smallest fleet, whose per-further-server figure the baseline moves most, thrice
    order = [1, 3, 1] if quick else [1, 1, 10, 50, 1, 10, 100, 200, 1, 10]
    if given.sizes:  # a part of the run (one server around the others)
        sizes = sorted({1, *given.sizes})
        order = [1, 1, *(n for n in given.sizes if n != 1), 1]
    steps = _with_user_data(order, quick)
    poll_interval = 0.5
    report = Report("fleet_ec2", quick, args.results)
    report.params = {
        "sizes": sizes,
        "order": [f"{n}{'u' if keys == USER_DATA else ''}" for n, keys in steps],
        "pending_s": pending,
        "poll_interval_s": poll_interval,
        "realism": "aws, pending added",
    }
    realism = dataclasses.replace(Realism(), pending=pending)
    runs: list[dict[str, Any]] = []
    keyed: list[dict[str, Any]] = []  # host keys from the user data
    with GcMeter() as gcm:
        async with local_cloud(0.0, realism, poll_interval=poll_interval) as (cloud, m):
            for n, keys in steps:
                _host_keys_from(m, keys)
                done = await _fleet(cloud, m, n, realism.api_rate, gcm)
                (keyed if keys == USER_DATA else runs).append(done)
                print(f"fleet of {n} ({keys}): {dict(done, timeline='...')}")
        report.mark_load("after_fleets")
        apart = await _apart(order, pending, poll_interval, gcm)
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
            "Describe calls",
            "consoles",
            "EC2-rate floor s",
            "last: cloud s",
            "pause s",
            "client s",
            "ssh s",
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
                r["api_calls"].get("DescribeInstances", 0),
                r["console_calls"],
                r["share_floor_s"],
                *(r["last_split"].get(k, "-") for k in ("cloud_s", "pause_s", "client_s", "ssh_s")),
            ]
            for r in table
        ],
    )
    report.results.update(
        {"runs": runs, "single_s": single, "single_library_share_s": single_share}
    )
    _user_data_rows(report, keyed, pending)
    _fleet_targets(report, fleets[-1], singles, pending, keyed=False)
    every = [r for r in runs if r["n"] > 1]
    further = per_further_server(every, singles, less=_gc_cpu)
    report.results["controller_cpu_ms_per_further_server"] = further
    report.results["controller_cpu_ms_per_further_server_runs"] = further_runs(
        every, singles, less=_gc_cpu
    )
    report.results["controller_cpu_ms_per_further_server_with_gc"] = per_further_server(
        every, singles
    )
    flat = [ms for n, ms in further.items() if n >= 10]
    value = ratio(max(flat), min(flat)) if flat else 1.0
    apart_value, apart_text = _apart_rows(report, apart, sizes)
    shared = value > 1.5 >= apart_value
    report.target(
        "fleet_ec2_controller_cpu_flat",
        value,
        "<=",
        1.5,
        "controller CPU per further server (beyond one server's launch; the garbage "
        "collector's apart), highest / lowest over fleets of 10 and more (flat in N)",
        bound=SHARED_BOUND if shared else "library",
        evidence=_cpu_flat_text(fleets, singles, every) + "; " + apart_text,
    )
    report.target(
        "fleet_ec2_controller_cpu_flat_cloud_apart",
        apart_value,
        "<=",
        1.5,
        "the same with the local cloud in a process of its own (as on EC2: the cloud is "
        "not in the controller's process), highest / lowest over fleets of 10 and more",
        bound="library",
        evidence=apart_text,
    )
    report.save()


def _gc_cpu(run: dict[str, Any]) -> float:
    """A run's garbage collections' CPU in the controller's threads (judged apart)."""
    return float(run["controller_gc_cpu_s"])


def _runs_text(runs: list[float]) -> str:
    """A size's runs, when there were several (its figure is their median)."""
    return f" (median of {', '.join(f'{ms:g}' for ms in runs)})" if len(runs) > 1 else ""


SHARED_BOUND = (
    "the benchmark's process: the in-process local cloud's threads hold the interpreter's "
    "lock in turns with the controller's event loop, more so the larger the fleet (the "
    "same fleets with the cloud in its own process: fleet_ec2_controller_cpu_flat_cloud_apart)"
)


def _apart_rows(report: Report, apart: list[dict[str, Any]], sizes: list[int]) -> tuple[float, str]:
    """The table of the fleets with the cloud in its own process; their flatness and
    the text that gives it."""
    singles = [r for r in apart if r["n"] == 1]
    fleets = [next(r for r in apart if r["n"] == n) for n in sizes[1:]]
    every = [r for r in apart if r["n"] > 1]
    further = per_further_server(every, singles, less=_gc_cpu)
    each = further_runs(every, singles, less=_gc_cpu)
    report.results["cloud_apart"] = {
        "runs": apart,
        "controller_cpu_ms_per_further_server": further,
        "controller_cpu_ms_per_further_server_runs": each,
    }
    report.table(
        "The same fleets, the local cloud in a process of its own (one server: its last "
        f"run; per further server against the median of {max(1, len(singles) - 1)})",
        ["N", "wall s", "controller CPU s", "ms/further server", "loop user ms", "kernel ms"],
        [
            [
                r["n"],
                r["wall_s"],
                r["controller_cpu_s"],
                further.get(r["n"], "-"),
                r["loop_thread_per_server"]["user_ms"],
                r["loop_thread_per_server"]["kernel_ms"],
            ]
            for r in [singles[-1], *fleets]
        ],
    )
    flat = [ms for n, ms in further.items() if n >= 10]
    value = ratio(max(flat), min(flat)) if flat else 1.0
    text = (
        "with the local cloud in a process of its own (the same order and pace), controller "
        f"CPU ms per further server beyond one server's launch ({1000 * baseline(singles):.0f} "
        "ms): "
        + ", ".join(f"N={n} {ms:g}{_runs_text(each[n])}" for n, ms in further.items())
        + f" ({value}× highest / lowest); the event loop's thread per server (user ms, "
        "kernel ms, waits): "
        + ", ".join(
            f"N={r['n']} {t['user_ms']:g}, {t['kernel_ms']:g}, {t['waits']:g}"
            for r in fleets
            if (t := r["loop_thread_per_server"])
        )
    )
    return value, text


USER_DATA: HostKeySource = "user-data"


def _with_user_data(order: list[int], quick: bool = False) -> list[tuple[int, HostKeySource]]:
    """The console runs in ``order``, with the user-data runs between them: one server
    after the first and before the largest fleet and at the end, the largest fleet right
    after the console's (the same cloud, in the same state, for both). Quick: the
    largest fleet and one server, once each (a smoke test of both kinds)."""
    big = max(order)
    if quick:
        return [*((n, "console") for n in order), (big, USER_DATA), (1, USER_DATA)]
    steps: list[tuple[int, HostKeySource]] = []
    for i, n in enumerate(order):
        if n == big:
            steps += [(1, USER_DATA), (n, "console"), (n, USER_DATA)]
        else:
            steps.append((n, "console"))
        if i == 0:
            steps.append((1, USER_DATA))
    return [*steps, (1, USER_DATA)]


def _host_keys_from(m: Manager, source: HostKeySource) -> None:
    """New servers' host keys from ``source``: one manager for both kinds of run (the
    same account, client and cloud), switched between them (white box: its context)."""
    m.context.host_keys = m.host_keys = source


def _user_data_rows(report: Report, keyed: list[dict[str, Any]], pending: float) -> None:
    """The table and targets of the fleets whose host keys came from their user data."""
    singles = [r for r in keyed if r["n"] == 1]
    fleets = [r for r in keyed if r["n"] > 1]
    if not singles or not fleets:
        return
    single = statistics.median(r["wall_s"] for r in singles)
    single_share = statistics.median(r["library_share_s"] for r in singles)
    one = min(singles, key=lambda r: abs(r["wall_s"] - single))
    big = fleets[-1]
    report.table(
        f"Host keys from the user data (no console; the same pending {pending:g} s; one "
        f"server: median of {len(singles)})",
        [
            "N",
            "wall s",
            "× one",
            "cloud all running s",
            "library s",
            "consoles",
            "key replaced: median s",
            "max s",
            "controller CPU s",
            "ms/server",
        ],
        [
            [
                r["n"],
                r["wall_s"],
                ratio(r["wall_s"], single),
                r["cloud_last_running_s"],
                r["library_share_s"],
                r["console_calls"],
                r["timeline"].get("rotation_median_s") or "-",
                r["timeline"].get("rotation_max_s") or "-",
                r["controller_cpu_s"],
                r["controller_cpu_ms_per_server"],
            ]
            for r in (one, *fleets)
        ],
    )
    report.results.update(
        {
            "user_data_runs": keyed,
            "user_data_single_s": single,
            "user_data_single_library_share_s": single_share,
        }
    )
    _fleet_targets(report, big, singles, pending, keyed=True)


def _fleet_targets(
    report: Report,
    big: dict[str, Any],
    singles: list[dict[str, Any]],
    pending: float,
    *,
    keyed: bool,
) -> None:
    """The largest fleet's targets against one server (``singles``: its runs): the wall
    time's ratio and the library's share (``keyed``: host keys from the user data)."""
    n = big["n"]
    walls = [r["wall_s"] for r in singles]
    single = statistics.median(walls)
    single_share = statistics.median(r["library_share_s"] for r in singles)
    name = f"fleet_ec2_{n}_user_data" if keyed else f"fleet_ec2_{n}"
    whose = " whose host keys come from their user data" if keyed else ""
    vs_single = ratio(big["wall_s"], single)
    report.target(
        f"{name}_vs_single",
        vs_single,
        "<=",
        1.3,
        f"wall time of a fleet of {n}{whose} relative to one server"
        f"{' so keyed' if keyed else ''}, EC2's pace (pending {pending:g} s)",
        spread=[ratio(big["wall_s"], max(walls)), ratio(big["wall_s"], min(walls))],
        **_ratio_bound(big, single, pending, vs_single),
    )
    report.target(
        f"{name}_library_share",
        big["library_share_s"],
        "<=",
        1.0,
        f"the library's share of a fleet of {n}{whose}: from the last instance running "
        "(sshd listening) to all ready" + (", keys replaced" if keyed else ""),
        unit=" s",
        **_share_bound(big, single_share),
    )


def _cpu_flat_text(
    fleets: list[dict[str, Any]], singles: list[dict[str, Any]], every: list[dict[str, Any]]
) -> str:
    """Per further server (one server's launch apart; ``every`` run of a fleet, a size
    run more than once judged on its median), per server, and the cloud's threads."""
    one = baseline(singles)
    each = further_runs(every, singles, less=_gc_cpu)
    per_server = [r["controller_cpu_ms_per_server"] for r in fleets if r["n"] >= 10]
    return (
        f"controller CPU ms per further server, beyond one server's launch ({1000 * one:.0f} "
        "ms: its poll rounds over the pending time and its calls, whatever N): "
        + ", ".join(
            f"N={n} {ms:g}{_runs_text(each[n])}"
            for n, ms in per_further_server(every, singles, less=_gc_cpu).items()
        )
        + "; per server, that launch included: "
        + ", ".join(f"N={r['n']} {r['controller_cpu_ms_per_server']:g}" for r in fleets)
        + (
            f" ({ratio(max(per_server), min(per_server))}× highest / lowest: the launch's "
            "fixed cost spread over 10 servers)"
            if per_server
            else ""
        )
        + "; the garbage collector's CPU in the controller's threads (of it full "
        "collections, which scan the whole process, the local cloud's objects too; they "
        "come at thresholds, not per server: a fleet of 10 sets none off), ms per server: "
        + ", ".join(
            f"N={r['n']} {1000 * r['controller_gc_cpu_s'] / r['n']:.2f} "
            f"({1000 * r['controller_gc_full_cpu_s'] / r['n']:.2f})"
            for r in fleets
        )
        + "; with it: "
        + ", ".join(f"N={n} {ms:g}" for n, ms in per_further_server(every, singles).items())
        + "; the controller is this process's threads but the local cloud's, whose own "
        "threads used (CPU s): "
        + ", ".join(f"N={r['n']} {r.get('cloud_threads_cpu_s', 0):g}" for r in fleets)
        + "; the event loop's thread per server (user ms, kernel ms, waits for the CPU "
        "or the interpreter's lock): "
        + ", ".join(
            f"N={r['n']} {t['user_ms']:g}, {t['kernel_ms']:g}, {t['waits']:g}"
            for r in fleets
            if (t := r.get("loop_thread_per_server"))
        )
        + "; DescribeInstances calls: "
        + ", ".join(f"N={r['n']} {r['api_calls'].get('DescribeInstances', 0)}" for r in fleets)
    )


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
    if big.get("host_keys") == USER_DATA:
        return (
            f"{big['console_calls']} GetConsoleOutput calls for the {big['n']} host keys "
            f"(given in the user data, pinned at once, each replaced at the first contact: "
            f"{tl.get('rotations', 0)} replaced, median {tl.get('rotation_median_s')} s, at "
            f"most {tl.get('rotation_max_s')} s each, inside the share): no EC2-rate floor"
        )
    return (
        f"{big['console_calls']} GetConsoleOutput calls for the {big['n']} host keys "
        f"({throttled} throttled), {tl['console_calls_in_share']} of them after the last "
        f"instance ran; {_floor_text(big)}"
    )


def _tail_text(big: dict[str, Any]) -> str:
    tl = big["timeline"]
    if tl["last_key_known_s"] is None or tl["last_ready_s"] is None:
        return "no console read for a host key"
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


def _split(path: dict[str, Any]) -> dict[str, float]:
    """The last server's way from the last instance running to ready, by whose time it
    was: the cloud's (a round sent before it ran still being answered, the endpoint at
    work on the round that saw it and on its console, a console not written yet), the
    library's poll schedule (the pause before that round), the client's (botocore and
    the event loop around the calls, the queue for a console slot and EC2's rate), ssh
    (the wait for a slot, the handshake and the first command, both ends on this
    machine's cores). Its ``ran_s`` (<= 0) is when its own instance ran."""
    if not path:
        return {}
    return {
        "cloud_s": round(
            path["poll_in_flight_s"] + path["poll_cloud_s"] + path["console_cloud_s"], 3
        ),
        "pause_s": path["poll_pause_s"],
        "client_s": round(path["poll_client_s"] + path["console_library_s"], 3),
        "ssh_s": round(path["ssh_slot_wait_s"] + path["ssh_s"], 3),
        "ran_s": path["ran_s"],
    }


def _way_text(big: dict[str, Any]) -> str:
    """The last server's way, step by step, with whose time each step was."""
    tl, split = big["timeline"], big.get("last_split") or {}
    path = tl.get("last_ready_path") or {}
    if not path or not split:
        return "no traced way"
    lag = tl.get("loop_lag_in_share_s") or {}
    return (
        f"the last server ready (its instance ran {-split['ran_s']:g} s before the last "
        f"one): {split['pause_s']:g} s the poll's pause (the library's schedule), "
        f"{split['cloud_s']:g} s the cloud's (a round in flight {path['poll_in_flight_s']:g} "
        f"s, the endpoint at work on the round that saw it {path['poll_cloud_s']:g} s and "
        f"on its console {path['console_cloud_s']:g} s), {split['client_s']:g} s in the "
        f"client (around the round {path['poll_client_s']:g} s, before its console read "
        f"{path['console_queue_s']:g} s: a console slot and EC2's rate, "
        f"{tl['console_calls_in_share']} reads after the last instance ran), "
        f"{split['ssh_s']:g} s ssh (a slot {path['ssh_slot_wait_s']:g} s, the handshake "
        f"and first command {path['ssh_s']:g} s); the controller's event loop late by up "
        f"to {lag.get('max')} s (median {lag.get('median')} s) in the share; "
        f"{big['api_calls'].get('DescribeInstances', 0)} DescribeInstances for the fleet "
        f"({tl['polls_in_share']} after the last one ran), {big['console_calls']} "
        f"GetConsoleOutput ({tl['console_empty_reads']} empty)"
        + _slowest_text(tl.get("slowest_round") or {})
    )


def _share(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def _slowest_text(slow: dict[str, Any]) -> str:
    """The round the client took longest over, and what the process did meanwhile."""
    if not slow or slow["outside_cloud_s"] < 1.0:
        return ""
    return (
        f"; the slowest round took {slow['seconds']:g} s ({slow['sent_s']:g} to "
        f"{slow['answered_s']:g} s), {slow['outside_cloud_s']:g} s of it outside the cloud's "
        f"endpoint, while the controller's threads used "
        f"{_share(slow['controller_core_share'])} of a core and its event loop was at most "
        f"{slow['loop_lag_max_s']} s late, the cloud's threads in this process "
        f"{_share(slow['cloud_threads_core_share'])} of a core, the machine's cores "
        f"{_share(slow['machine_busy_share'])} busy: it waited on neither the controller's "
        "CPU nor the cloud's endpoint, but in the HTTP exchange between them, inside one "
        "process whose interpreter the local cloud's threads share (not traced further)"
    )


def _share_bound(big: dict[str, Any], single_share: float) -> dict[str, str]:
    """The share target's bound: EC2's API rate when its floor alone misses the target;
    the machine when its cores were saturated in the share."""
    text = (
        f"{_way_text(big)}; {_console_text(big)}; {_tail_text(big)}; "
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
    split = big.get("last_split") or {}
    if split.get("cloud_s", 0.0) > 1.0:  # the cloud's answers alone miss the target
        parts.append("the local cloud: its endpoint's answers (in this process, on the same cores)")
    window = big["timeline"].get("share_window") or {}
    contended = split.get("client_s", 0.0) + split.get("ssh_s", 0.0)
    if (
        split.get("pause_s", 1.0) + split.get("cloud_s", 0.0) < 1.0 < big["library_share_s"]
        and contended > 1.0
        and (window.get("controller_core_share") or 1.0) < 0.5
    ):  # the schedule is small; the calls and handshakes waited, the controller mostly idle
        parts.append(
            "the machine: the controller's calls and handshakes wait outside its own CPU, "
            f"in the process and on the {CORES} cores it shares with the local cloud and "
            "the instances' sshd (the controller used "
            f"{_share(window.get('controller_core_share'))} of a core in the share)"
        )
    if (big["timeline"].get("share_machine_busy_share") or 0) >= 0.9:
        parts.append(
            f"the machine: its {CORES} cores saturated in the share (the ssh handshakes' "
            "two ends, the instances' sshd, the in-process cloud and the controller on "
            "the same cores)"
        )
    if big["library_share_s"] <= 1.0:
        parts = []
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
    tl = big["timeline"]
    saturated = (tl.get("share_machine_busy_share") or 0.0) >= 0.9
    if saturated:
        text += (
            f"; after the last instance ran the machine's {CORES} cores were "
            f"{tl['share_machine_busy_share']:.0%} busy ({tl['share_machine_busy_s']:g} CPU s, "
            f"the controller's {tl['share_controller_cpu_s']:g} of them)"
        )
    if limit / single <= 1.3 and not (saturated and vs_single > 1.3):
        # a client could meet the target within EC2's rate, on cores to spare
        return {"bound": "library", "evidence": text}
    parts = [API_BOUND] if big["share_floor_s"] > 1.0 else []
    if cloud > pending + 1.0:
        parts.append(f"the machine: the {big['n']} hosts' boot outlasted the pending time")
    if saturated:
        parts.append(
            f"the machine: its {CORES} cores saturated after the last instance ran (the "
            f"{big['n']} servers' ssh handshakes and first commands at both ends, the "
            "instances' sshd, the in-process cloud and the controller on the same cores)"
        )
    return {"bound": "; and ".join(parts) or "library", "evidence": text}


if __name__ == "__main__":
    anyio.run(main)
