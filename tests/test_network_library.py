"""The library on the local cloud's VPC network: private servers, bastions, legs between VPCs.

Needs the cloud's namespaced network (instances without a public address, private
addresses only reachable inside their VPC, security groups enforced). A server
without a public address is launched as any SDK user would (``RunInstances`` with
``AssociatePublicIpAddress=false``) and adopted by the manager's scan.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager
from asyncstage.adoption import owner_tags
from asyncstage.ec2 import tag
from asyncstage.ec2.tags import tag_list
from asyncstage.errors import NoRoute
from asyncstage.fleet import LaunchOptions
from asyncstage.server import Server
from asyncstage.transfer import Progress
from tests.fixtures.cloud import ManagerFactory, vpc_cloud

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud, pytest.mark.slow]

# a cloud of this module's own, with the VPC network insisted on ("vpc", never a fallback)
cloud = pytest.fixture(vpc_cloud, scope="module", name="cloud")


async def _launch(
    m: Manager, name: str, *, public: bool, subnet: str | None = None, group: str | None = None
) -> Server:
    """A server launched with or without a public address, adopted and up."""
    await m.account.ensure()
    spec = await m.fleet.spec(LaunchOptions())
    tags = {tag("role"): "server", tag("user"): spec.username, tag("name"): name, "Name": name}
    interface: dict[str, Any] = {
        "DeviceIndex": 0,
        "AssociatePublicIpAddress": public,
        "Groups": [group or await m.account.admit()],
    }
    if subnet is not None:
        interface["SubnetId"] = subnet
    await m.ec2.call(
        "RunInstances",
        ImageId=spec.image_id,
        InstanceType=spec.instance_type,
        MinCount=1,
        MaxCount=1,
        KeyName=m.key_pair.name,
        NetworkInterfaces=[interface],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": tag_list(tags | owner_tags(m.key_pair.name))}
        ],
    )
    await m.scan_region()
    server = m.find_server_by_name(name)
    assert server is not None
    await m.wait_for_servers([server])
    return server


async def _ssh_cidrs(m: Manager, group_id: str) -> set[str]:
    found = await m.ec2.call("DescribeSecurityGroups", GroupIds=[group_id])
    return {
        r["CidrIp"]
        for p in found["SecurityGroups"][0]["IpPermissions"]
        if p.get("FromPort") == 22
        for r in p.get("IpRanges", [])
    }


@pytest.fixture
async def bastion_and_private(
    manager_factory: ManagerFactory,
) -> AsyncIterator[tuple[Manager, Server, Server]]:
    # names of this test's own: the previous test's servers may still be shutting down
    suffix = secrets.token_hex(3)
    async with manager_factory(scan=True, jump_host=f"net-bastion-{suffix}") as m:
        bastion = await _launch(m, f"net-bastion-{suffix}", public=True)
        hidden = await _launch(m, f"net-private-{suffix}", public=False)
        yield m, bastion, hidden


async def test_a_private_server_is_reached_through_the_bastion(
    bastion_and_private: tuple[Manager, Server, Server], tmp_path: Path
) -> None:
    m, bastion, hidden = bastion_and_private
    assert "PublicIpAddress" not in hidden.instance
    assert hidden.jump_host == bastion.name and hidden.host.jump is bastion.host
    # sshd on the private server sees the bastion's private address come in
    seen = (await hidden.scmd("echo $SSH_CONNECTION")).split()[0]
    assert seen == bastion.instance["PrivateIpAddress"]
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "data").write_bytes(os.urandom(300_000))
    await hidden.put(f"{tmp_path}/up/", "/tmp/net-up")
    await hidden.get("/tmp/net-up/", f"{tmp_path}/down")
    assert (tmp_path / "down" / "data").read_bytes() == (tmp_path / "up" / "data").read_bytes()
    m.jump_host = None
    with pytest.raises(NoRoute, match="jump_host="):
        await hidden.scmd("true")


async def test_server_to_server_inside_a_vpc_takes_private_addresses(
    bastion_and_private: tuple[Manager, Server, Server],
) -> None:
    m, bastion, hidden = bastion_and_private
    group = await m.account.admit()
    before = await _ssh_cidrs(m, group)
    await bastion.scmd("mkdir -p /tmp/net-vpc && head -c 100000 /dev/urandom > /tmp/net-vpc/f")
    stats = await m.rsync(f"{bastion}:/tmp/net-vpc/", f"{hidden}:/tmp/net-vpc-copy")
    assert stats.route == "host->host"
    assert await bastion.scmd("sha256sum < /tmp/net-vpc/f") == await hidden.scmd(
        "sha256sum < /tmp/net-vpc-copy/f"
    )
    assert await _ssh_cidrs(m, group) == before  # the group's self rule admitted it


async def test_across_two_vpcs_a_temporary_rule_admits_the_source(
    manager_factory: ManagerFactory,
) -> None:
    async with manager_factory(scan=True) as m:
        ours = await m.account.admit()
        vpc = (await m.ec2.call("CreateVpc", CidrBlock="10.77.0.0/16"))["Vpc"]["VpcId"]
        made: dict[str, str] = {}
        try:
            subnet = (await m.ec2.call("CreateSubnet", VpcId=vpc, CidrBlock="10.77.1.0/24"))[
                "Subnet"
            ]["SubnetId"]
            made["subnet"] = subnet
            other = await m.ec2.call(
                "CreateSecurityGroup", GroupName="net-other", Description="test", VpcId=vpc
            )
            made["group"] = other_group = str(other["GroupId"])
            for cidr in await _ssh_cidrs(m, ours):  # this machine, as the library's group
                await m.ec2.call(
                    "AuthorizeSecurityGroupIngress",
                    GroupId=other_group,
                    IpPermissions=[
                        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                         "IpRanges": [{"CidrIp": cidr}]}
                    ],
                )  # fmt: skip
            src = await _launch(m, "net-src", public=True)
            dst = await _launch(m, "net-dst", public=True, subnet=subnet, group=other_group)
            before = await _ssh_cidrs(m, other_group)
            during: list[set[str]] = []

            async def look(p: Progress) -> None:
                if not during:
                    during.append(await _ssh_cidrs(m, other_group))

            await src.scmd("mkdir -p /tmp/net-x && head -c 4000000 /dev/urandom > /tmp/net-x/f")
            await m.rsync(f"{src}:/tmp/net-x/", f"{dst}:/tmp/net-x-copy", progress=look)
            assert during and during[0] - before == {f"{src.instance['PublicIpAddress']}/32"}
            assert await _ssh_cidrs(m, other_group) == before  # revoked after
            assert await src.scmd("sha256sum < /tmp/net-x/f") == await dst.scmd(
                "sha256sum < /tmp/net-x-copy/f"
            )
            await m.terminate_servers([src, dst])
        finally:
            if "group" in made:
                await m.ec2.call("DeleteSecurityGroup", GroupId=made["group"])
            if "subnet" in made:
                await m.ec2.call("DeleteSubnet", SubnetId=made["subnet"])
            await m.ec2.call("DeleteVpc", VpcId=vpc)
