"""Waits on EC2 resources: polls that start fast and back off; concurrent waits on
instances share their poll rounds. Each takes the :class:`Client` to poll with; its
``poll_interval`` is the first pause, growing by ``poll_backoff`` up to
``poll_max_interval``.

A wait for instances to run polls at ``poll_interval`` again as the pending time its
client saw before comes to an end (EC2's pending time is much the same from one launch
to the next), and while a fleet's instances are arriving: a second spent between an
instance running and the library noticing it is a second of every launch.
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
"""How many pending times (launch to running) a client remembers."""

_pending_seen: weakref.WeakKeyDictionary[Client, deque[float]] = weakref.WeakKeyDictionary()
"""Per client, the pending times of its latest instances (seconds, on EC2's clock)."""


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
    """Call ``fetch`` until it returns true, pausing 1 s, 1.5 s, 2.25 s ... in between
    (less when ``eta()`` expects the end sooner, never under half the first pause).

    A round in which ``progress()`` grew (a fleet's instances arriving one by one)
    starts the pauses over and holds them at the first for ``_STEADY`` seconds: the
    rest are likely close, and one call polls them all.
    """
    interval = client.poll_interval
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else 0
    moved: float | None = None  # when progress last grew
    while True:
        if await fetch():
            return
        now = time.monotonic()
        if progress is not None and progress() != seen:
            seen, moved = progress(), now
        if moved is not None and now - moved < _STEADY:
            interval = client.poll_interval
        left = deadline - now
        if left <= 0:
            raise WaitTimeout(what, timeout=timeout, last_state=last_state())
        expected = eta() if eta is not None else None
        pause = interval if expected is None else max(client.poll_interval / 2, expected)
        await anyio.sleep(min(interval, pause, left))
        interval = min(interval * client.poll_backoff, client.poll_max_interval)


def _launched(instance: Resource) -> datetime | None:
    """An instance's ``LaunchTime`` (its last start), timezone-aware; None if unknown."""
    launched = instance.get("LaunchTime")
    if not isinstance(launched, datetime):
        return None
    return launched if launched.tzinfo is not None else launched.replace(tzinfo=UTC)


def _pending_eta(client: Client, pending: Mapping[str, Resource]) -> float | None:
    """Seconds until the first of these pending instances may be running: three
    quarters of the shortest pending time this client saw lately (pending times vary,
    and each was seen a poll round late), at least ``poll_interval`` (poll at that
    pace once it is due); None when nothing is known, or when it is overdue by as long
    again (the pending time changed: back off as usual)."""
    seen = _pending_seen.get(client)
    if not seen or not pending:
        return None
    expect = 0.75 * min(seen)
    now = client.now()
    since = [
        (now - at).total_seconds() for at in map(_launched, pending.values()) if at is not None
    ]
    if not since:
        return None
    left = expect - max(since)
    if left < -max(expect, _STEADY):
        return None
    return max(client.poll_interval, left)


def _learn_pending(client: Client, instance: Resource) -> None:
    """Remember how long this instance, just seen running, was pending."""
    launched = _launched(instance)
    if launched is not None:
        took = (client.now() - launched).total_seconds()
        if took >= 0:
            _pending_seen.setdefault(client, deque(maxlen=_PENDING_KEPT)).append(took)


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
    called as soon as each one gets there.
    """
    reached: dict[str, Resource] = {}
    failed: dict[str, Exception] = {}
    last: dict[str, str] = {}
    pending: dict[str, Resource] = {}  # the instances last seen pending (towards running)
    waiting = set(ids)
    dead = {"running": {"shutting-down", "terminated"}, "stopped": {"terminated"}}.get(state, set())

    def label(i: str) -> str:
        return f"{labels[i]} ({i})" if i in labels else i

    async def fetch() -> bool:
        found = await client.describe_instances_shared(waiting)
        for iid, inst in found.items():
            now = inst.get("State", {}).get("Name", "unknown")
            last[iid] = now
            if now == "pending" and state == "running":
                pending[iid] = inst
            if now == state:
                if pending.pop(iid, None) is not None:
                    _learn_pending(client, inst)
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
) -> Resource:
    """Poll one volume until ``check`` accepts it."""
    seen: dict[str, Resource] = {}

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

    await poll(client, fetch, what=what, timeout=timeout, last_state=last)
    return seen["v"]


async def wait_for_snapshot(
    client: Client,
    snapshot_id: str,
    *,
    timeout: float,
    on_progress: Callable[[Resource], object] | None = None,
) -> Resource:
    """Poll a snapshot until it is completed, following its ``Progress``.

    Each new Progress (``"0%"`` ... ``"100%"``) is logged and given to
    ``on_progress`` (the snapshot's description). A Progress that stands still is
    waited on: EC2's snapshots may pause for long, so only ``timeout`` ends the wait
    (:class:`WaitTimeout` with the last state and progress).
    """
    seen: dict[str, Resource] = {}
    first: list[tuple[float, float]] = []  # (when, percent) of the first progress seen

    async def fetch() -> bool:
        found = await client.describe_snapshots([snapshot_id])
        if not found:
            raise UnknownSnapshot(f"snapshot {snapshot_id} does not exist")
        before = seen.get("s", {}).get("Progress")
        seen["s"] = snap = found[0]
        if not first and (done := _percent(snap)) is not None:
            first.append((time.monotonic(), done))
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
        """Seconds left at the pace Progress has kept so far (None: no pace yet)."""
        done = _percent(seen["s"])
        if not first or done is None or done <= first[0][1]:
            return None
        since, start = first[0]
        return (time.monotonic() - since) * (100 - done) / (done - start)

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
