"""A fleet's whole life on the local cloud, counted in API calls: shared by the tests that
show a fleet's calls do not grow with its size (tests/test_manager.py, and under AWS's
rate limits tests/test_realism_consistency.py).

How many poll rounds a wait takes follows how long the fleet takes to get there, which
follows the machine's load: no count of DescribeInstances is a yardstick. What does not
follow time is what each poll asks for, so every DescribeInstances the manager's client
makes is recorded with the instances it names and the states its answer shows: a wait
that polls its fleet in one call per round names, in every poll, each instance the
answers so far left short of the phase's state; a wait that polls one instance per call
leaves the others out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import anyio

from asyncstage import Manager, Server
from asyncstage.localcloud import LocalCloud

__all__ = ["calls_since", "fleet_cycle"]

# Each phase: the one call that changes the whole fleet, and the state its wait waits for.
_PHASES = {
    "provision": ("RunInstances", "running"),
    "stop": ("StopInstances", "stopped"),
    "start": ("StartInstances", "running"),
    "terminate": ("TerminateInstances", "terminated"),
}

# What the manager's client asked and was answered, in order: ("ask", operation, the
# instances named or None) and ("answer", operation, {instance: state}).
_Event = tuple[str, str, Any]


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


def _named(params: Mapping[str, Any]) -> frozenset[str] | None:
    """The instances a DescribeInstances names (by id or by the instance-id filter)."""
    ids = set(params.get("InstanceIds", ()))
    for f in params.get("Filters", ()):
        if f.get("Name") == "instance-id":
            ids |= set(f.get("Values", ()))
    return frozenset(ids) if ids else None


def _states(answer: Mapping[str, Any]) -> dict[str, str]:
    return {
        i["InstanceId"]: i.get("State", {}).get("Name", "")
        for r in answer.get("Reservations", ())
        for i in r.get("Instances", ())
    }


@contextmanager
def _recorded(m: Manager, events: list[_Event]) -> Iterator[None]:
    """Record every call of the manager's EC2 client (one per request it makes, its own
    retries aside) while the block runs."""
    original = m.ec2.call

    async def call(operation: str, /, **params: Any) -> Any:
        events.append(("ask", operation, _named(params)))
        answer = await original(operation, **params)
        events.append(("answer", operation, _states(answer)))
        return answer

    vars(m.ec2)["call"] = call
    try:
        yield
    finally:
        del vars(m.ec2)["call"]


def _polls(events: list[_Event], phase: str, fleet: set[str]) -> tuple[int, int]:
    """Of the DescribeInstances naming instances after the phase's fleet call answered:
    how many there were, and how many left out an instance of the fleet that the
    answers until then had not shown in the phase's state."""
    action, target = _PHASES[phase]
    started, short = False, set(fleet)
    polls = partial = 0
    for kind, operation, data in events:
        if kind == "answer" and operation == action:
            started = True
        elif not started or operation != "DescribeInstances":
            continue
        elif kind == "ask" and data is not None:
            polls += 1
            partial += bool(short - data)
        elif kind == "answer":
            short -= {i for i, state in data.items() if state == target}
    return polls, partial


async def fleet_cycle(
    m: Manager, cloud: LocalCloud, n: int, *, ask: bool = False
) -> dict[str, Counter[str]]:
    """Provision, stop, start and terminate ``n`` servers, checking each step (distinct
    addresses, all stopped, all back, none left; with ``ask``, every one answers
    ``hostname`` after its start). The API calls of each phase; under ``polls`` and
    ``partial polls`` per phase the DescribeInstances naming instances after the phase's
    fleet call, and those of them that left out an instance still on its way (see the
    module's docstring); under ``throttled`` and ``absorbed`` the calls throttled and the
    NotFound errors retried."""
    phases: dict[str, Counter[str]] = {"polls": Counter(), "partial polls": Counter()}
    events: dict[str, list[_Event]] = {phase: [] for phase in _PHASES}
    throttled, absorbed = Counter(cloud.throttled), Counter(m.ec2.absorbed)
    before = _mark(cloud)
    with _recorded(m, events["provision"]):
        fleet = await m.provision_servers(n)
    phases["provision"] = calls_since(cloud, before)
    assert len(fleet) == n and len({s.address for s in fleet}) == n
    before = _mark(cloud)
    with _recorded(m, events["stop"]):
        stopped = await m.stop_all_servers()
    phases["stop"] = calls_since(cloud, before)
    assert {s.state for s in stopped} == {"stopped"}
    before = _mark(cloud)
    with _recorded(m, events["start"]):
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
    with _recorded(m, events["terminate"]):
        await m.terminate_all_servers()
    phases["terminate"] = calls_since(cloud, before)
    assert m.servers() == []
    left = await m.ec2.describe_instances([s.instance_id for s in fleet])
    assert all(i["State"]["Name"] == "terminated" for i in left)
    ids = {s.instance_id for s in fleet}
    for phase, recorded in events.items():
        polls, partial = _polls(recorded, phase, ids)
        phases["polls"][phase], phases["partial polls"][phase] = polls, partial
    phases["throttled"] = Counter(cloud.throttled) - throttled
    phases["absorbed"] = Counter(m.ec2.absorbed) - absorbed  # NotFound of new ids, retried
    return phases
