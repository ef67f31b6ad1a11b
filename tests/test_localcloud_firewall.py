"""Security groups enforced between local-cloud instances, end to end.

Needs the local cloud's own network: each instance in a network namespace of its own,
private addresses on a VPC bridge, public ones reached from the machine. Three
instances (``web``, ``app``, ``other``); every probe is a Python one-liner that an
instance runs (over ssh, as ``admin``) against another instance's address, so every
packet stays inside the cloud's namespaces. Changes are polled for with a bound: EC2
applies them "within a short delay", and so does the cloud.
"""

from __future__ import annotations

import os
import shlex
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncssh
import pytest

from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._firewall import TABLE
from tests.fixtures.cloud import vpc_cloud
from tests.test_localcloud import sh, ssh, wait_state

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

# a cloud of this module's own, with the VPC network insisted on ("vpc", never a fallback)
cloud = pytest.fixture(vpc_cloud, scope="module", name="cloud")

PREFIX = f"fw-e2e-{os.getpid()}-"
SETTLE = 15.0  # seconds a change may take to reach the instances (polled, not slept)

LISTENER = textwrap.dedent(
    """
    import socket, threading
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(16)
        while True:
            c, _ = s.accept(); c.sendall(b"ok\\n"); c.close()
    for port in (8080, 8081):
        threading.Thread(target=serve, args=(port,)).start()
    """
)
PROBE = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        print("open" if s.recv(3) == b"ok\\n" else "garbled")
    except TimeoutError:
        print("timeout")
    except OSError as e:
        print("error", e.errno)
    """
)


@dataclass
class Trio:
    ec2: Any
    key: asyncssh.SSHKey
    groups: dict[str, str]  # short name -> group id
    instances: dict[str, dict[str, Any]]  # web, app, other -> DescribeInstances entry

    async def probe(self, source: str, address: str, port: int) -> str:
        async with ssh(self.ec2, self.instances[source], self.key) as conn:
            command = f"python3 -c {shlex.quote(PROBE)} {address} {port}"
            return (await sh(conn, command)).strip()

    async def until(self, source: str, address: str, port: int, outcome: str) -> None:
        """Probe until ``outcome`` (bounded by SETTLE)."""
        seen = ""
        deadline = anyio.current_time() + SETTLE
        while anyio.current_time() < deadline:
            seen = await self.probe(source, address, port)  # each probe takes its time
            if seen == outcome:
                break
        assert seen == outcome, f"{source} -> {address}:{port}: {seen}, wanted {outcome}"

    def private(self, name: str) -> str:
        return str(self.instances[name]["PrivateIpAddress"])

    def public(self, name: str) -> str:
        return str(self.instances[name]["PublicIpAddress"])


async def _group(ec2: Any, name: str, *ingress: dict[str, Any]) -> str:
    made = await ec2.create_security_group(GroupName=PREFIX + name, Description=name)
    if ingress:
        await ec2.authorize_security_group_ingress(
            GroupId=made["GroupId"], IpPermissions=list(ingress)
        )
    return str(made["GroupId"])


@pytest.fixture(scope="module")
async def trio(cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey) -> AsyncIterator[Trio]:
    anywhere = [{"CidrIp": "0.0.0.0/0"}]
    ssh_in = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": anywhere}
    groups = {"ssh": await _group(ec2, "ssh", ssh_in)}
    groups["app"] = await _group(ec2, "app")
    groups["other"] = await _group(ec2, "other")
    groups["web"] = await _group(
        ec2,
        "web",
        {
            "IpProtocol": "tcp",
            "FromPort": 8080,
            "ToPort": 8080,
            "UserIdGroupPairs": [{"GroupId": groups["app"]}],
        },
    )
    # egress: none at all (its egress rule revoked), for the egress test
    groups["quiet"] = await _group(ec2, "quiet", ssh_in)
    await ec2.revoke_security_group_egress(
        GroupId=groups["quiet"],
        IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    ids: dict[str, str] = {}
    try:
        for name in ("web", "app", "other"):
            reply = await ec2.run_instances(
                ImageId=cloud.image_id,
                MinCount=1,
                MaxCount=1,
                KeyName="test",
                InstanceType="t3.micro",
                SecurityGroupIds=[groups["ssh"], groups[name]],
            )
            ids[name] = reply["Instances"][0]["InstanceId"]
        running = await wait_state(ec2, list(ids.values()), "running")
        machines = cloud._engine.machines  # white box: where each instance lives
        for instance_id in ids.values():
            assert machines[instance_id].host.netns, (
                "this test needs instances in network namespaces of their own "
                "(the local cloud's network)"
            )
        trio = Trio(ec2, key, groups, dict(zip(ids, running, strict=True)))
        async with ssh(ec2, trio.instances["web"], key) as conn:
            listener = f"python3 -c {shlex.quote(LISTENER)}"
            await sh(conn, f"setsid {listener} >/dev/null 2>&1 </dev/null &")
        await trio.until("web", "127.0.0.1", 8080, "open")
        yield trio
    finally:
        if ids:
            await ec2.terminate_instances(InstanceIds=list(ids.values()))
            await wait_state(ec2, list(ids.values()), "terminated", within=120)
        # the newest first: a group another one's rule names goes after it (EC2 refuses
        # it before, with DependencyViolation)
        for group_id in reversed(list(groups.values())):
            await ec2.delete_security_group(GroupId=group_id)


async def test_group_reference_admits_members_only(trio: Trio) -> None:
    """web admits 8080 from the app group: app gets in (and its answers back), other
    does not, and neither does app through web's public address."""
    assert await trio.probe("app", trio.private("web"), 8080) == "open"
    assert await trio.probe("other", trio.private("web"), 8080) == "timeout"
    assert await trio.probe("app", trio.private("web"), 8081) == "timeout"
    assert await trio.probe("app", trio.public("web"), 8080) != "open"


async def test_authorize_and_revoke_take_effect(trio: Trio) -> None:
    rule = {
        "IpProtocol": "tcp",
        "FromPort": 8081,
        "ToPort": 8081,
        "IpRanges": [{"CidrIp": f"{trio.private('other')}/32"}],
    }
    web = trio.groups["web"]
    await trio.ec2.authorize_security_group_ingress(GroupId=web, IpPermissions=[rule])
    await trio.until("other", trio.private("web"), 8081, "open")
    assert await trio.probe("app", trio.private("web"), 8081) == "timeout"
    await trio.ec2.revoke_security_group_ingress(GroupId=web, IpPermissions=[rule])
    await trio.until("other", trio.private("web"), 8081, "timeout")


async def test_new_member_gets_in(trio: Trio) -> None:
    """Putting other into the app group (ModifyInstanceAttribute) admits it to web."""
    other = trio.instances["other"]["InstanceId"]
    await trio.ec2.modify_instance_attribute(
        InstanceId=other, Groups=[trio.groups["ssh"], trio.groups["app"]]
    )
    try:
        await trio.until("other", trio.private("web"), 8080, "open")
    finally:
        await trio.ec2.modify_instance_attribute(
            InstanceId=other, Groups=[trio.groups["ssh"], trio.groups["other"]]
        )
    await trio.until("other", trio.private("web"), 8080, "timeout")


async def test_egress_revoked(trio: Trio) -> None:
    """app in groups without egress rules opens nothing, though web would admit it."""
    app = trio.instances["app"]["InstanceId"]
    await trio.ec2.modify_instance_attribute(InstanceId=app, Groups=[trio.groups["quiet"]])
    try:
        await trio.until("app", trio.private("web"), 8080, "timeout")
    finally:
        await trio.ec2.modify_instance_attribute(
            InstanceId=app, Groups=[trio.groups["ssh"], trio.groups["app"]]
        )
    await trio.until("app", trio.private("web"), 8080, "open")


async def test_tables_are_in_the_namespaces(cloud: LocalCloud, trio: Trio) -> None:
    """Each instance's namespace holds its table, with the drop counters to read."""
    for name, instance in trio.instances.items():
        netns = cloud._engine.machines[instance["InstanceId"]].host.netns
        done = await anyio.run_process(
            ["ip", "netns", "exec", netns, "nft", "list", "table", "inet", TABLE]
        )
        listed = done.stdout.decode()
        assert "policy drop" in listed and "counter" in listed, name
