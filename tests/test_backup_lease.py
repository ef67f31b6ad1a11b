"""The backup lease and the sweep on plain moto (API only): one holder at a time, a second
run refused or waiting, renewal, a lease lost to someone else, and a sweep that removes only
what dead runs left."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager
from asyncstage.adoption import owner_tags
from asyncstage.backup import sweep
from asyncstage.backup.lease import Lease, acquire, lease_name, leases, release, with_lease
from asyncstage.backup.runs import RunInfo
from asyncstage.ec2 import tag
from asyncstage.errors import BackupInProgress, InvalidArgument

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager(moto_url: str, tmp_path: Path) -> AsyncIterator[Manager]:
    async with Manager(
        region="us-east-1",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        image="*",
        dotdir=tmp_path / "dot",
        poll_interval=0.05,
        scan=False,
    ) as m:
        yield m


async def test_one_holder_at_a_time_the_second_refused_or_waiting(manager: Manager) -> None:
    inside: list[str] = []
    spans: list[tuple[str, str]] = []
    held = anyio.Event()
    release = anyio.Event()

    async def body(lease: Lease) -> str:
        inside.append(lease.run.run_id)
        assert len(inside) == 1, "two holders at once"
        held.set()
        await release.wait()
        inside.remove(lease.run.run_id)
        spans.append(("done", lease.run.run_id))
        return lease.run.run_id

    first = RunInfo.new("leased", 60.0)
    results: list[str] = []

    async def run(info: RunInfo, wait: float) -> None:
        results.append(await with_lease(manager, info, body, wait=wait, ttl=60.0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, first, 0.0)
        await held.wait()
        with pytest.raises(BackupInProgress, match=first.run_id) as refused:
            await acquire(manager, RunInfo.new("leased", 60.0), wait=0.0)
        assert refused.value.run_id == first.run_id
        assert refused.value.controller == first.controller
        second = RunInfo.new("leased", 60.0)
        tg.start_soon(run, second, 60.0)
        release.set()
    # the bodies ran one after the other; each run returns after giving its lease back, so
    # the second may return first (its body is quick once the first's lease is free)
    assert spans == [("done", first.run_id), ("done", second.run_id)]
    assert sorted(results) == sorted([first.run_id, second.run_id])
    assert await leases(manager) == []


async def test_the_holder_renews_and_stops_when_its_lease_is_taken(manager: Manager) -> None:
    # A lease long enough that a loaded machine never lets it lapse between renewals,
    # renewed often: the test sees its expiry move on, and no other run may take it.
    ttl = 60.0
    run = RunInfo.new("renewed", ttl)
    expiries: list[int] = []

    async def body(lease: Lease) -> None:
        while not expiries or max(expiries) <= run.expires:  # until renewed at least once
            with pytest.raises(BackupInProgress):
                await acquire(manager, RunInfo.new("renewed", ttl), wait=0.0)
            expiries.append(lease.run.expires)
            await anyio.sleep(0.2)
        # then someone deletes the group (a breaker): the holder is stopped
        await manager.ec2.call("DeleteSecurityGroup", GroupId=lease.group_id)
        await anyio.sleep_forever()

    with anyio.fail_after(60), pytest.raises(BackupInProgress, match="its lease is gone"):
        await with_lease(manager, run, body, wait=0.0, ttl=ttl, renew_every=0.3)
    assert max(expiries) > run.expires  # it was renewed
    assert await leases(manager) == []


async def _volume(m: Manager, tags: dict[str, str]) -> str:
    made = await m.ec2.call(
        "CreateVolume",
        AvailabilityZone="us-east-1a",
        Size=1,
        TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    )
    return str(made["VolumeId"])


async def test_sweep_removes_only_what_dead_runs_left(manager: Manager) -> None:
    base: dict[str, Any] = {
        tag("role"): "volume",
        tag("name"): "swept",
        **owner_tags(manager.key_pair.name if manager.key_pair else None),
    }
    dead = RunInfo(**{**RunInfo.new("swept", 60).__dict__, "expires": int(time.time()) - 1})
    live = RunInfo(**{**RunInfo.new("swept", 600).__dict__, "host": "elsewhere"})
    gone = await _volume(manager, {**base, **dead.tags()})
    # a live run holds the lease and has its work volume
    live_lease = await acquire(manager, live, wait=0.0)
    kept = await _volume(manager, {**base, **live.tags()})
    hostile = await _volume(manager, {**base, **live.tags(), tag("backup-run"): "../../x"})

    done = await sweep(manager, "swept")
    assert done.volumes == [gone] and done.kept == [kept] and done.refused == [hostile]
    found = {v["VolumeId"] for v in await manager.ec2.describe_volumes()}
    assert gone not in found and {kept, hostile} <= found

    # the live run's lease expires without renewal: now its volume is a leftover too
    await manager.ec2.create_tags([live_lease.group_id], {tag("backup-expires"): "1"})
    await manager.ec2.create_tags([kept], {tag("backup-expires"): "1"})
    again = await sweep(manager)
    assert again.volumes == [kept] and again.leases == [live_lease.group_id]
    await manager.ec2.delete_volume(hostile)
    assert lease_name("swept") == "asyncstage-backup-swept"


async def test_a_sweep_by_the_lease_holder_lists_no_leases(manager: Manager) -> None:
    """The run that holds a backup's lease sweeps without listing the leases (no other
    lease of the name can exist): every other run's leftovers of the name go, its own
    stay; asked without the name and run it is an error."""
    base: dict[str, Any] = {
        tag("role"): "volume",
        tag("name"): "held",
        **owner_tags(manager.key_pair.name if manager.key_pair else None),
    }
    older = RunInfo(**{**RunInfo.new("held", 600).__dict__, "host": "elsewhere"})
    left = await _volume(manager, {**base, **older.tags()})
    ours = RunInfo.new("held", 60)
    mine = await _volume(manager, {**base, **ours.tags()})
    lease = await acquire(manager, ours, wait=0.0)
    try:
        before = manager.ec2.calls["DescribeSecurityGroups"]
        done = await sweep(manager, "held", current_run=ours.run_id, lease_held=True)
        assert manager.ec2.calls["DescribeSecurityGroups"] == before
        assert done.volumes == [left] and done.kept == [mine]
        with pytest.raises(InvalidArgument):
            await sweep(manager, current_run=ours.run_id, lease_held=True)
    finally:
        await release(manager, lease.group_id)
        await manager.ec2.delete_volume(mine)
