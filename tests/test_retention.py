"""Retention by restic's ``forget --keep-*`` rules: the plan (no cloud), then forget on one.

The plan's cases follow restic's own: calendar buckets in UTC, the newest snapshot of
each period kept, ``within`` counted from the newest snapshot; beyond restic, the newest
completed snapshot, pending ones and those an image uses are never removed.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager
from asyncstage.adoption import owner_tags
from asyncstage.ec2 import tag
from asyncstage.errors import InvalidArgument
from asyncstage.localcloud import LocalCloud
from asyncstage.retention import InvalidPolicy, Policy, forget, parse_duration, plan
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

T0 = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)  # a Sunday


def snaps(*hours_ago: float, state: str = "completed") -> list[dict[str, Any]]:
    return [
        {"SnapshotId": f"snap-{h:g}h", "StartTime": T0 - timedelta(hours=h), "State": state}
        for h in hours_ago
    ]


def kept(decisions: list[Any]) -> list[str]:
    return [d.snapshot_id for d in decisions if d.keep]


def test_keep_last_keeps_the_newest_n_and_says_why() -> None:
    decisions = plan(snaps(0, 1, 2, 3, 4), Policy(last=2))
    assert kept(decisions) == ["snap-0h", "snap-1h"]
    assert [d.snapshot_id for d in decisions] == [f"snap-{h}h" for h in range(5)]  # newest first
    assert decisions[0].reasons == ("newest completed snapshot", "last snapshot")
    assert decisions[1].reasons == ("last snapshot",)
    assert decisions[4].reasons == ("no rule keeps it",)
    assert str(decisions[4]).startswith("remove snap-4h 2026-03-15 08:00:00: no rule keeps it")


def test_calendar_buckets_keep_the_newest_of_each_period() -> None:
    # every 6 hours over 10 days: daily 3 keeps the newest of each of the last 3 days
    history = snaps(*range(0, 240, 6))
    decisions = plan(history, Policy(daily=3))
    assert kept(decisions) == ["snap-0h", "snap-18h", "snap-42h"]  # 12:00, then 18:00s
    hourly = plan(snaps(0, 0.25, 0.5, 1, 1.5, 3), Policy(hourly=3))
    assert kept(hourly) == ["snap-0h", "snap-0.25h", "snap-1.5h"]  # 12:00, 11:45, 10:30
    # ISO weeks: Sunday 15 March is week 11; Monday 9 March too; Sunday 8 March week 10
    weekly = plan(snaps(0, 24 * 6, 24 * 7, 24 * 14), Policy(weekly=2))
    assert kept(weekly) == ["snap-0h", "snap-168h"]
    monthly = plan(snaps(0, 24 * 20, 24 * 40), Policy(monthly=5))
    assert kept(monthly) == ["snap-0h", "snap-480h"]  # 23 and 3 February: one month
    yearly = plan(snaps(0, 24 * 100, 24 * 400), Policy(yearly=1))
    assert kept(yearly) == ["snap-0h"]
    both = plan(history, Policy(last=1, daily=2))
    assert both[0].reasons == ("newest completed snapshot", "last snapshot", "daily snapshot")


def test_within_counts_from_the_newest_snapshot_not_from_now() -> None:
    old = [{**s, "StartTime": s["StartTime"] - timedelta(days=400)} for s in snaps(0, 10, 30)]
    decisions = plan(old, Policy(within=parse_duration("1d")))
    assert kept(decisions) == ["snap-0h", "snap-10h"]
    assert "within 1 day" in decisions[1].reasons[0]


def test_never_removed_newest_completed_pending_and_used_by_an_image() -> None:
    history = snaps(0, state="pending") + snaps(1, 2, 3)
    decisions = plan(history, Policy(last=1), used_by={"snap-3h": "ami-1"})
    by_id = {d.snapshot_id: d for d in decisions}
    assert by_id["snap-0h"].keep and "pending: not completed yet" in by_id["snap-0h"].reasons
    assert by_id["snap-1h"].reasons == ("newest completed snapshot", "last snapshot")
    assert not by_id["snap-2h"].keep
    assert by_id["snap-3h"].reasons == ("used by image ami-1",)
    # even a policy that would keep nothing else keeps the newest completed one
    assert kept(plan(snaps(5, 6), Policy(within=timedelta(0)))) == ["snap-5h"]
    assert plan([], Policy(last=1)) == []


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"keep_last": -1},
        {"keep_daily": 10**9},
        {"keep_last": True},
        {"keep_last": "3"},
        {"keep_last": 2.5},
        {"keep_within": "-3d"},
        {"keep_within": "3 days"},
        {"keep_within": ""},
        {"keep_within": "9999999y"},
        {"keep_forever": 1},
        {"keep_last": 0},
    ],
)
def test_hostile_policies_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicy) as info:
        Policy.from_options(**options)
    assert isinstance(info.value, InvalidArgument)


def test_durations_and_future_ones() -> None:
    assert parse_duration("1y2m3d4h") == timedelta(days=365 + 60 + 3, hours=4)
    assert parse_duration("36h") == timedelta(hours=36)
    with pytest.raises(InvalidPolicy):
        Policy(within=timedelta(days=-1))


# -- API calls (plain moto: records only) ---------------------------------------------------


@pytest.mark.anyio
async def test_forget_reads_pages_not_one_call_per_snapshot(moto_url: str, tmp_path: Path) -> None:
    async with Manager(
        region="us-east-1",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        image="*",
        dotdir=tmp_path / "dot",
        scan=False,
    ) as m:
        assert m.key_pair is not None
        volume = await m.ec2.create_volume(availability_zone="us-east-1a", size=1)
        count = 150
        for n in range(count):
            await m.ec2.create_snapshot(
                str(volume["VolumeId"]),
                tags={
                    tag("role"): "snapshot",
                    tag("name"): "many",
                    tag("fstype"): "ext4",
                    tag("created"): f"{n:020.6f}",
                    **owner_tags(m.key_pair.name),
                },
            )
        before = Counter(m.ec2.calls)
        result = await forget(m, ["many"], Policy(last=5), report=lambda line: None)
        calls = Counter(m.ec2.calls) - before
        assert sum(d.keep for d in result["many"]) == 5
        assert len(await m.snapshots("many")) == 5
        # two readings of the list, each a few pages and one DescribeImages, and one
        # DeleteSnapshot per snapshot removed (EC2 has no batch delete)
        assert calls["DeleteSnapshot"] == count - 5
        assert calls["DescribeImages"] == 2
        assert 2 <= calls["DescribeSnapshots"] <= 2 * (count // 100 + 2), calls


# -- on the local cloud ---------------------------------------------------------------------


@pytest.mark.localcloud
@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root")
async def test_forget_deletes_by_policy_after_reading_again(
    cloud: LocalCloud, manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    async with manager_factory() as m:
        server = await m.provision_server("retained")
        volume = await server.provision_volume("retained-data", size=1)
        made = []
        with playing(cloud, snapshot_interval=0.0):
            for _ in range(6):
                made.append(await volume.create_snapshot(wait=True))
        now = datetime.now(UTC)
        # one a day, the newest made last
        for days, snapshot_id in enumerate(reversed(made)):
            cloud.set_snapshot_start_time(snapshot_id, now - timedelta(days=days, hours=1))
        listed = await m.snapshots("retained-data")
        assert [s["SnapshotId"] for s in listed] == list(reversed(made))
        lines: list[str] = []
        policy = Policy(last=1, daily=3)
        dry = await forget(m, ["retained-data"], policy, dry_run=True, report=lines.append)
        assert len(lines) == 6 and all(line.startswith("retained-data: ") for line in lines)
        assert len(await m.snapshots("retained-data")) == 6  # a dry run deletes nothing
        doomed = {d.snapshot_id for d in dry["retained-data"] if not d.keep}
        assert doomed == set(made[:3])
        await forget(m, ["retained-data"], policy, report=lines.append)
        left = [s["SnapshotId"] for s in await m.snapshots("retained-data")]
        assert left == list(reversed(made[3:]))
        assert sum(line.startswith("retained-data: removed") for line in lines) == 3
        for snapshot_id in left:
            await m.ec2.delete_snapshot(snapshot_id)
