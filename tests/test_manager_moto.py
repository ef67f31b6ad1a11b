"""Manager behaviour that needs only the EC2 API, on a plain moto server.

moto's instances have non-loopback addresses: these tests never ssh to them
(the end-to-end tests on the local cloud do that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ReadTimeoutError

from asyncstage import Manager
from asyncstage.adoption import OWNER_TAG
from asyncstage.capacity import LaunchOptions
from asyncstage.ec2 import new_client_token, tag, tags_of
from asyncstage.errors import EC2Error, InvalidArgument, InvalidName, NameTaken
from asyncstage.images import user_for_image

pytestmark = pytest.mark.anyio


@pytest.fixture
def make(moto_url: str, tmp_path: Path) -> Any:
    def factory(**options: Any) -> Manager:
        defaults: dict[str, Any] = {
            "region": "us-east-1",
            "endpoint_url": moto_url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "image": "*",
            "dotdir": tmp_path / "dot",
            "poll_interval": 0.05,
            "scan": False,
        }
        return Manager(**(defaults | options))

    return factory


async def _launch(m: Manager, *names: str) -> list[Any]:
    spec = await m.fleet.spec(LaunchOptions())
    servers = await m.fleet.launch(spec, list(names))
    return [servers[n] for n in names]


async def _states(m: Manager, ids: list[str]) -> set[str]:
    return {i["State"]["Name"] for i in await m.ec2.describe_instances(ids)}


async def _group_cidrs(m: Manager) -> set[str]:
    groups = await m.ec2.call("DescribeSecurityGroups", GroupIds=[m.security_group_id])
    return {
        r["CidrIp"]
        for p in groups["SecurityGroups"][0]["IpPermissions"]
        for r in p.get("IpRanges", [])
    }


async def _groups_named(m: Manager, name: str) -> list[Any]:
    found = await m.ec2.call(
        "DescribeSecurityGroups", Filters=[{"Name": "group-name", "Values": [name]}]
    )
    return list(found["SecurityGroups"])


def _writes(m: Manager) -> list[str]:
    return sorted(op for op in m.ec2.calls if not op.startswith(("Describe", "Get")))


async def test_open_and_reads_make_no_write_calls(make: Any, tmp_path: Path) -> None:
    # a region no other test of the module uses: a fresh account
    fresh = {"region": "eu-west-3", "security_group": "readonly-test", "ssh_cidr": None}
    async with make(**fresh, scan=True, dotdir=tmp_path / "reader") as m:
        assert m.servers() == [] and m.volumes() == []
        await m.scan_region()
        assert await m.snapshots() == []
        assert m.known_key_names() == set()
        assert _writes(m) == [] and m.security_group_id is None
        assert await _groups_named(m, "readonly-test") == []
        assert (await m.ec2.call("DescribeKeyPairs"))["KeyPairs"] == []
    assert _writes(m) == []  # closing (on_exit="stop", nothing started) writes nothing


async def test_a_launch_makes_key_and_group_without_opening_the_world(make: Any) -> None:
    async with make(on_exit="terminate") as m:
        await _launch(m, "first-launch")
        assert m.keyfile.exists() and await m.ec2.key_pair_exists(m.key_pair.name)
        assert await _group_cidrs(m) == {"127.0.0.1/32"}
        made = m.ec2.calls["ImportKeyPair"] + m.ec2.calls["CreateSecurityGroup"]
        await _launch(m, "second-launch")  # what the first made is known: no new checks
        assert m.ec2.calls["ImportKeyPair"] + m.ec2.calls["CreateSecurityGroup"] == made
    with pytest.raises(InvalidArgument):
        make(on_exit="explode")


async def test_two_managers_launching_at_once_share_one_key_pair_and_one_group(
    make: Any, tmp_path: Path
) -> None:
    fresh = {"region": "ap-south-1", "dotdir": tmp_path / "shared", "on_exit": "terminate"}
    # a rule of the group there already, as another machine left it: kept, not refused
    async with make(**fresh, ssh_cidr="192.0.2.7/32") as earlier:
        await earlier.account.admit()
    first, second = make(**fresh), make(**fresh)
    async with first, second:
        got: dict[str, Any] = {}

        async def launch(m: Manager, name: str) -> None:
            (got[name],) = await _launch(m, name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(launch, first, "racer-1")
            tg.start_soon(launch, second, "racer-2")
        assert first.key_pair == second.key_pair
        assert first.security_group_id == second.security_group_id
        pairs = (await first.ec2.call("DescribeKeyPairs"))["KeyPairs"]
        assert [p["KeyName"] for p in pairs] == [first.key_pair.name]
        assert len(await _groups_named(first, "asyncstage")) == 1
        assert await _group_cidrs(first) == {"192.0.2.7/32", "127.0.0.1/32"}
        for name, server in got.items():
            assert server.instance["KeyName"] == first.key_pair.name, name
            groups = {g["GroupId"] for g in server.instance.get("SecurityGroups", [])}
            assert groups == {first.security_group_id}, name
    # both terminated theirs; the last one out removed the key pair and the group
    async with make(**fresh) as check:
        assert (await check.ec2.call("DescribeKeyPairs"))["KeyPairs"] == []
        assert await _groups_named(check, "asyncstage") == []


async def test_ssh_admission_of_a_known_group_takes_no_turn_of_the_account_lock(
    make: Any,
) -> None:
    # Every new ssh connection is admitted first: once the group is known, a fleet's
    # connections must not queue for the lock one by one (nor wait for a key import).
    async with make(region="eu-north-1", security_group="admit-once") as m:
        group = await m.account.admit()
        calls = dict(m.ec2.calls)
        async with m.account._locked():  # held, as by a set-up under way
            assert await m.account.admit() == group
            await m.account.before_ssh()
        assert dict(m.ec2.calls) == calls
        m.account.forget()  # another manager removed it: made or found again, locked
        assert await m.account.admit() == group
        assert m.ec2.calls["DescribeSecurityGroups"] > calls.get("DescribeSecurityGroups", 0)


async def test_concurrent_provisions_with_one_spec_share_one_run_instances(make: Any) -> None:
    async with make(on_exit="terminate", launch_window=0.2) as m:
        spec = await m.fleet.spec(LaunchOptions())
        got: dict[str, Any] = {}

        async def one(name: str) -> None:
            got[name] = await m.fleet.launch_coalesced(spec, name)

        async with anyio.create_task_group() as tg:
            for n in ("a", "b", "c", "d"):
                tg.start_soon(one, n)
        assert m.ec2.calls["RunInstances"] == 1
        assert {s.name for s in got.values()} == {"a", "b", "c", "d"}
        found = await m.ec2.describe_instances([s.instance_id for s in got.values()])
        assert {tags_of(i)[tag("name")] for i in found} == {"a", "b", "c", "d"}
        assert all(tags_of(i)["Name"] == tags_of(i)[tag("name")] for i in found)
        with pytest.raises(NameTaken):
            await m.provision_server("a")
        with pytest.raises(NameTaken):
            await m.provision_servers(["x", "x"])


async def test_a_second_manager_adopts_servers_by_tags(make: Any) -> None:
    async with make(on_exit="run") as first:
        servers = await _launch(first, "adopt-me", "me-too")
    async with make(on_exit="terminate", scan=True) as second:
        names = {s.name: s for s in second.servers()}
        assert {"adopt-me", "me-too"} <= set(names)
        adopted = names["adopt-me"]
        assert adopted.instance_id == servers[0].instance_id
        assert adopted.keyfile == first.keyfile and adopted.username == servers[0].username
        assert second.find_server_by_instance(adopted.instance_id) is adopted
        # adopted servers are not "started" by the second manager: terminate them by hand
        await second.terminate_servers([names["adopt-me"], names["me-too"]])
        assert second.find_server_by_name("adopt-me") is None


@pytest.mark.parametrize("mode", ["stop", "terminate", "run"])
@pytest.mark.parametrize("how", ["normal", "raise", "cancel"])
async def test_on_exit_modes(make: Any, mode: str, how: str, tmp_path: Path) -> None:
    ids: list[str] = []
    m = make(on_exit=mode)
    with anyio.CancelScope() as scope:
        try:
            async with m:
                ids = [
                    s.instance_id for s in await _launch(m, f"{mode}-{how}-1", f"{mode}-{how}-2")
                ]
                if how == "raise":
                    raise RuntimeError("boom")
                if how == "cancel":
                    scope.cancel()
                    await anyio.sleep(5)
        except RuntimeError:
            assert how == "raise"
    async with make(on_exit="run", dotdir=tmp_path / "check") as check:
        want = {"stop": "stopped", "terminate": "terminated", "run": "running"}[mode]
        assert await _states(check, ids) == {want}
        if mode == "terminate":  # nothing of ours left: the key pair goes too
            assert m.key_pair is not None
            assert not await check.ec2.key_pair_exists(m.key_pair.name)
        else:
            await check.ec2.terminate_instances(ids)


def test_default_user_follows_the_image() -> None:
    assert user_for_image({"Name": "ubuntu/images/hvm-ssd/ubuntu-noble-24.04"}) == "ubuntu"
    assert user_for_image({"Name": "debian-12-amd64-2024"}) == "admin"
    assert user_for_image({"Name": "al2023-ami-2023.4"}) == "ec2-user"
    tagged = {"Name": "x", "Tags": [{"Key": tag("user"), "Value": "me"}]}
    assert user_for_image(tagged) == "me"


async def test_launch_survives_another_manager_removing_key_and_group(make: Any) -> None:
    async with make(on_exit="terminate") as keeper:
        async with make(on_exit="terminate") as leaver:
            await _launch(leaver, "leaver-1")
        # the leaver removed the shared key pair and security group on its way out
        assert keeper.key_pair is not None
        assert not await keeper.ec2.key_pair_exists(keeper.key_pair.name)
        (server,) = await _launch(keeper, "keeper-1")
        assert await keeper.ec2.key_pair_exists(keeper.key_pair.name)
        assert server.instance["KeyName"] == keeper.key_pair.name


# -- data safety on the API alone ---------------------------------------------------------------


async def test_names_and_users_are_checked_before_any_call(make: Any) -> None:
    async with make(on_exit="terminate") as m:
        before = sum(m.ec2.calls.values())
        for bad in ("../x", "a/b", "new\nline", "-rf", "two words", "$(id)", "ü", "x" * 300):
            with pytest.raises(InvalidName):
                await m.provision_server(bad)
            with pytest.raises(InvalidName):
                await m.provision_servers([bad])
            with pytest.raises(InvalidName):
                await m.get_server(bad)
            with pytest.raises(InvalidName):
                await m.provision_volume(bad)
            with pytest.raises(InvalidName):
                await m.get_volume(bad)
        for user in ("-oProxyCommand=x", "root@evil", "a b"):
            with pytest.raises(InvalidName):
                await m.provision_server("fine", username=user)
        assert sum(m.ec2.calls.values()) == before
    with pytest.raises(InvalidName):
        make(username="-oProxyCommand=touch /tmp/x")


async def test_an_unknown_keyword_is_a_type_error_before_any_call(make: Any) -> None:
    """The shared keyword sets (asyncstage.options) refuse a keyword they do not have, as
    a function with those parameters would, and nothing reaches EC2."""
    unknown: dict[str, Any] = {"instance_typ": "t3.nano"}
    async with make(on_exit="terminate") as m:
        before = sum(m.ec2.calls.values())
        calls = [
            m.provision_server("a", **unknown),
            m.provision_servers(["a"], **unknown),
            m.get_server("a", **unknown),
            m.provision_volume("v", **unknown),
            m.get_volume("v", **unknown),
            m.get_volume("v", reuse=False),  # get_volume always reuses: not one of its keys
        ]
        for call in calls:
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                await call
        assert sum(m.ec2.calls.values()) == before


async def test_scan_adopts_only_our_own_resources_with_valid_tags(
    make: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async with make(on_exit="run") as first:
        (ours,) = await _launch(first, "ours")
        assert first.key_pair is not None
        key, owner = first.key_pair.name, tags_of(ours.instance)[OWNER_TAG]
        assert owner == key
        image = (await first.ec2.find_image("*"))["ImageId"]
        zone = ours.availability_zone

        async def plant_instance(key_name: str, **tags: str) -> str:
            got = await first.ec2.call(
                "RunInstances",
                ImageId=image,
                MinCount=1,
                MaxCount=1,
                KeyName=key_name,
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                    }
                ],
            )
            return str(got["Instances"][0]["InstanceId"])

        async def plant_volume(**tags: str) -> str:
            got = await first.ec2.call(
                "CreateVolume",
                AvailabilityZone=zone,
                Size=1,
                TagSpecifications=[
                    {
                        "ResourceType": "volume",
                        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                    }
                ],
            )
            return str(got["VolumeId"])

        role_s, role_v = {tag("role"): "server"}, {tag("role"): "volume"}
        hostile = [
            await plant_instance(key, **role_s, **{tag("name"): "$(reboot)"}),
            await plant_instance(key, **role_s, **{tag("name"): "ok1", tag("user"): "-oX=y"}),
            await plant_volume(**role_v, **{tag("name"): "../../etc", OWNER_TAG: key}),
            await plant_volume(
                **role_v, **{tag("name"): "ok2", OWNER_TAG: key, tag("mtpt"): "/etc"}
            ),
        ]
        foreign = [
            await plant_instance("someone-else", **role_s, **{tag("name"): "theirs"}),
            await plant_volume(**role_v, **{tag("name"): "theirs-vol"}),
        ]
        good_vol = await plant_volume(**role_v, **{tag("name"): "mine-vol", OWNER_TAG: key})
    caplog.set_level(logging.WARNING, logger="asyncstage")
    async with make(on_exit="terminate", scan=True) as second:
        servers = {s.instance_id for s in second.servers()}
        volumes = {v.volume_id for v in second.volumes()}
        assert ours.instance_id in servers and good_vol in volumes
        assert not (servers | volumes) & set(hostile + foreign)
        warned = caplog.text
        assert all(rid in warned for rid in hostile + foreign)
        await second.terminate_servers(second.servers())
        await second.ec2.terminate_instances([i for i in hostile + foreign if i.startswith("i-")])
        for vid in [*(v for v in hostile + foreign if v.startswith("vol-")), good_vol]:
            await second.ec2.delete_volume(vid)


async def test_closing_copes_with_what_others_deleted(
    make: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncstage")
    async with make(on_exit="terminate") as m:
        a, b = await _launch(m, "gone-a", "gone-b")
        vols = [
            await m.ec2.create_volume(availability_zone=a.availability_zone, size=1)
            for _ in range(2)
        ]
        gone, kept = (m.registry.add_volume(v, created=True) for v in vols)
        # somebody else terminates a server and deletes a volume behind the manager's back
        await m.ec2.terminate_instances([a.instance_id])
        await m.ec2.delete_volume(gone.volume_id)
    # no error: what was gone is reported, the rest is cleaned up
    assert gone.volume_id in caplog.text and a.instance_id in caplog.text
    async with make(on_exit="run", dotdir=tmp_path / "check") as check:
        assert await _states(check, [a.instance_id, b.instance_id]) == {"terminated"}
        left = await check.ec2.describe_volumes([kept.volume_id])
        assert [v for v in left if v["State"] not in ("deleting", "deleted")] == []


async def test_closing_removes_what_a_create_with_a_lost_reply_made(
    make: Any, tmp_path: Path
) -> None:
    async with make(on_exit="run") as m:
        lost: list[int] = []

        def drop(**_: object) -> None:
            if not lost:
                lost.append(1)
                raise ReadTimeoutError(endpoint_url="lost reply")

        m.ec2._client.meta.events.register("after-call.ec2.CreateVolume", drop)
        with pytest.raises(EC2Error):
            await m.ec2.create_volume(
                availability_zone="us-east-1a", size=1, client_token=new_client_token()
            )
        assert len(m.ec2.unsettled_tokens) == 1
    # even with on_exit="run": nobody else knows of that volume
    async with make(on_exit="run", dotdir=tmp_path / "check") as check:
        vols = await check.ec2.describe_volumes()
        assert [v for v in vols if tag("client-token") in tags_of(v)] == []
