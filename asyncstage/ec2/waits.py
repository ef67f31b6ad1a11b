"""Waits on EC2 resources: polls that start fast and back off; concurrent waits on
instances share their poll rounds. Each takes the :class:`Client` to poll with; its
``poll_interval`` is the first pause, growing by ``poll_backoff`` up to
``poll_max_interval``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    starts the pauses over: the rest are likely close, and one call polls them all.
    """
    interval = client.poll_interval
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else 0
    while True:
        if await fetch():
            return
        if progress is not None and progress() != seen:
            seen, interval = progress(), client.poll_interval
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, timeout=timeout, last_state=last_state())
        expected = eta() if eta is not None else None
        pause = interval if expected is None else max(client.poll_interval / 2, expected)
        await anyio.sleep(min(interval, pause, left))
        interval = min(interval * client.poll_backoff, client.poll_max_interval)


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
    waiting = set(ids)
    dead = {"running": {"shutting-down", "terminated"}, "stopped": {"terminated"}}.get(state, set())

    def label(i: str) -> str:
        return f"{labels[i]} ({i})" if i in labels else i

    async def fetch() -> bool:
        found = await client.describe_instances_shared(waiting)
        for iid, inst in found.items():
            now = inst.get("State", {}).get("Name", "unknown")
            last[iid] = now
            if now == state:
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
