"""A fleet through a long pending time on the local cloud: polled at a steady pace once
it is due, within EC2's request rate.

EC2 keeps a new instance ``pending`` for 10-40 s. The session cloud plays a pending time
past EC2's shortest for the test's duration (white box: ``cloud._engine.realism``,
restored after). What is under test is the pace the wait asks for (the pauses it
requests, recorded as it requests them), not how late a loaded machine wakes it; the
exact pace is under test on a virtual clock (tests/test_ec2.py).
"""

from __future__ import annotations

import itertools
import os
import types
from collections import Counter

import anyio
import pytest

from asyncstage.ec2 import waits
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

PENDING = 12.0  # past three quarters of EC2's shortest pending time (10 s)
CLOCK_SLACK = 1.5  # EC2's clock is read from its answers' Date header, to the second


async def test_a_long_pending_fleet_is_polled_steadily_within_the_rate(
    cloud: LocalCloud, manager_factory: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    starts: list[float] = []  # when each pause ended: the next round's start
    sleep = anyio.sleep

    async def recorded(delay: float) -> None:
        pauses.append(delay)
        await sleep(delay)
        starts.append(anyio.current_time())

    throttled = Counter(cloud.throttled)
    with playing(cloud, pending=PENDING):
        # a new manager's client has seen no pending time: EC2's decides when it is due
        async with manager_factory(poll_interval=0.5) as m:
            steady = waits.steady_interval(m.ec2)
            monkeypatch.setattr(waits, "anyio", types.SimpleNamespace(sleep=recorded))
            servers = await m.provision_servers(2)
            monkeypatch.undo()
            assert [await s.ping() for s in servers] == [True, True]
            await m.terminate_servers(servers)
    asked = 0.0  # the pauses asked so far: the wait has been at it longer
    due = 0.75 * 10.0 + CLOCK_SLACK
    after_due: list[float] = []
    for pause in pauses:
        if asked >= due:
            after_due.append(pause)
        asked += pause
    # once due, one round a steady pause after the start of the one before (less the
    # time its answer took) until they ran: no back-off
    assert len(after_due) >= 2 and max(after_due) <= steady
    # before, the pauses backed off: fewer rounds than a steady pace would have made
    assert len(pauses) - len(after_due) < due / steady
    # Rounds never start faster than half the steady pace (the pause that brings a
    # round to when they are due), and EC2's bucket for DescribeInstances never ran
    # dry. A pause counts from its round's start: a round whose answer came late (a
    # loaded machine) is followed by a shorter pause, not by an earlier round.
    spacing = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert spacing and min(spacing) >= steady / 2 - 0.01
    assert (Counter(cloud.throttled) - throttled)["DescribeInstances"] == 0
