"""A fleet's whole life on the local cloud, counted in API calls: shared by the tests that
show a fleet's calls do not grow with its size (tests/test_manager.py, and under AWS's
rate limits tests/test_realism_consistency.py)."""

from __future__ import annotations

from collections import Counter

import anyio

from asyncstage import Manager, Server
from asyncstage.localcloud import LocalCloud

__all__ = ["calls_since", "fleet_cycle"]


def calls_since(cloud: LocalCloud, before: Counter[str]) -> Counter[str]:
    """The API calls the cloud answered since ``before``, botocore's retries of throttled
    calls left out (``before`` taken net of them too)."""
    now = Counter(cloud.api_calls)
    now.subtract(before)
    now.subtract(cloud.throttled)
    return +now


def _mark(cloud: LocalCloud) -> Counter[str]:
    before = Counter(cloud.api_calls)
    before.subtract(cloud.throttled)
    return before


async def fleet_cycle(
    m: Manager, cloud: LocalCloud, n: int, *, ask: bool = False
) -> dict[str, Counter[str]]:
    """Provision, stop, start and terminate ``n`` servers, checking each step (distinct
    addresses, all stopped, all back, none left; with ``ask``, every one answers
    ``hostname`` after its start). The API calls of each phase, and under ``throttled``
    and ``absorbed`` the calls throttled and the NotFound errors retried."""
    phases: dict[str, Counter[str]] = {}
    throttled, absorbed = Counter(cloud.throttled), Counter(m.ec2.absorbed)
    before = _mark(cloud)
    fleet = await m.provision_servers(n)
    phases["provision"] = calls_since(cloud, before)
    assert len(fleet) == n and len({s.address for s in fleet}) == n
    before = _mark(cloud)
    stopped = await m.stop_all_servers()
    phases["stop"] = calls_since(cloud, before)
    assert {s.state for s in stopped} == {"stopped"}
    before = _mark(cloud)
    started = await m.start_all_servers()
    phases["start"] = calls_since(cloud, before)
    assert len(started) == n
    if ask:
        answers: list[str] = []

        async def one(s: Server) -> None:
            answers.append((await s.scmd("hostname")).strip())

        async with anyio.create_task_group() as tg:
            for s in fleet:
                tg.start_soon(one, s)
        assert len(set(answers)) == n
    before = _mark(cloud)
    await m.terminate_all_servers()
    phases["terminate"] = calls_since(cloud, before)
    assert m.servers() == []
    left = await m.ec2.describe_instances([s.instance_id for s in fleet])
    assert all(i["State"]["Name"] == "terminated" for i in left)
    phases["throttled"] = Counter(cloud.throttled) - throttled
    phases["absorbed"] = Counter(m.ec2.absorbed) - absorbed  # NotFound of new ids, retried
    return phases
