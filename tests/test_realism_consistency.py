"""EC2's eventual consistency and throttling: the local cloud plays them, the library survives.

The bucket and window arithmetic needs no root; the behaviour tests run real local
clouds of their own (a realism other than the session cloud's) and talk to them through
plain botocore clients (which see EC2's errors) and through the library (which must not).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from asyncstage.ec2 import EC2
from asyncstage.ec2.client import _Fresh
from asyncstage.errors import InvalidArgument
from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._consistency import Consistency, created_ids
from asyncstage.localcloud._realism import BUCKETS, Realism, resolve
from asyncstage.localcloud._throttle import Throttle, cost, unfiltered
from tests.fleet import fleet_cycle
from tests.test_realism_capacity import playing

# -- the arithmetic (no root) -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_request_bucket_burst_then_refill() -> None:
    clock = Clock()
    throttle = Throttle(1.0, clock=clock)
    flt = {"Filter.1.Name": "instance-state-name", "Filter.1.Value.1": "running"}
    assert all(throttle.admit("DescribeInstances", flt) for _ in range(100))  # burst 100
    assert not throttle.admit("DescribeInstances", flt)
    # each action has a bucket of its own: another describe is still at its full burst
    assert sum(throttle.admit("DescribeVolumes", {"VolumeId.1": "v"}) for _ in range(101)) == 100
    clock.now += 0.06  # 20 per second: one token (and a bit)
    assert throttle.admit("DescribeInstances", flt)
    assert not throttle.admit("DescribeInstances", flt)
    clock.now += 1000  # refills up to the burst, not beyond
    assert sum(throttle.admit("DescribeInstances", flt) for _ in range(150)) == 100
    assert throttle.throttled == Counter({"DescribeInstances": 52, "DescribeVolumes": 1})
    # other buckets were untouched
    assert throttle.admit("CreateTags", {"ResourceId.1": "i-1"})


def test_buckets_scale_with_api_rate_and_none_is_unlimited() -> None:
    clock = Clock()
    strict = Throttle(0.1, clock=clock)
    # mutating: 50 * 0.1 = 5 tokens, 5 * 0.1 = 0.5 per second
    assert sum(strict.admit("AttachVolume", {}) for _ in range(10)) == 5
    clock.now += 1.0
    assert sum(strict.admit("AttachVolume", {}) for _ in range(10)) == 0  # half a token
    clock.now += 1.0
    assert sum(strict.admit("AttachVolume", {}) for _ in range(10)) == 1
    assert sum(strict.admit("DeleteTags", {}) for _ in range(10)) == 5  # a bucket of its own
    free = Throttle(None, clock=clock)
    assert all(free.admit("RunInstances", {"MaxCount": "1000"}) for _ in range(100))
    assert not free.throttled


def test_unfiltered_describes_have_their_own_smaller_bucket() -> None:
    assert unfiltered({"Action": "DescribeInstances", "Version": "2016-11-15"})
    assert not unfiltered({"Filter.1.Name": "tag:x", "Filter.1.Value.1": "y"})
    assert not unfiltered({"InstanceId.1": "i-1"})
    assert not unfiltered({"Owner.1": "self"})
    assert not unfiltered({"MaxResults": "5"})
    throttle = Throttle(1.0, clock=Clock())
    assert sum(throttle.admit("DescribeInstances", {}) for _ in range(80)) == 50
    # the filtered bucket is still full
    assert (
        sum(throttle.admit("DescribeInstances", {"InstanceId.1": "i-1"}) for _ in range(120)) == 100
    )


def test_resource_buckets_count_instances() -> None:
    launch = BUCKETS["launch"]
    assert cost("RunInstances", {"MinCount": "1", "MaxCount": "7"}, launch) == 7
    assert cost("StartInstances", {"InstanceId.1": "i-1", "InstanceId.2": "i-2"}, launch) == 2
    assert cost("AttachVolume", {"InstanceId": "i-1"}, BUCKETS["mutating"]) == 1
    clock = Clock()
    throttle = Throttle(1.0, clock=clock)
    assert throttle.admit("RunInstances", {"MaxCount": "600"})
    assert not throttle.admit("RunInstances", {"MaxCount": "401"})
    assert throttle.admit("RunInstances", {"MaxCount": "400"})
    # StartInstances has a bucket of its own, full
    assert throttle.admit("StartInstances", {f"InstanceId.{n}": "i" for n in range(1, 1001)})
    clock.now += 1.0  # 2 instances per second
    assert throttle.admit("RunInstances", {"MaxCount": "2"})
    assert not throttle.admit("RunInstances", {"MaxCount": "1"})
    assert throttle.admit("TerminateInstances", {"InstanceId.1": "i"})  # the halt bucket
    # a launch larger than a strict bucket waits for a full bucket instead of never passing
    small = Throttle(0.01, clock=clock)  # launch bucket: 10 instances
    assert small.admit("RunInstances", {"MaxCount": "100"})
    assert not small.admit("RunInstances", {"MaxCount": "100"})
    clock.now += 500.0  # 0.02 per second: full again
    assert small.admit("RunInstances", {"MaxCount": "100"})


RUN_RESPONSE = b"""<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<instancesSet><item><instanceId>i-0a</instanceId></item><item><instanceId>i-0b</instanceId>
</item></instancesSet></RunInstancesResponse>"""

DESCRIBE = b"""<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<reservationSet>
<item><reservationId>r-1</reservationId><instancesSet>
<item><instanceId>i-0a</instanceId><tagSet/></item>
<item><instanceId>i-0old</instanceId></item></instancesSet></item>
<item><reservationId>r-2</reservationId><instancesSet>
<item><instanceId>i-0b</instanceId></item></instancesSet></item>
</reservationSet></DescribeInstancesResponse>"""


def test_consistency_hides_new_ids_for_their_window() -> None:
    clock = Clock()
    seen = Consistency(clock=clock)
    assert created_ids("RunInstances", RUN_RESPONSE) == ["i-0a", "i-0b"]
    assert created_ids("CreateVolume", b"<volumeId>vol-01</volumeId>") == ["vol-01"]
    assert created_ids("DescribeVolumes", b"<volumeId>vol-01</volumeId>") == []
    seen.created(["i-0a", "i-0b", "vol-01"], [1.0, 2.0, 0.0])  # a 0 window: visible at once
    hidden = seen.hidden()
    assert hidden == {"i-0a", "i-0b"}
    assert seen.refusal({"InstanceId.1": "i-0a", "InstanceId.2": "i-0old"}, hidden) == (
        "InvalidInstanceID.NotFound",
        "The instance ID 'i-0a' does not exist",
    )
    code, message = seen.refusal({"InstanceId.1": "i-0a", "InstanceId.2": "i-0b"}, hidden) or (
        "",
        "",
    )
    assert code == "InvalidInstanceID.NotFound" and "'i-0a, i-0b' do not exist" in message
    assert seen.refusal({"VolumeId": "vol-01", "InstanceId": "i-0old"}, hidden) is None
    # a filter naming a hidden id is not refused: the describe leaves it out
    assert (
        seen.refusal({"Filter.1.Name": "instance-id", "Filter.1.Value.1": "i-0a"}, hidden) is None
    )
    body = seen.leave_out("DescribeInstances", DESCRIBE, hidden)
    assert b"i-0old" in body and b"i-0a" not in body and b"i-0b" not in body
    assert b"r-1" in body and b"r-2" not in body  # a reservation of hidden ones only: gone
    assert b'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"' in body
    clock.now += 1.5
    assert seen.hidden() == {"i-0b"}
    clock.now += 1.0
    assert seen.hidden() == frozenset()
    assert seen.leave_out("DescribeInstances", DESCRIBE, frozenset()) == DESCRIBE


def test_default_profile_hides_some_new_ids_and_harsh_hides_all() -> None:
    draws = random.Random(7)
    aws = [Realism().consistency_window(draws.random) for _ in range(2000)]
    hidden = [w for w in aws if w > 0]
    assert 0.05 < len(hidden) / len(aws) < 0.15  # about Realism().consistency_share
    assert all(0.1 <= w <= 0.5 for w in hidden)
    harsh = [Realism.harsh().consistency_window(draws.random) for _ in range(200)]
    assert all(0 < w <= 0.5 for w in harsh)
    assert {Realism.off().consistency_window(draws.random) for _ in range(50)} == {0.0}
    assert resolve("harsh") == Realism.harsh() and resolve("harsh").name == "harsh"
    with pytest.raises(InvalidArgument):
        resolve("brutal")  # type: ignore[arg-type]


def test_library_retries_not_found_only_for_ids_it_just_created() -> None:
    fresh = _Fresh(60.0)
    fresh.remember("RunInstances", {}, {"Instances": [{"InstanceId": "i-0new"}]})
    fresh.remember("CreateVolume", {}, {"VolumeId": "vol-0new"})
    fresh.remember("CreateSnapshot", {}, {"SnapshotId": "snap-0new"})
    fresh.remember("DescribeVolumes", {}, {"VolumeId": "vol-0other"})  # not a create
    code = "InvalidInstanceID.NotFound"
    wait = fresh.wait(code, "The instance ID 'i-0new' does not exist", {})
    assert wait is not None and 59 < wait <= 60
    # the message names an old id: it is really gone, whatever else the call named
    assert fresh.wait(code, "The instance ID 'i-0old' does not exist", {"X": ["i-0new"]}) is None
    # no id in the message: the call's parameters say
    assert fresh.wait("InvalidVolume.NotFound", "gone", {"VolumeId": "vol-0new"}) is not None
    assert fresh.wait("InvalidVolume.NotFound", "gone", {"VolumeId": "vol-0other"}) is None
    assert fresh.wait("IncorrectState", "The volume 'vol-0new' is busy", {}) is None
    assert fresh.left(["vol-0new", "i-0none"]) > 59
    assert fresh.unseen("vol-") == ["vol-0new"]
    # a call naming a fresh id succeeded: EC2 knows it, no more waiting for it
    fresh.remember("DeleteSnapshot", {"SnapshotId": "snap-0new"}, {})
    assert fresh.unseen("snap-") == [] and fresh.left(["snap-0new"]) == 0
    fresh.remember("DescribeVolumes", {"VolumeId.1": "vol-0new"}, {})  # may leave it out
    assert fresh.unseen("vol-") == ["vol-0new"]
    fresh.seen(["vol-0new"])
    assert fresh.wait("InvalidVolume.NotFound", "The volume 'vol-0new' does not exist.", {}) is None
    assert _Fresh(0).wait(code, "'i-0new'", {}) is None


# -- behaviour on real local clouds -------------------------------------------------------


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the local cloud needs root")


@pytest.fixture
def strict_consistency() -> Realism:
    """Every new id unknown for exactly 0.5 s (the harsh profile: all of them hidden)."""
    return dataclasses.replace(Realism.harsh(), consistency=(0.5, 0.5))


def _raw(cloud: LocalCloud) -> Any:
    """A plain botocore client that does not retry: it sees what EC2 answers."""
    return aioboto3.Session().client(
        "ec2", config=Config(retries={"total_max_attempts": 1}), **cloud.session_kwargs()
    )


async def _terminate_once_known(raw: Any, ids: list[str]) -> None:
    """Terminate new instances through a client that does not retry: once EC2 knows them."""
    with anyio.fail_after(30):
        while True:
            try:
                await raw.terminate_instances(InstanceIds=ids)
                return
            except ClientError as e:
                if _error(e)[0] != "InvalidInstanceID.NotFound":
                    raise
            await anyio.sleep(0.1)


def _error(e: ClientError) -> tuple[str, int]:
    return str(e.response["Error"]["Code"]), int(e.response["ResponseMetadata"]["HTTPStatusCode"])


@pytest.mark.localcloud
@pytest.mark.anyio
async def test_new_ids_not_found_for_raw_clients_but_fine_through_the_library(
    strict_consistency: Realism, tmp_path: Path
) -> None:
    _need_root()
    async with LocalCloud(realism=strict_consistency, seed=12) as cloud:
        # the raw client's looks come one after the other while each new id is hidden: its
        # ids stay hidden 3 s, so that they do on a loaded machine too
        with playing(cloud, consistency=(3.0, 3.0)):
            async with _raw(cloud) as raw:
                vol = (await raw.create_volume(AvailabilityZone="us-east-1a", Size=1))["VolumeId"]
                with pytest.raises(ClientError) as info:
                    await raw.describe_volumes(VolumeIds=[vol])
                assert _error(info.value) == ("InvalidVolume.NotFound", 400)
                assert vol in info.value.response["Error"]["Message"]
                by_filter = [{"Name": "volume-id", "Values": [vol]}]
                listed = await raw.describe_volumes(Filters=by_filter)
                assert listed["Volumes"] == []  # left out, silently
                with pytest.raises(ClientError) as info:
                    await raw.create_tags(Resources=[vol], Tags=[{"Key": "k", "Value": "v"}])
                assert _error(info.value) == ("InvalidVolume.NotFound", 400)
                made_group = await raw.create_security_group(GroupName="raw", Description="raw")
                group = made_group["GroupId"]
                with pytest.raises(ClientError) as info:
                    await raw.describe_security_groups(GroupIds=[group])
                assert _error(info.value) == ("InvalidGroup.NotFound", 400)
                run = await raw.run_instances(
                    ImageId=cloud.image_id, MinCount=2, MaxCount=2, InstanceType="t3.micro"
                )
                ids = [i["InstanceId"] for i in run["Instances"]]
                with pytest.raises(ClientError) as info:
                    await raw.describe_instances(InstanceIds=ids)
                assert _error(info.value) == ("InvalidInstanceID.NotFound", 400)
                everything = await raw.describe_instances()
                assert not {
                    i["InstanceId"] for r in everything["Reservations"] for i in r["Instances"]
                } & set(ids)
                with pytest.raises(ClientError) as info:
                    await raw.attach_volume(VolumeId=vol, InstanceId=ids[0], Device="/dev/sdf")
                unknown = ("InvalidVolume.NotFound", "InvalidInstanceID.NotFound")
                assert _error(info.value)[0] in unknown
                await _terminate_once_known(raw, ids)

        # the library: create, then at once describe, tag, authorize, attach
        kwargs = cloud.session_kwargs()
        async with EC2(region=kwargs.pop("region_name"), **kwargs, poll_interval=0.1) as ec2:
            # new ids hidden 3 s: a loaded machine can take longer than half a second
            # between two calls, and then nothing would be left to absorb
            with playing(cloud, consistency=(3.0, 3.0)):
                made = await ec2.create_volume(availability_zone="us-east-1a", size=1)
                vol2 = str(made["VolumeId"])
                await ec2.create_tags([vol2], {"k": "v"})  # NotFound, retried
                assert ec2.absorbed["InvalidVolume.NotFound"] >= 1
                vol3 = str(
                    (await ec2.create_volume(availability_zone="us-east-1a", size=1))["VolumeId"]
                )
                # a filtered describe leaves it out for a moment: asked again, not "gone"
                assert [v["VolumeId"] for v in await ec2.describe_volumes([vol3])] == [vol3]
                group2 = await ec2.ensure_security_group("lib", cidrs=["127.0.0.1/32"])
                instances = await ec2.run_instances(
                    image_id=cloud.image_id,
                    count=1,
                    instance_type="t3.micro",
                    security_group_ids=[group2],
                    availability_zone="us-east-1a",
                )
                iid = str(instances[0]["InstanceId"])
            await ec2.create_tags([iid], {"Name": "fresh"})
            await ec2.wait_for_instance(iid, "running", timeout=60)
            with playing(cloud, consistency=(3.0, 3.0)):
                snap = await ec2.create_snapshot(vol2, tags={"k": "v"})
                await ec2.delete_snapshot(str(snap["SnapshotId"]))  # at once: absorbed too
            assert ec2.absorbed["InvalidSnapshot.NotFound"] >= 1
            assert ec2.absorbed["InvalidGroup.NotFound"] >= 1
            # a really unknown id still fails at once
            with pytest.raises(Exception) as gone:
                await ec2.create_tags(["vol-0123456789abcdef0"], {"k": "v"})
            assert "vol-0123456789abcdef0" in str(gone.value)
            await ec2.terminate_instances([iid])

        # the manager on top: a server and an attached volume, made and used at once
        async with cloud.manager(
            dotdir=tmp_path, on_exit="terminate", scan=False, poll_interval=0.2
        ) as m:
            server = await m.provision_server("fresh-one")
            volume = await server.provision_volume("fresh-vol", size=1)
            assert (await server.scmd(f"test -d {volume.mtpt} && echo yes")).strip() == "yes"
            assert m.ec2.absorbed, "the window was not met: the test proves nothing"


@pytest.mark.localcloud
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_fleet_as_big_as_the_tag_burst_under_aws_rates_without_error(
    tmp_path: Path,
) -> None:
    # AWS's buckets scaled with the fleet: 40 servers drain CreateTags' burst as 100 do at
    # api_rate=1.0, so each phase meets the same throttling relative to its size (fleets
    # of 200 at AWS's own rates are bench_scale.py's)
    _need_root()
    n = 40
    async with (
        LocalCloud(api_rate=n / BUCKETS["CreateTags"].burst) as cloud,
        cloud.manager(dotdir=tmp_path, on_exit="terminate", scan=False, poll_interval=0.2) as m,
    ):
        small = await fleet_cycle(m, cloud, 10)
        big = await fleet_cycle(m, cloud, n)
    for phase, action in (
        ("provision", "RunInstances"),
        ("stop", "StopInstances"),
        ("start", "StartInstances"),
        ("terminate", "TerminateInstances"),
    ):
        assert big[phase][action] == small[phase][action] == 1, (phase, big, small)
        # a poll round is one DescribeInstances naming every server still on its way,
        # whatever the fleet size (how many rounds 40 servers take to boot follows the
        # machine's load, so no count of them is a yardstick)
        for fleet in (small, big):
            assert fleet["polls"][phase] >= 1, (phase, fleet)
            assert fleet["partial polls"][phase] == 0, (phase, fleet)
    # naming is the one per-server call: one CreateTags per name (and its retries while
    # EC2 does not know the new instance yet), nothing else grows
    assert big["provision"]["CreateTags"] <= n + big["absorbed"]["InvalidInstanceID.NotFound"]


@pytest.mark.localcloud
@pytest.mark.anyio
async def test_strict_api_rate_throttles_and_the_library_absorbs_it(tmp_path: Path) -> None:
    _need_root()
    async with LocalCloud(api_rate=0.05) as cloud:  # Describe*: 5 at once, 1 per second
        async with _raw(cloud) as raw:
            refused: list[tuple[str, int]] = []
            for _ in range(10):
                try:
                    await raw.describe_images(ImageIds=[cloud.image_id])
                except ClientError as e:
                    refused.append(_error(e))
                    assert e.response["Error"]["Message"] == "Request limit exceeded."
            assert refused and set(refused) == {("RequestLimitExceeded", 503)}
        async with cloud.manager(
            dotdir=tmp_path, on_exit="terminate", scan=False, poll_interval=0.2
        ) as m:
            phases = await fleet_cycle(m, cloud, 4)
        assert sum(cloud.throttled.values()) > len(refused), cloud.throttled
        assert phases["throttled"], phases
