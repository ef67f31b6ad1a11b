"""Waits on EC2 resources: polls that start fast and back off; concurrent waits on
instances share their poll rounds. Each takes the :class:`Client` to poll with; its
``poll_interval`` is the first pause, growing by ``poll_backoff`` up to
``poll_max_interval``.

A wait for instances to run does not back off without bound while they are due: from
the time they may run on (three quarters of the shortest pending time its client saw
before; EC2's shortest, 10 s, before it saw any) it polls at a steady ``poll_interval``
for as long as they may still be pending (twice the longest pending time it saw, at
least twice EC2's longest: 80 s; a boot that outlasts that backs off as usual), and while a
fleet's instances are arriving: a second spent between an instance running and the
library noticing it is a second of every launch. One DescribeInstances serves the
whole fleet's round, and the steady pace is never under a quarter of that action's
refill of EC2's request rate (:mod:`~asyncstage.ec2.rate`). Once each instance was
seen, a round asks EC2 only for those no longer on their way (a filter on the state:
not pending, stopping or shutting down): its answer holds what changed, not the whole
fleet's descriptions, and comes in pages: each instance of a page is handed on
(``on_reached``) as soon as that page is in, while EC2 makes the next, so that what
follows an instance's arrival (its console read, ssh) starts after one page of a
fleet's answer rather than all of it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio

from asyncstage.ec2.client import Client, Resource
from asyncstage.ec2.rate import non_mutating
from asyncstage.errors import EC2Error, UnknownSnapshot, UnknownVolume, WaitTimeout

__all__ = [
    "poll",
    "wait_for_image",
    "wait_for_instance",
    "wait_for_instances",
    "wait_for_snapshot",
    "wait_for_volume",
]

log = logging.getLogger("asyncstage")

_STEADY = 10.0
"""Seconds after an instance of a wait arrived during which the others are polled for
at the first pause (a fleet's instances come up within seconds of each other)."""

_PENDING_KEPT = 16
"""Of how many launches a client remembers the pending times (launch to running)."""

_EC2_PENDING = (10.0, 40.0)
"""EC2's pending time, shortest and longest, seconds: what a client expects before it
saw any of its own."""

_ARRIVED = {
    "running": ("running", "shutting-down", "terminated", "stopping", "stopped"),
    "stopped": ("stopped", "terminated"),
    "terminated": ("terminated",),
}
"""Per state waited for, the states an instance on its way there (``pending``,
``stopping``, ``shutting-down``) may be found in next that end or decide the wait:
once EC2 showed each of a wait's instances, its rounds ask for these only, and EC2
leaves those still on their way out of the answer (a fleet's rounds carry what
changed, not all of its descriptions each time)."""

_volume_seen: weakref.WeakKeyDictionary[Client, dict[str, deque[float]]] = (
    weakref.WeakKeyDictionary()
)
"""Per client and kind of volume wait (``created``, ``attached``, ``detached``), how
long its latest such waits took (seconds, from the wait's start)."""

_STEADY_SHARE = 4
"""The steady polls take at most this share (one in so many) of the refill of their
action's request bucket: other waits and describes of the client draw from it too."""

_pending_seen: weakref.WeakKeyDictionary[Client, deque[tuple[float, float]]] = (
    weakref.WeakKeyDictionary()
)
"""Per client, the shortest and longest pending time of each of its latest waits for
instances to run (seconds, on EC2's clock): one entry a wait, so that a fleet's
instances, whose boot may queue behind each other, count as one launch."""


def _percent(snapshot: Mapping[str, Any]) -> float | None:
    """A snapshot's ``Progress`` (``"42%"``) as a number, if it has one."""
    try:
        return float(str(snapshot.get("Progress", "")).rstrip("%"))
    except ValueError:
        return None


async def poll(
    client: Client,
    fetch: Callable[[], Awaitable[bool]],
    *,
    what: str,
    timeout: float,
    last_state: Callable[[], str | None],
    eta: Callable[[], float | None] | None = None,
    progress: Callable[[], int] | None = None,
) -> None:
    """Call ``fetch`` until it returns true, 1 s, 1.5 s, 2.25 s ... after the start of
    the call before (less when ``eta()``, in seconds from that start, expects the end
    sooner, never under half the first pause; at once when the call took longer).

    An ``eta()`` of at most :func:`steady_interval` holds the pauses there (what is
    awaited is due: a steady pace, no back-off while it is). A round in which ``progress()`` grew
    (a fleet's instances arriving one by one) starts the pauses over and holds them at
    the first for ``_STEADY`` seconds: the rest are likely close, and one call polls
    them all.
    """
    interval = client.poll_interval
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else 0
    moved: float | None = None  # when progress last grew
    while True:
        began = time.monotonic()
        if await fetch():
            return
        now = time.monotonic()
        if progress is not None and progress() != seen:
            seen, moved = progress(), now
        expected = eta() if eta is not None else None
        if expected is not None and expected <= steady_interval(client):
            interval = max(client.poll_interval, expected)  # due: a steady pace
        elif moved is not None and now - moved < _STEADY:
            interval = client.poll_interval
        left = deadline - now
        if left <= 0:
            raise WaitTimeout(what, timeout=timeout, last_state=last_state())
        pause = interval if expected is None else max(client.poll_interval / 2, expected)
        # the pauses are between the rounds' starts: a slow answer is not waited for twice
        await anyio.sleep(max(0.0, min(interval, pause, left) - (now - began)))
        interval = min(interval * client.poll_backoff, client.poll_max_interval)


def steady_interval(client: Client, operation: str = "DescribeInstances") -> float:
    """The pause of a steady poll with ``operation``: ``poll_interval``, but never so
    short that the polls take more than a quarter of the action's refill of EC2's
    request rate (the client's own buckets, when it keeps them)."""
    rate = client.requests.rate.refill if client.requests is not None else None
    if rate is None or not non_mutating(operation):
        return client.poll_interval
    return max(client.poll_interval, _STEADY_SHARE / rate)


def _launched(instance: Resource) -> datetime | None:
    """An instance's ``LaunchTime`` (its last start), timezone-aware; None if unknown."""
    launched = instance.get("LaunchTime")
    if not isinstance(launched, datetime):
        return None
    return launched if launched.tzinfo is not None else launched.replace(tzinfo=UTC)


def _pending_eta(client: Client, pending: Mapping[str, Resource]) -> float | None:
    """Seconds until the next round for these pending instances.

    They are due from three quarters of the shortest pending time this client saw
    lately (pending times vary, and each was seen a poll round late; EC2's shortest
    before it saw any) until twice the longest (at least twice EC2's longest): until
    then the seconds until the first is due, at least the steady pace; while due, the
    steady pace (:func:`steady_interval`); None when nothing is known of them (no
    ``LaunchTime``) or they are overdue (a boot that outlasts twice the longest pending
    time seen: back off as usual).
    """
    if not pending:
        return None
    seen = _pending_seen.get(client)
    if seen:
        shortest, longest = min(s for s, _ in seen), max(s for _, s in seen)
    else:
        shortest, longest = _EC2_PENDING
    start = 0.75 * shortest
    end = 2 * max(longest, _EC2_PENDING[1])
    now = client.now()
    since = [
        (now - at).total_seconds() for at in map(_launched, pending.values()) if at is not None
    ]
    if not since or min(since) > end:
        return None
    steady = steady_interval(client)
    return max(steady, start - max(since))


def _pending_time(client: Client, instance: Resource) -> float | None:
    """How long this instance, just seen running, was pending (None: unknown)."""
    launched = _launched(instance)
    if launched is None:
        return None
    took = (client.now() - launched).total_seconds()
    return took if took >= 0 else None


def _learn_pending(client: Client, took: Sequence[float]) -> None:
    """Remember the pending times of one wait's instances (shortest and longest)."""
    if took:
        kept = _pending_seen.setdefault(client, deque(maxlen=_PENDING_KEPT))
        kept.append((min(took), max(took)))


async def wait_for_instances(
    client: Client,
    ids: Sequence[str],
    state: str,
    *,
    timeout: float,
    labels: Mapping[str, str] = {},
    on_reached: Callable[[str, Resource], None] | None = None,
) -> tuple[dict[str, Resource], dict[str, Exception]]:
    """Wait until every instance is in ``state``; one DescribeInstances per poll round.

    Returns the instances that got there and, per instance that did not, the
    error: :class:`WaitTimeout` with its last state, or :class:`EC2Error` when it
    went somewhere it cannot come back from (terminated while waiting for running).
    ``labels`` name the instances in the errors; ``on_reached(id, instance)`` is
    called as soon as each one gets there: once each was seen, as soon as the page of
    the round's answer that shows it is in.
    """
    reached: dict[str, Resource] = {}
    failed: dict[str, Exception] = {}
    last: dict[str, str] = {}
    pending: dict[str, Resource] = {}  # the instances last seen pending (towards running)
    took: list[float] = []  # the pending times of those seen running since
    waiting = set(ids)
    dead = {"running": {"shutting-down", "terminated"}, "stopped": {"terminated"}}.get(state, set())

    def label(i: str) -> str:
        return f"{labels[i]} ({i})" if i in labels else i

    def see(found: Mapping[str, Resource]) -> None:
        for iid, inst in found.items():
            now = inst.get("State", {}).get("Name", "unknown")
            last[iid] = now
            if now == "pending" and state == "running":
                pending[iid] = inst
            if now == state:
                was_pending = pending.pop(iid, None) is not None
                if was_pending and (t := _pending_time(client, inst)) is not None:
                    took.append(t)
                reached[iid] = inst
                waiting.discard(iid)
                if on_reached is not None:
                    on_reached(iid, inst)
            elif now in dead:
                why = inst.get("StateReason", {}).get("Message")
                failed[iid] = EC2Error(
                    f"instance {label(iid)} went {now} while waiting for {state}"
                    + (f" ({why})" if why else ""),
                    code="IncorrectInstanceState",
                    operation="DescribeInstances",
                )
                waiting.discard(iid)

    async def fetch() -> bool:
        # once each was seen, a round asks only for those that left their way there,
        # and each page of its answer is seen as soon as it is in
        arrived = _ARRIVED.get(state, ()) if waiting.issubset(last) else ()
        seen: set[str] = set()

        def page(found: dict[str, Resource]) -> None:
            seen.update(found)
            see(found)

        found = await client.describe_instances_shared(
            set(waiting), states=arrived, on_page=page if arrived else None
        )
        see({i: d for i, d in found.items() if i not in seen})
        return not waiting

    try:
        await poll(
            client,
            fetch,
            what=f"{len(waiting)} instance(s) to be {state}",
            timeout=timeout,
            last_state=lambda: None,
            eta=lambda: _pending_eta(client, {i: pending[i] for i in waiting if i in pending}),
            progress=lambda: len(reached) + len(failed),
        )
    except WaitTimeout:
        for iid in waiting:
            failed[iid] = WaitTimeout(
                f"instance {label(iid)} to be {state}",
                timeout=timeout,
                last_state=last.get(iid, "unknown"),
            )
    _learn_pending(client, took)
    return reached, failed


async def wait_for_instance(
    client: Client,
    instance_id: str,
    state: str,
    *,
    timeout: float,
    label: str | None = None,
) -> Resource:
    """Wait for one instance (sharing poll rounds with others); raise on failure."""
    reached, failed = await wait_for_instances(
        client, [instance_id], state, timeout=timeout, labels={instance_id: label} if label else {}
    )
    if instance_id in failed:
        raise failed[instance_id]
    return reached[instance_id]


async def wait_for_volume(
    client: Client,
    volume_id: str,
    check: Callable[[Resource], bool],
    *,
    what: str,
    timeout: float,
    kind: str = "",
) -> Resource:
    """Poll one volume until ``check`` accepts it.

    ``kind`` names the change waited for (``created``, ``attached``, ``detached``): the
    client remembers how long its latest such waits took and, from three quarters of the
    shortest until twice the longest, polls at the steady pace (the first pause, halved
    when due at once) instead of backing off; after that, or with no ``kind``, as usual.
    """
    seen: dict[str, Resource] = {}
    started = time.monotonic()

    def eta() -> float | None:
        took = _volume_seen.get(client, {}).get(kind) if kind else None
        if not took:
            return None
        waited = time.monotonic() - started
        if waited > 2 * max(took):
            return None  # overdue: back off as usual
        return max(0.0, 0.75 * min(took) - waited)

    async def fetch() -> bool:
        found = await client.describe_volumes([volume_id])
        if not found:
            raise UnknownVolume(f"volume {volume_id} does not exist")
        seen["v"] = found[0]
        return check(found[0])

    def last() -> str | None:
        vol = seen.get("v")
        if vol is None:
            return None
        att = vol.get("Attachments") or []
        state = str(vol.get("State"))
        return f"{state}, attachment {att[0].get('State')}" if att else state

    await poll(client, fetch, what=what, timeout=timeout, last_state=last, eta=eta)
    if kind:
        kept = _volume_seen.setdefault(client, {}).setdefault(kind, deque(maxlen=_PENDING_KEPT))
        kept.append(time.monotonic() - started)
    return seen["v"]


async def wait_for_snapshot(
    client: Client,
    snapshot_id: str,
    *,
    timeout: float,
    on_progress: Callable[[Resource], object] | None = None,
) -> Resource:
    """Poll a snapshot until it is completed, following its ``Progress`` (the rounds
    shared with other waits: :meth:`Client.describe_snapshots_shared`).

    Each new Progress (``"0%"`` ... ``"100%"``) is logged and given to
    ``on_progress`` (the snapshot's description). A Progress that stands still is
    waited on: EC2's snapshots may pause for long, so only ``timeout`` ends the wait
    (:class:`WaitTimeout` with the last state and progress). Once Progress has moved,
    the next round is asked for when it should reach 100 % at its pace so far. A
    snapshot this client saw completed in the last minute is returned without a call.
    """
    known = client.rounds.completed.get(snapshot_id)
    if known is not None:  # completed is final: seen so lately, it needs no call
        return known
    seen: dict[str, Resource] = {}
    first: list[tuple[float, float]] = []  # (when it held, percent) of the first progress
    polled: float | None = None  # when this wait last asked
    due: float | None = None  # when it should complete, at the pace Progress kept so far

    async def fetch() -> bool:
        nonlocal polled, due
        # the answer to a round asked since the middle of this pause (another wait's) will
        # do, unless that round was asked before the snapshot is due: it says pending still
        now = time.monotonic()
        since = now if polled is None else max((now + polled) / 2, due or 0.0)
        polled = now
        found = await client.describe_snapshots_shared([snapshot_id], since=since)
        if snapshot_id not in found:
            raise UnknownSnapshot(f"snapshot {snapshot_id} does not exist")
        before = seen.get("s", {}).get("Progress")
        seen["s"] = snap = found[snapshot_id]
        # the pace from when each answer held (its round's call), not from when it came:
        # a shared round's answer may be half a pause old
        held = client.rounds.seen_at(snapshot_id) or time.monotonic()
        if (done := _percent(snap)) is not None:
            if not first:
                first.append((held, done))
            elif done > first[0][1]:
                since_first, start = held - first[0][0], first[0][1]
                due = held + since_first * (100 - done) / (done - start)
        if snap.get("State") == "error":
            raise EC2Error(
                f"snapshot {snapshot_id} failed: {snap.get('StateMessage', '')}",
                code="SnapshotError",
            )
        if snap.get("Progress") != before:
            log.debug("snapshot %s: %s %s", snapshot_id, snap.get("State"), snap.get("Progress"))
            if on_progress is not None:
                on_progress(snap)
        return bool(snap.get("State") == "completed")

    def last() -> str | None:
        snap = seen.get("s")
        return None if snap is None else f"{snap.get('State')} {snap.get('Progress') or ''}".strip()

    def eta() -> float | None:
        """Seconds from the round just made until the snapshot is due (None: no pace yet)."""
        return None if due is None or polled is None else max(0.0, due - polled)

    with client.watching_snapshot(snapshot_id):
        await poll(
            client,
            fetch,
            what=f"snapshot {snapshot_id} to complete",
            timeout=timeout,
            last_state=last,
            eta=eta,
        )
    return seen["s"]


async def wait_for_image(
    client: Client,
    image_id: str,
    *,
    timeout: float,
) -> Resource:
    """Poll an image until it is available."""
    seen: dict[str, Resource] = {}

    async def fetch() -> bool:
        found = await client.describe_images([image_id])
        if not found:
            return False
        seen["i"] = found[0]
        if found[0].get("State") in ("failed", "error", "invalid", "deregistered"):
            raise EC2Error(f"image {image_id} is {found[0].get('State')}")
        return bool(found[0].get("State") == "available")

    await poll(
        client,
        fetch,
        what=f"image {image_id} to be available",
        timeout=timeout,
        last_state=lambda: str(seen["i"].get("State")) if seen else None,
    )
    return seen["i"]
