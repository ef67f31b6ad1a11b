"""Capacity and snapshots as EC2 plays them, on the local cloud's realistic profile.

The cloud side (plain aioboto3 clients): InsufficientInstanceCapacity per zone and
instance type on RunInstances and StartInstances, the account's instance limit with
partial launches between MinCount and MaxCount, snapshots ``pending`` with a rising
Progress, and SnapshotCreationPerVolumeRateExceeded. The library side (a Manager):
fallback across zones and instance types, partial launches kept or terminated (checked
against the cloud), a stopped server without capacity, snapshot waits, the rate absorbed.

The tests change the session cloud's :class:`Realism` for a while (:func:`playing`) and
put it back: no cloud of their own to boot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from asyncstage import Manager
from asyncstage.ec2 import tag
from asyncstage.errors import EC2Error, FleetError, InsufficientCapacity, InvalidArgument
from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._realism import Realism, capacity_gaps
from tests.fixtures.cloud import ManagerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

ZONE_A, ZONE_B, ZONE_C, ZONE_D = "us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"


@contextlib.contextmanager
def playing(cloud: LocalCloud, **changes: Any) -> Iterator[Realism]:
    """The cloud plays ``changes`` of its Realism inside the block (put back after)."""
    engine = cloud._engine
    before = engine.realism
    if "insufficient_capacity" in changes:
        changes["insufficient_capacity"] = capacity_gaps(changes["insufficient_capacity"])
    engine.realism = dataclasses.replace(before, **changes)
    try:
        yield engine.realism
    finally:
        engine.realism = before


async def _live(ec2: Any) -> list[dict[str, Any]]:
    """Every instance not terminated, once none is on its way there."""
    while True:
        pages = await ec2.describe_instances()
        found = [i for r in pages["Reservations"] for i in r["Instances"]]
        live = [i for i in found if i["State"]["Name"] != "terminated"]
        if not any(i["State"]["Name"] == "shutting-down" for i in live):
            return live
        await anyio.sleep(0.2)


def _code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def _message(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Message"])


# -- the cloud --------------------------------------------------------------------------


def test_insufficient_capacity_is_part_of_the_profile() -> None:
    cloud = LocalCloud(insufficient_capacity={ZONE_B: ["t3.micro"], ZONE_C: None})
    assert cloud.realism.insufficient_capacity == {ZONE_B: frozenset({"t3.micro"}), ZONE_C: None}
    assert LocalCloud(insufficient_capacity={ZONE_B}).realism.insufficient_capacity == {
        ZONE_B: None
    }
    assert Realism().instance_limit is None and Realism.off().snapshot == (0.0, 0.0)


async def test_run_instances_without_capacity(cloud: LocalCloud, ec2: Any) -> None:
    before = {i["InstanceId"] for i in await _live(ec2)}
    launch = {"ImageId": cloud.image_id, "MinCount": 1, "MaxCount": 2}
    with playing(cloud, insufficient_capacity={ZONE_B: None, ZONE_C: ["t3.micro"]}):
        with pytest.raises(ClientError) as e:
            await ec2.run_instances(
                **launch, InstanceType="t3.micro", Placement={"AvailabilityZone": ZONE_B}
            )
        assert _code(e) == "InsufficientInstanceCapacity"
        message = _message(e)
        assert (
            f"sufficient t3.micro capacity in the Availability Zone you requested ({ZONE_B})"
            in (message)
        )
        assert ZONE_A in message and ZONE_C not in message.split("choosing")[1]
        with pytest.raises(ClientError) as e:  # that type only
            await ec2.run_instances(
                **launch, InstanceType="t3.micro", Placement={"AvailabilityZone": ZONE_C}
            )
        assert _code(e) == "InsufficientInstanceCapacity"
        assert {i["InstanceId"] for i in await _live(ec2)} == before  # nothing launched
        # without a zone EC2 places it where there is capacity
        made = await ec2.run_instances(**launch, InstanceType="t3.micro")
    ids = [i["InstanceId"] for i in made["Instances"]]
    try:
        assert len(ids) == 2
        assert {i["Placement"]["AvailabilityZone"] for i in made["Instances"]} == {ZONE_A}
    finally:
        await ec2.terminate_instances(InstanceIds=ids)


async def test_instance_limit_and_partial_launches(cloud: LocalCloud, ec2: Any) -> None:
    live = len(await _live(ec2))
    launch = {"ImageId": cloud.image_id, "InstanceType": "t3.micro"}
    ids: list[str] = []
    try:
        with playing(cloud, instance_limit=live + 2):
            with pytest.raises(ClientError) as e:
                await ec2.run_instances(**launch, MinCount=3, MaxCount=3)
            assert _code(e) == "InstanceLimitExceeded"
            assert "current instance limit of" in _message(e)
            made = await ec2.run_instances(**launch, MinCount=1, MaxCount=3)
            ids = [i["InstanceId"] for i in made["Instances"]]
            assert len(ids) == 2  # what fits of MinCount..MaxCount
            with pytest.raises(ClientError) as e:
                await ec2.run_instances(**launch, MinCount=1, MaxCount=1)
            assert _code(e) == "InstanceLimitExceeded"
    finally:
        if ids:
            await ec2.terminate_instances(InstanceIds=ids)
    # without the limit MaxCount launches, as before
    made = await ec2.run_instances(**launch, MinCount=1, MaxCount=2)
    await ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in made["Instances"]])
    assert len(made["Instances"]) == 2


async def test_snapshots_pending_with_progress_and_rate(cloud: LocalCloud, ec2: Any) -> None:
    volume = await ec2.create_volume(AvailabilityZone=ZONE_A, Size=1)
    vol_id = volume["VolumeId"]
    try:
        # pending long enough that the looks below come before it ends on a loaded
        # machine too: each is one API call
        with playing(cloud, snapshot=(4.0, 4.0), snapshot_interval=30.0):
            began = time.monotonic()
            snap = await ec2.create_snapshot(VolumeId=vol_id)
            # it starts low and rises (below); how low depends on how long this call took
            assert snap["State"] == "pending" and snap["Progress"] != "100%"
            with pytest.raises(ClientError) as e:
                await ec2.create_snapshot(VolumeId=vol_id)
            assert _code(e) == "SnapshotCreationPerVolumeRateExceeded"
            assert "maximum per volume CreateSnapshot request rate" in _message(e)
            with pytest.raises(ClientError) as e:  # volumes come from completed snapshots
                await ec2.create_volume(AvailabilityZone=ZONE_A, SnapshotId=snap["SnapshotId"])
            assert _code(e) == "IncorrectState"
            seen: list[tuple[str, int]] = []
            while True:
                found = (await ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]]))[
                    "Snapshots"
                ][0]
                seen.append((found["State"], int(found["Progress"].rstrip("%"))))
                if found["State"] == "completed":
                    break
                assert time.monotonic() - began < 30
                await anyio.sleep(0.2)
            took = time.monotonic() - began
        assert took >= 4.0
        assert seen[-1] == ("completed", 100)
        progress = [p for _, p in seen]
        assert progress == sorted(progress) and any(0 < p < 100 for p in progress)
        assert {s for s, _ in seen[:-1]} == {"pending"}
        with playing(cloud, snapshot=(0.0, 0.0), snapshot_interval=0.0):  # as realism="off"
            quick = await ec2.create_snapshot(VolumeId=vol_id)
            # nothing played: at most the image's copy is left from the start
            assert quick["Progress"] in ("99%", "100%"), quick
            with anyio.fail_after(30):
                while True:
                    found = await ec2.describe_snapshots(SnapshotIds=[quick["SnapshotId"]])
                    if found["Snapshots"][0]["State"] == "completed":
                        break
                    await anyio.sleep(0.05)
        for snap_id in (snap["SnapshotId"], quick["SnapshotId"]):
            await ec2.delete_snapshot(SnapshotId=snap_id)
    finally:
        await ec2.delete_volume(VolumeId=vol_id)


# -- the library ------------------------------------------------------------------------


def _type(server: Any) -> str:
    return str(server.instance["InstanceType"])


async def _states(m: Manager, names: list[str]) -> dict[str, str]:
    """Each instance of these names (any state) -> its state, as the cloud says."""
    found = await m.ec2.describe_instances(
        filters=[{"Name": f"tag:{tag('name')}", "Values": names}]
    )
    return {i["InstanceId"]: i["State"]["Name"] for i in found}


async def test_provision_falls_back_across_zones_and_types(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    gaps = {ZONE_A: None, ZONE_B: ["t3.micro"]}
    async with manager_factory(instance_type="t3.micro") as m:
        with playing(cloud, insufficient_capacity=gaps):
            with pytest.raises(InsufficientCapacity) as e:
                await m.provision_server(availability_zone=ZONE_A)
            assert (e.value.zone, e.value.instance_type) == (ZONE_A, "t3.micro")
            assert e.value.code == "InsufficientInstanceCapacity"
            fleet = await m.provision_servers(
                ["fb-1", "fb-2"], zones=[ZONE_A, ZONE_B], instance_types=["t3.micro", "t3.small"]
            )
            assert [(s.availability_zone, _type(s)) for s in fleet] == [(ZONE_B, "t3.small")] * 2
            one = await m.provision_server("fb-3", zones=[ZONE_A, ZONE_C])
            assert (one.availability_zone, _type(one)) == (ZONE_C, "t3.micro")
            assert await one.ping()
            with pytest.raises(InsufficientCapacity) as e:
                await m.provision_servers(2, zones=[ZONE_A, ZONE_B])
            assert "no room for 2 server(s)" in str(e.value) and ZONE_B in str(e.value)
        assert sorted(s.name for s in m.servers()) == ["fb-1", "fb-2", "fb-3"]
        with pytest.raises(InvalidArgument):
            await m.provision_servers(1, zones=[ZONE_A], availability_zone=ZONE_A)
        with pytest.raises(InvalidArgument):
            await m.provision_servers(1, partial="some")  # type: ignore[typeddict-item]


async def test_partial_launch_kept_or_terminated(
    cloud: LocalCloud, ec2: Any, manager_factory: ManagerFactory
) -> None:
    async with manager_factory(instance_type="t3.micro") as m:
        live = len(await _live(ec2))
        with playing(cloud, instance_limit=live + 2):
            names = ["pt-1", "pt-2", "pt-3"]
            with pytest.raises(EC2Error) as e:
                await m.provision_servers(names, zones=[ZONE_A, ZONE_C])
            assert "2 of 3 launched" in str(e.value)
            states = await _states(m, names)
            assert len(states) == 2 and set(states.values()) == {"terminated"}
            assert m.servers() == []
            names = ["pk-1", "pk-2", "pk-3"]
            with pytest.raises(FleetError) as fe:
                await m.provision_servers(names, partial="keep")
            kept = fe.value.succeeded
            assert sorted(s.name for s in kept) == ["pk-1", "pk-2"] and "pk-3" in str(fe.value)
            assert all([await s.ping() for s in kept])
            states = await _states(m, names)
            assert sorted(states) == sorted(s.instance_id for s in kept)
            assert set(states.values()) == {"running"}
            assert sorted(m.servers(), key=lambda s: s.name) == kept  # the manager owns them


async def test_stopped_server_without_capacity(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    async with manager_factory(instance_type="t3.micro") as m:
        stuck = await m.provision_server("cap-stuck", availability_zone=ZONE_D)
        other = await m.provision_server("cap-other", availability_zone=ZONE_A)
        await m.stop_servers([stuck, other])
        with playing(cloud, insufficient_capacity={ZONE_D: None}):
            with pytest.raises(InsufficientCapacity) as e:
                await stuck.start()
            assert (e.value.zone, e.value.instance_type) == (ZONE_D, "t3.micro")
            assert "cap-stuck" in str(e.value) and "stays in its zone" in str(e.value)
            with pytest.raises(FleetError) as fe:
                await m.start_servers([stuck, other])
            assert fe.value.succeeded == [other] and await other.ping()
            assert isinstance(fe.value.exceptions[0], InsufficientCapacity)
            await m.fleet.refresh([stuck])
            assert stuck.state == "stopped"
        await stuck.start()  # capacity is back
        assert await stuck.ping()


async def test_snapshot_waits_follow_progress(
    cloud: LocalCloud, manager_factory: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with manager_factory() as m:
        volume = await m.provision_volume("snap-prog", size=1)
        # no consistency window here: a retried describe of the new id must not outlast the
        # snapshot's pending time (the progress seen is what is under test)
        with playing(cloud, snapshot=(2.0, 2.5), snapshot_interval=1.5, consistency=(0.0, 0.0)):
            first = await volume.create_snapshot()
            began = time.monotonic()
            second = await volume.create_snapshot()  # refused at first, retried
            assert time.monotonic() - began >= 0.5
            seen: list[str] = []
            done = await m.ec2.wait_for_snapshot(
                second, timeout=30, on_progress=lambda s: seen.append(str(s["Progress"]))
            )
            assert done["State"] == "completed" and seen[-1] == "100%" and len(seen) >= 2
            assert m.ec2.calls["CreateSnapshot"] >= 3  # one refused at least
            # a reuse while the newest snapshot is pending waits for it, then uses it
            third = await volume.create_snapshot()
            await volume.delete()
            again = await m.provision_volume("snap-prog", reuse=True)
            assert again.volume["SnapshotId"] == third
            snaps = await m.ec2.describe_snapshots([first, second, third])
            assert {s["State"] for s in snaps} == {"completed"}
            with pytest.raises(EC2Error) as e:  # the bound still holds
                await m.ec2.create_snapshot(again.volume_id, rate_wait=0)
                await m.ec2.create_snapshot(again.volume_id, rate_wait=0)
            assert e.value.code == "SnapshotCreationPerVolumeRateExceeded"


async def test_an_instants_snapshots_are_retried_like_one_volumes(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    async with manager_factory() as m:
        server = await m.provision_server("snaps-rate")
        volume = await server.provision_volume("snaps-rate-data", size=1)
        with playing(cloud, snapshot=(0.2, 0.2), snapshot_interval=1.5, consistency=(0.0, 0.0)):
            first = await m.ec2.create_snapshots(server.instance_id)
            second = await m.ec2.create_snapshots(server.instance_id)  # refused, retried
            assert m.ec2.calls["CreateSnapshots"] >= 3
            assert len(first) == len(second) == 1
        made = [s["SnapshotId"] for s in (*first, *second)]
        for snapshot in await m.ec2.describe_snapshots(made):
            await m.ec2.wait_for_snapshot(snapshot["SnapshotId"], timeout=30)
            await m.ec2.delete_snapshot(snapshot["SnapshotId"])
        await server.terminate()
        await volume.delete()


async def test_instance_lost_at_launch(
    cloud: LocalCloud, ec2: Any, manager_factory: ManagerFactory
) -> None:
    """EC2 sometimes loses a new instance: pending -> terminated with Server.InternalError."""
    with playing(cloud, launch_failure=1.0):
        ran = await ec2.run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1)
        instance_id = ran["Instances"][0]["InstanceId"]
        with anyio.fail_after(30):
            while True:
                found = await ec2.describe_instances(InstanceIds=[instance_id])
                instance = found["Reservations"][0]["Instances"][0]
                if instance["State"]["Name"] == "terminated":
                    break
                await anyio.sleep(0.2)
        assert instance["StateReason"] == {
            "Code": "Server.InternalError",
            "Message": "Server.InternalError: Internal error on launch",
        }
        async with manager_factory() as m:
            with pytest.raises(EC2Error) as e:
                await m.provision_server("lost-1")
            assert "terminated" in str(e.value) and "Internal error on launch" in str(e.value)
            assert m.servers() == []
            assert set((await _states(m, ["lost-1"])).values()) == {"terminated"}
