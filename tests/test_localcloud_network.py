"""The local cloud's network: namespaces, a router, NATed public addresses, nothing out.

Every check reads routes, addresses, nftables rules and counters, or connects to the
cloud's own addresses; no packet is ever sent to an address outside the cloud.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest

from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._network import NFT_TABLE, Network, in_netns, netns_names
from tests.fixtures.cloud import vpc_cloud
from tests.test_localcloud import sh, ssh, wait_state

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

# a cloud of this module's own, with the VPC network insisted on ("vpc", never a fallback)
cloud = pytest.fixture(vpc_cloud, scope="module", name="cloud")

ROOT = str(Path(__file__).resolve().parent.parent)
OUTSIDE = ("8.8.8.8", "1.1.1.1", "192.0.2.77")  # asked about by `ip route get` only


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def net(cloud: LocalCloud) -> Network:
    """The cloud's network (white box)."""
    network = cloud._engine.net
    if network is None:
        pytest.skip("this machine cannot make the local cloud's network")
    return network


def netns(cloud: LocalCloud, instance_id: str) -> str:
    return str(cloud._engine.machines[instance_id].host.netns)


def checkip(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode()).strip()


def forwarding() -> str:
    """The machine's own IPv4 forwarding switch (the cloud never turns it)."""
    return Path("/proc/sys/net/ipv4/ip_forward").read_text()


def has_link(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def in_range(address: str, network: str | ipaddress.IPv4Network) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(network)


@pytest.fixture(scope="module")
async def groups(ec2: Any) -> list[str]:
    """The default VPC's default group and one that admits ssh from anywhere: groups are
    enforced on this network, and the tests reach instances from the machine and from
    each other's public addresses (as an EC2 user opens port 22 to reach them)."""
    vpcs = await ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
    vpc = vpcs["Vpcs"][0]["VpcId"]
    named = [{"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": ["default"]}]
    default = (await ec2.describe_security_groups(Filters=named))["SecurityGroups"][0]
    made = await ec2.create_security_group(
        GroupName="network-test-ssh", Description="ssh from anywhere", VpcId=vpc
    )
    await ec2.authorize_security_group_ingress(
        GroupId=made["GroupId"],
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            }
        ],
    )
    return [default["GroupId"], made["GroupId"]]


@pytest.fixture
async def instances(cloud: LocalCloud, ec2: Any, groups: list[str]) -> AsyncIterator[Any]:
    """Launch with ``await launch(**kwargs)`` (in :func:`groups`); all terminated after."""
    launched: list[str] = []

    async def launch(count: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
        for interface in kwargs.get("NetworkInterfaces", []):
            interface.setdefault("Groups", groups)
        if "NetworkInterfaces" not in kwargs:
            kwargs.setdefault("SecurityGroupIds", groups)
        reply = await ec2.run_instances(
            ImageId=cloud.image_id, MinCount=count, MaxCount=count, KeyName="test", **kwargs
        )
        ids = [i["InstanceId"] for i in reply["Instances"]]
        launched.extend(ids)
        return await wait_state(ec2, ids, "running")

    yield launch
    if launched:
        await ec2.terminate_instances(InstanceIds=launched)
        await wait_state(ec2, launched, "terminated")


async def test_each_instance_sits_in_a_namespace_at_its_subnets_address(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, instances: Any
) -> None:
    network = net(cloud)
    a, b = await instances(2)
    subnets = {s["SubnetId"]: s for s in (await ec2.describe_subnets())["Subnets"]}
    for instance in (a, b):
        private, public = instance["PrivateIpAddress"], instance["PublicIpAddress"]
        assert in_range(private, subnets[instance["SubnetId"]]["CidrBlock"])
        assert in_range(private, "172.31.0.0/16")  # the default VPC, as AWS's
        assert in_range(public, network.public_range)
        name = netns(cloud, instance["InstanceId"])
        assert name == f"asl-{network.token}-{instance['InstanceId']}"
        inside = json.loads(ip("-n", name, "-j", "-4", "addr", "show").stdout)
        own = {a["local"] for i in inside for a in i["addr_info"]}
        assert own == {"127.0.0.1", private}  # its public address is the router's NAT
        # the machine has neither address on any interface of its own
        mine = json.loads(ip("-j", "-4", "addr", "show").stdout)
        assert not {private, public} & {a["local"] for i in mine for a in i["addr_info"]}
    assert a["PrivateIpAddress"] != b["PrivateIpAddress"]

    # checkip: the machine seen from the cloud's edge, an instance as its public address
    assert checkip(cloud.checkip_url) == network.machine_address
    async with ssh(ec2, a, key) as conn:
        assert (await sh(conn, "hostname -I")).split() == [a["PrivateIpAddress"]]
        url = cloud.checkip_url
        fetch = f'import urllib.request as u; print(u.urlopen("{url}").read().decode())'
        assert (await sh(conn, f"python3 -c '{fetch}'")).strip() == a["PublicIpAddress"]

    # hairpin: a reaches b's public address and arrives from its own public address
    def connect() -> socket.socket:
        return socket.create_connection((b["PublicIpAddress"], 22), timeout=10)

    sock = in_netns(netns(cloud, a["InstanceId"]), connect)
    with sock:
        assert sock.recv(4) == b"SSH-"
        seen = ip_ss(netns(cloud, b["InstanceId"]))
        assert any(peer.startswith(a["PublicIpAddress"] + ":") for peer in seen), seen


def ip_ss(name: str) -> list[str]:
    """The peers of the established connections to port 22 inside namespace ``name``."""
    out = subprocess.run(
        ["ss", "-Htn", "-N", name, "state", "established", "( sport = :22 )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


async def test_stop_start_keeps_the_private_address_and_moves_the_public_one(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, instances: Any
) -> None:
    network = net(cloud)
    (first,) = await instances()
    iid = first["InstanceId"]
    vpc_router = f"asl-{network.token}-{first['VpcId']}"
    await ec2.stop_instances(InstanceIds=[iid])
    (stopped,) = await wait_state(ec2, [iid], "stopped")
    assert "PublicIpAddress" not in stopped  # EC2: none while stopped
    routes = ip("-n", network.router, "route", "show").stdout
    assert first["PublicIpAddress"] not in routes  # no way in any more
    await ec2.start_instances(InstanceIds=[iid])
    (started,) = await wait_state(ec2, [iid], "running")
    assert started["PrivateIpAddress"] == first["PrivateIpAddress"]
    assert started["PublicIpAddress"] != first["PublicIpAddress"]
    assert in_range(started["PublicIpAddress"], network.public_range)
    routes = ip("-n", network.router, "route", "show").stdout
    assert f"{started['PublicIpAddress']} via" in routes
    assert first["PublicIpAddress"] not in routes
    nat = _nft_json(vpc_router, "list", "map", "inet", NFT_TABLE, "to_private")
    elements = nat["nftables"][1]["map"]["elem"]
    assert [started["PublicIpAddress"], started["PrivateIpAddress"]] in elements
    async with ssh(ec2, started, key) as conn:
        assert (await sh(conn, "hostname -I")).split() == [first["PrivateIpAddress"]]


async def test_no_public_address_when_asked_or_by_the_subnet(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, instances: Any
) -> None:
    net(cloud)
    (reacher,) = await instances()
    vpc = reacher["VpcId"]
    (asked,) = await instances(
        NetworkInterfaces=[
            {"DeviceIndex": 0, "SubnetId": reacher["SubnetId"], "AssociatePublicIpAddress": False}
        ]
    )
    subnet = (await ec2.create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24"))["Subnet"]
    try:
        assert subnet["MapPublicIpOnLaunch"] is False  # as EC2's non-default subnets
        (private_only,) = await instances(SubnetId=subnet["SubnetId"])
        assert in_range(private_only["PrivateIpAddress"], "172.31.200.0/24")
        for instance in (asked, private_only):
            assert not instance.get("PublicIpAddress")
            assert cloud._engine.machines[instance["InstanceId"]].host.public_address == ""
        # reached inside the VPC only: from another instance, at its private address
        # (the second one across subnets, through the VPC's router)
        async with ssh(ec2, reacher, key) as conn:
            for instance in (asked, private_only):
                probe = f"exec 3<>/dev/tcp/{instance['PrivateIpAddress']}/22 && head -c 4 <&3"
                assert await sh(conn, probe) == "SSH-"
    finally:
        await _when_free(ec2, subnet["SubnetId"], instances)


async def _when_free(ec2: Any, subnet_id: str, instances: Any) -> None:
    """Delete the subnet once its instances are gone (the fixture ends them later)."""
    reply = await ec2.describe_instances(Filters=[{"Name": "subnet-id", "Values": [subnet_id]}])
    ids = [i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]]
    if ids:
        await ec2.terminate_instances(InstanceIds=ids)
        await wait_state(ec2, ids, "terminated")
    await ec2.delete_subnet(SubnetId=subnet_id)


def _nft_json(name: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{name}", "nft", "-j", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def _sysctl(name: str, key: str = "net.ipv4.ip_forward") -> str:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{name}", "sysctl", "-n", key],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def test_nothing_leaves_routes_forwarding_and_the_routers_drop_rule(
    cloud: LocalCloud, ec2: Any, instances: Any
) -> None:
    network = net(cloud)
    (instance,) = await instances()
    iid = instance["InstanceId"]
    vpc_router = f"asl-{network.token}-{instance['VpcId']}"
    # the machine: into the router for the cloud's public range only, unreachable for
    # the rest of 198.18.0.0/15 and for the VPC's CIDR
    routes = json.loads(ip("-j", "route", "show").stdout)
    by_dst = {r["dst"]: r for r in routes}
    assert by_dst[str(network.public_range)]["gateway"] == network.router_address
    assert by_dst[str(network.public_range)]["dev"] == network.link
    assert by_dst["198.18.0.0/15"]["type"] == "unreachable"
    assert by_dst["172.31.0.0/16"]["type"] == "unreachable"
    for address in (instance["PrivateIpAddress"], "198.18.255.9"):
        answer = ip("route", "get", address, check=False)
        assert answer.returncode != 0 and "No route to host" in answer.stderr, answer
    # every namespace of the cloud: no default route, outside addresses unreachable
    names = netns_names(f"asl-{network.token}-")
    assert {network.router, vpc_router, netns(cloud, iid)} <= set(names)
    for name in names:
        assert ip("-n", name, "route", "show", "default").stdout.strip() == ""
        for address in OUTSIDE:
            answer = ip("-n", name, "route", "get", address, check=False)
            assert answer.returncode != 0, (name, address, answer.stdout)
            assert "Network is unreachable" in answer.stderr, answer.stderr
    # forwarding only in the routers
    assert _sysctl(network.router) == "1" and _sysctl(vpc_router) == "1"
    assert _sysctl(netns(cloud, iid)) == "0"
    # the routers forward what is destined for the cloud; the rest is dropped, counted
    for name, ranges in (
        (network.router, {str(r) for r in network.ranges}),
        (vpc_router, {str(r) for r in network.ranges} | {"172.31.0.0/16"}),
    ):
        chain = _nft_json(name, "list", "chain", "inet", NFT_TABLE, "forward")["nftables"]
        rules = [item["rule"]["expr"] for item in chain if "rule" in item]
        assert rules[-1] == [{"counter": "outside"}, {"drop": None}]
        assert rules[0][-1] == {"accept": None}
        listed = _nft_json(name, "list", "set", "inet", NFT_TABLE, "cloud_ranges")["nftables"]
        elements = listed[1]["set"]["elem"]
        found = {f"{e['prefix']['addr']}/{e['prefix']['len']}" for e in elements}
        assert found == ranges
        counter = _nft_json(name, "list", "counter", "inet", NFT_TABLE, "outside")
        assert isinstance(counter["nftables"][1]["counter"]["packets"], int)


_CRASHER = textwrap.dedent(
    """
    import json, os, subprocess, sys, anyio, aioboto3
    from botocore.exceptions import ClientError
    sys.path.insert(0, {root!r})
    from asyncstage.localcloud import LocalCloud

    async def main():
        cloud = LocalCloud(network="vpc")
        await cloud.start()
        async with aioboto3.Session().client("ec2", **cloud.session_kwargs()) as ec2:
            vpc = (await ec2.create_vpc(CidrBlock="10.213.0.0/16"))["Vpc"]["VpcId"]
            subnet = await ec2.create_subnet(VpcId=vpc, CidrBlock="10.213.1.0/24")
            reply = await ec2.run_instances(
                ImageId=cloud.image_id, MinCount=1, MaxCount=1,
                SubnetId=subnet["Subnet"]["SubnetId"],
            )
            iid = reply["Instances"][0]["InstanceId"]
            with anyio.fail_after(60):
                while True:
                    try:  # a new id may be hidden a while, as on EC2
                        reply = await ec2.describe_instances(InstanceIds=[iid])
                    except ClientError:
                        reply = {{"Reservations": []}}
                    states = [i["State"]["Name"] for r in reply["Reservations"]
                              for i in r["Instances"]]
                    if states == ["running"]:
                        break
                    await anyio.sleep(0.1)
        print(cloud._engine.net.token, flush=True)
        os.kill(os.getpid(), 9)   # a crash: no cleanup at all

    anyio.run(main)
    """
)


async def test_a_crashed_clouds_network_is_swept_at_the_next_start(cloud: LocalCloud) -> None:
    net(cloud)
    forward = forwarding()
    with anyio.fail_after(120):
        crashed = await anyio.run_process(
            [sys.executable, "-c", _CRASHER.format(root=ROOT)], cwd=ROOT, check=False
        )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    token = crashed.stdout.decode().strip()
    left = netns_names(f"asl-{token}-")
    assert len(left) == 3  # its router, its VPC's router, its instance
    assert has_link(f"asl{token}")
    assert "unreachable 10.213.0.0/16" in ip("route", "show").stdout
    async with LocalCloud(network="vpc") as second:
        assert second.network == "vpc"
        assert netns_names(f"asl-{token}-") == []
        assert not has_link(f"asl{token}")
        routes = ip("route", "show").stdout
        assert "10.213.0.0/16" not in routes
        # what the running clouds claim stays
        assert "unreachable 198.18.0.0/15" in routes
    assert "unreachable 198.18.0.0/15" in ip("route", "show").stdout  # the session's
    assert forwarding() == forward  # never changed


async def test_auto_is_the_default_and_falls_back_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``LocalCloud()`` asks for "auto": on a machine that cannot make the network (here:
    one told it has no nft) it runs on loopback and logs why; "vpc" refuses, naming it."""
    from asyncstage.localcloud import _engine
    from asyncstage.localcloud.errors import LocalCloudError

    why = "no nft program (Debian: iproute2, nftables, util-linux)"
    monkeypatch.setattr(_engine, "possible", lambda: why)
    with caplog.at_level("INFO", logger="asyncstage.localcloud"):
        async with LocalCloud() as cloud:
            assert cloud.network == "loopback" and cloud.checkip_url == ""
    assert f"network: loopback ({why})" in caplog.text
    with pytest.raises(LocalCloudError, match="no nft program"):
        async with LocalCloud(network="vpc"):
            pass
