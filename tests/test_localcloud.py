"""The local cloud end to end: plain aioboto3 and asyncssh against real hosts and disks.

One cloud serves the module (``cloud``); tests that need a cloud of their own (boot
delay, cleanup after exit, crash recovery) start one. Host keys are always checked:
each instance's keys come from its console output (the block cloud-init prints), are
checked against the console's fingerprints, and are the only keys asyncssh accepts.

The "nothing left behind" checks compare ``losetup -a``, ``/proc/mounts`` and the
process list before and after a cloud's life. Other test runs may use this machine
at the same time, so the comparison fails on what belongs to that cloud (its
state dir, its address block, its hosts' pid namespaces), not on strangers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import asyncssh
import pytest
from botocore.exceptions import ClientError

from asyncstage.errors import MissingDependency
from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._disks import Store
from asyncstage.localcloud.errors import NeedsRoot
from tests.fixtures.cloud import admit_ssh_from_here
from tests.patience import patient_client

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
ROOT = str(Path(__file__).resolve().parent.parent)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def cloud() -> AsyncIterator[LocalCloud]:
    async with LocalCloud() as c:
        yield c


@pytest.fixture(scope="module")
async def three(cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey) -> list[dict[str, Any]]:
    """Three running instances, launched in one call."""
    ids = await launch(cloud, ec2, 3, Tags=[{"Key": "Name", "Value": "three"}])
    return await wait_state(ec2, ids, "running")


# -- helpers ------------------------------------------------------------------------------


async def launch(
    cloud: LocalCloud, ec2: Any, count: int, instance_type: str = "t3.micro", **tags: Any
) -> list[str]:
    spec = {}
    if "Tags" in tags:
        spec = {"TagSpecifications": [{"ResourceType": "instance", "Tags": tags["Tags"]}]}
    reply = await ec2.run_instances(
        ImageId=cloud.image_id,
        MinCount=count,
        MaxCount=count,
        KeyName="test",
        InstanceType=instance_type,
        **spec,
    )
    return [i["InstanceId"] for i in reply["Instances"]]


async def describe(ec2: Any, ids: Sequence[str]) -> list[dict[str, Any]]:
    reply = await ec2.describe_instances(InstanceIds=list(ids))
    by_id = {i["InstanceId"]: i for r in reply["Reservations"] for i in r["Instances"]}
    return [by_id[i] for i in ids]


async def wait_state(
    ec2: Any, ids: Sequence[str], state: str, within: float = 90
) -> list[dict[str, Any]]:
    """Poll (one call per round for all) until every instance is in ``state``."""
    with anyio.fail_after(within):
        while True:
            instances = await describe(ec2, ids)
            if all(i["State"]["Name"] == state for i in instances):
                return instances
            await anyio.sleep(0.1)


async def node(conn: asyncssh.SSHClientConnection, path: str, within: float = 10) -> str:
    """The real path of a device node, once it is there: EC2 (and the local cloud) says
    ``attached`` a moment before the instance sees the device."""
    script = f"for i in $(seq {int(within * 10)}); do [ -b {path} ] && exec readlink -f {path}; "
    return (await sh(conn, script + "sleep 0.1; done; exit 1")).strip()


async def wait_volume(ec2: Any, volume_id: str, state: str, within: float = 30) -> dict[str, Any]:
    with anyio.fail_after(within):
        while True:
            volume = (await ec2.describe_volumes(VolumeIds=[volume_id]))["Volumes"][0]
            if volume["State"] == state:
                return volume  # type: ignore[no-any-return]
            await anyio.sleep(0.05)


async def wait_snapshot(ec2: Any, snapshot_id: str, within: float = 30) -> None:
    with anyio.fail_after(within):
        while True:
            snap = (await ec2.describe_snapshots(SnapshotIds=[snapshot_id]))["Snapshots"][0]
            if snap["State"] == "completed":
                return
            await anyio.sleep(0.05)


def console_host_keys(console: str) -> tuple[list[str], list[str]]:
    """(fingerprint lines, public key lines) from a cloud-init console log."""
    fp = re.search(
        r"-----BEGIN SSH HOST KEY FINGERPRINTS-----\n(.*?)-----END SSH HOST KEY FINGERPRINTS-----",
        console,
        re.S,
    )
    keys = re.search(
        r"-----BEGIN SSH HOST KEY KEYS-----\n(.*?)-----END SSH HOST KEY KEYS-----", console, re.S
    )
    assert fp and keys, console
    fingerprints = [line.split("cloud-init: ", 1)[-1] for line in fp.group(1).splitlines()]
    fingerprints = [f for f in fingerprints if f.strip()]
    return fingerprints, [k for k in keys.group(1).splitlines() if k.strip()]


async def known_host_keys(ec2: Any, instance_id: str) -> tuple[list[str], list[str]]:
    """The instance's host keys from its console, checked against its fingerprints.

    EC2 shows the console late: polled for, with ``Latest=True`` (current on Nitro types;
    a Xen type refuses it, and is then polled without, as clients do).
    """
    latest = True
    with anyio.fail_after(30):
        while True:
            try:
                reply = await ec2.get_console_output(InstanceId=instance_id, Latest=latest)
            except ClientError as e:
                assert latest and e.response["Error"]["Code"] == "UnsupportedOperation", e
                latest = False
                continue
            console = reply.get("Output")  # base64 on the wire; botocore decodes it
            if console and "END SSH HOST KEY KEYS" in console:
                break
            await anyio.sleep(0.1)
    fingerprints, keys = console_host_keys(console)
    sha256 = {line.split()[1] for line in fingerprints}
    for key in keys:
        assert asyncssh.import_public_key(key).get_fingerprint("sha256") in sha256
    assert len(keys) == len(fingerprints) >= 1
    return [line.split()[1] for line in fingerprints], keys


@contextlib.asynccontextmanager
async def ssh(
    ec2: Any, instance: dict[str, Any], key: asyncssh.SSHKey
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An ssh connection that accepts only the host keys the console printed."""
    address = instance["PublicIpAddress"]
    _, keys = await known_host_keys(ec2, instance["InstanceId"])
    known = asyncssh.import_known_hosts("".join(f"{address} {k}\n" for k in keys))
    async with asyncssh.connect(
        address, username="admin", client_keys=[key], known_hosts=known, connect_timeout=20
    ) as conn:
        yield conn


async def sh(conn: asyncssh.SSHClientConnection, command: str) -> str:
    """Run ``command``; its stdout, or a failure that shows what it printed."""
    result = await conn.run(command)
    assert result.exit_status == 0, (command, result.exit_status, result.stdout, result.stderr)
    return str(result.stdout)


def exists(*paths: str) -> list[str]:
    return [p for p in paths if os.path.lexists(p)]


def registry_entry(cloud: LocalCloud) -> Path:
    """The cloud's entry in the registry of runs (white box)."""
    record = cloud._engine._run.record
    assert record is not None
    return record.path


def losetup_lines() -> set[str]:
    return set(
        subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
    )


def mount_lines() -> set[str]:
    return set(Path("/proc/mounts").read_text().splitlines())


def processes() -> dict[int, str]:
    """pid -> its pid namespace, for every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = os.readlink(entry / "ns" / "pid")
    return found


def pid_namespaces(cloud: LocalCloud, held: contextlib.ExitStack) -> set[str]:
    """The pid namespaces of the cloud's running hosts (white box: for the leak checks),
    each held open until ``held`` closes: the kernel gives a freed namespace's inode
    number to the next one made, and another worker's cloud made meanwhile would be
    counted as this one's leftovers. A held namespace keeps no process alive."""
    found = set()
    for machine in cloud._engine.machines.values():
        if machine.host.init_pid:
            with contextlib.suppress(OSError):
                fd = os.open(f"/proc/{machine.host.init_pid}/ns/pid", os.O_RDONLY)
                held.callback(os.close, fd)
                found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return found


class Footprint:
    """What is on the machine before a cloud; what of that cloud is left after it."""

    def __init__(self) -> None:
        self.loops = losetup_lines()
        self.mounts = mount_lines()
        self.procs = processes()

    def leftovers(self, state_dir: str, namespaces: Iterable[str]) -> list[str]:
        namespaces = set(namespaces)
        left = [f"loop: {x}" for x in losetup_lines() - self.loops if state_dir in x]
        left += [f"mount: {x}" for x in mount_lines() - self.mounts if state_dir in x]
        left += [
            f"process {pid} in an instance's pid namespace"
            for pid, ns in processes().items()
            if pid not in self.procs and ns in namespaces
        ]
        if Path(state_dir).exists():
            left.append(f"state dir {state_dir}")
        return left


# -- the API --------------------------------------------------------------------------------


async def test_image_regions_zones(cloud: LocalCloud, ec2: Any) -> None:
    images = await ec2.describe_images(Filters=[{"Name": "name", "Values": [cloud.image_name]}])
    assert [i["ImageId"] for i in images["Images"]] == [cloud.image_id]
    assert cloud.image_name == "asyncstage-local-debian-12"
    assert cloud.default_username == "admin"
    zones = await ec2.describe_availability_zones()
    assert any(z["ZoneName"] == "us-east-1a" for z in zones["AvailabilityZones"])
    regions = await ec2.describe_regions()
    assert any(r["RegionName"] == "us-east-1" for r in regions["Regions"])
    assert cloud.api_calls["DescribeImages"] >= 1
    assert cloud.endpoint_url.startswith("http://127.0.0.1:")


async def test_unknown_regions_and_images_are_refused(cloud: LocalCloud, ec2: Any) -> None:
    kwargs = {**cloud.session_kwargs(), "region_name": "xx-nowhere-1"}
    async with aioboto3.Session().client("ec2", **kwargs) as other:
        with pytest.raises(ClientError, match="scoped to a valid region"):
            await other.describe_instances()
    with pytest.raises(ClientError, match=r"InvalidAMIID\.NotFound"):
        await ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
    with pytest.raises(ClientError, match=r"InvalidKeyPair\.NotFound"):
        await ec2.run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1, KeyName="nope")


async def test_three_instances_are_isolated_hosts(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, three: list[dict[str, Any]]
) -> None:
    addresses = [i["PublicIpAddress"] for i in three]
    private = [i["PrivateIpAddress"] for i in three]
    assert len(set(addresses) | set(private)) == 6
    for instance in three:
        public, own = instance["PublicIpAddress"], instance["PrivateIpAddress"]
        if cloud.network == "vpc":  # the default VPC's, and the cloud's public range
            assert ipaddress.ip_address(own) in ipaddress.ip_network("172.31.0.0/16")
            assert ipaddress.ip_address(public) in ipaddress.ip_network("198.18.0.0/15")
        else:
            for address in (public, own):
                assert address.startswith("127.") and not address.startswith("127.0.0.")
        # DNS names are the addresses: a client connecting by name (the Perl module) must
        # not send a DNS query off the machine for an amazonaws.com name
        assert instance["PrivateDnsName"] == instance["PrivateIpAddress"]
        assert instance["PublicDnsName"] == instance["PublicIpAddress"]
        (nic,) = instance["NetworkInterfaces"]
        assert nic["Association"]["PublicDnsName"] == instance["PublicDnsName"]
        assert nic["PrivateIpAddress"] == instance["PrivateIpAddress"]
    reply = await ec2.describe_instances(
        Filters=[
            {"Name": "tag:Name", "Values": ["three"]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ]
    )
    assert {i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]} == {
        i["InstanceId"] for i in three
    }

    token = f"only-on-one-{os.getpid()}-{time.monotonic_ns()}"
    async with ssh(ec2, three[0], key) as conn:
        assert (await sh(conn, "id -un")).strip() == "admin"
        assert (await sh(conn, "hostname")).strip() == "ip-" + private[0].replace(".", "-")
        assert (await sh(conn, "sudo -n id -u")).strip() == "0"
        await sh(conn, f"echo hello > ~/{token} && sudo -n touch /etc/{token} /var/{token}")
        assert (await sh(conn, f"cat ~/{token}")).strip() == "hello"
        # its own /dev, /proc (its processes only) and devpts
        assert (
            await sh(conn, "ls /dev/null /dev/zero /dev/urandom /dev/pts/ptmx | wc -l")
        ) == "4\n"
        assert int(await sh(conn, "ls /proc | grep -c '^[0-9]'")) < 20
    for other in three[1:]:
        async with ssh(ec2, other, key) as conn:
            out = await sh(conn, f"ls ~/{token} /etc/{token} /var/{token} 2>&1 || true")
            assert out.count("No such file") == 3
            # instances reach each other's sshd at its private address (the default group
            # admits its members' private addresses); on loopback at its public one too
            # (on the cloud's network, as on EC2, a public address comes in from the
            # source's public address, which no rule of the default group admits)
            reached = (private[0],) if cloud.network == "vpc" else (addresses[0], private[0])
            for address in reached:
                probe = await conn.run(
                    f"exec 3<>/dev/tcp/{address}/22 && head -c 4 <&3", check=True
                )
                assert probe.stdout == "SSH-"
    assert not exists(f"/etc/{token}", f"/var/{token}", f"/home/admin/{token}")


async def test_console_fingerprints_match_the_host_key_ssh_sees(
    ec2: Any, key: asyncssh.SSHKey, three: list[dict[str, Any]]
) -> None:
    for instance in three:
        fingerprints, _ = await known_host_keys(ec2, instance["InstanceId"])
        async with ssh(ec2, instance, key) as conn:
            seen = conn.get_server_host_key()
            assert seen is not None
            assert seen.get_fingerprint("sha256") in fingerprints
    # a wrong key is refused: host key checking is on
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    address = three[0]["PublicIpAddress"]
    known = asyncssh.import_known_hosts(f"{address} {other_key}")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with asyncssh.connect(
            address, username="admin", client_keys=[key], known_hosts=known
        ):
            pass


async def test_instances_look_like_ec2_of_their_type(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, three: list[dict[str, Any]]
) -> None:
    # Nitro (t3): the root as /dev/nvme0n1 + p1, its volume id as the NVMe serial
    nitro = three[0]
    assert nitro["RootDeviceName"] == "/dev/xvda"
    assert [m["DeviceName"] for m in nitro["BlockDeviceMappings"]] == ["/dev/xvda"]
    root_volume = nitro["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    async with ssh(ec2, nitro, key) as conn:
        listing = (await sh(conn, "ls /dev")).split()
        assert {"nvme0n1", "nvme0n1p1"} <= set(listing)
        assert not [n for n in listing if n.startswith(("xvd", "sd"))]
        link = f"{BY_ID}{root_volume.replace('-', '')}"
        assert (await sh(conn, f"readlink -f {link}")) == "/dev/nvme0n1\n"
        assert "ID=" in await sh(conn, "cat /etc/os-release")
        assert (await sh(conn, "echo ~ && stat -c %U ~")).split() == ["/home/admin", "admin"]
        # the root device is there to be seen, not written
        out = await conn.run("sudo -n dd if=/dev/zero of=/dev/nvme0n1 bs=512 count=1 2>&1")
        assert out.exit_status != 0
    # Xen (t2): /dev/xvda + xvda1, volumes as /dev/xvdX, partition-style names accepted
    (iid,) = await launch(cloud, ec2, 1, "t2.micro")
    (xen,) = await wait_state(ec2, [iid], "running")
    zone = xen["Placement"]["AvailabilityZone"]
    vol = (await ec2.create_volume(Size=1, AvailabilityZone=zone))["VolumeId"]
    for refused in ("/dev/xvda", "/dev/sda1", "/dev/foo", "/dev/sdf16", "xvdzzz"):
        with pytest.raises(ClientError, match="InvalidParameterValue"):
            await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device=refused)
    await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdf1")
    await wait_volume(ec2, vol, "in-use")
    async with ssh(ec2, xen, key) as conn:
        assert await node(conn, "/dev/xvdf1") == "/dev/xvdf1"
        listing = (await sh(conn, "ls /dev")).split()
        assert {"xvda", "xvda1", "xvdf1"} <= set(listing)
        assert not [n for n in listing if n.startswith("nvme")]
        assert (await sh(conn, "ls -A /dev/disk/by-id")) == ""
        await sh(conn, "sudo -n mkfs.ext4 -q /dev/xvdf1")
    await ec2.detach_volume(VolumeId=vol)
    await wait_volume(ec2, vol, "available")
    await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/xvdbc")
    await wait_volume(ec2, vol, "in-use")
    async with ssh(ec2, xen, key) as conn:
        await node(conn, "/dev/xvdbc")
        assert (await sh(conn, "sudo -n blkid -o value -s TYPE /dev/xvdbc")) == "ext4\n"
    await ec2.terminate_instances(InstanceIds=[iid])
    await wait_volume(ec2, vol, "available")
    await ec2.delete_volume(VolumeId=vol)


async def test_volume_snapshot_and_restore(
    ec2: Any, key: asyncssh.SSHKey, three: list[dict[str, Any]]
) -> None:
    a, b = three[0], three[1]
    zone = a["Placement"]["AvailabilityZone"]
    volume = await ec2.create_volume(
        Size=1,
        AvailabilityZone=zone,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": "data"}]}],
    )
    vol = volume["VolumeId"]
    await ec2.attach_volume(VolumeId=vol, InstanceId=a["InstanceId"], Device="/dev/sdf")
    attached = await wait_volume(ec2, vol, "in-use")
    assert attached["Attachments"][0]["State"] == "attached"
    assert attached["Attachments"][0]["InstanceId"] == a["InstanceId"]
    by_id = BY_ID + vol.replace("-", "")
    async with ssh(ec2, a, key) as conn:
        # a Nitro type (t3): an NVMe name, found by the volume id as its serial
        device = await node(conn, by_id)
        assert re.fullmatch(r"/dev/nvme([1-9]|[12][0-9])n1", device), device
        assert (await sh(conn, f"sudo -n blockdev --getsize64 {device}")).strip() == str(1 << 30)
        await sh(conn, f"sudo -n mkfs.ext4 -q {device} && sudo -n mkdir -p /data")
        await sh(conn, f"sudo -n mount {device} /data && echo precious | sudo -n tee /data/f")
        # the machine does not see the instance's mount
        assert not any(" /data " in line for line in mount_lines())
        # detaching a mounted volume leaves it busy until it is unmounted, as on EC2
        await ec2.detach_volume(VolumeId=vol)
        await anyio.sleep(0.5)
        busy = (await ec2.describe_volumes(VolumeIds=[vol]))["Volumes"][0]
        assert (busy["State"], busy["Attachments"][0]["State"]) == ("in-use", "busy")
        await sh(conn, "sudo -n umount /data")
    await wait_volume(ec2, vol, "available")
    snap = (await ec2.create_snapshot(VolumeId=vol, Description="data"))["SnapshotId"]
    await wait_snapshot(ec2, snap)
    async with ssh(ec2, a, key) as conn:
        assert (await sh(conn, f"ls {device} {by_id} 2>&1 || true")).count("No such file") == 2

    copy = (await ec2.copy_snapshot(SourceSnapshotId=snap, SourceRegion="us-east-1"))["SnapshotId"]
    await wait_snapshot(ec2, copy)
    restored = (await ec2.create_volume(SnapshotId=copy, Size=2, AvailabilityZone=zone))["VolumeId"]
    await wait_volume(ec2, restored, "available")  # creating while its image is copied
    await ec2.attach_volume(VolumeId=restored, InstanceId=b["InstanceId"], Device="/dev/xvdg")
    await wait_volume(ec2, restored, "in-use")
    async with ssh(ec2, b, key) as conn:
        device = await node(conn, f"{BY_ID}{restored.replace('-', '')}")
        assert device.startswith("/dev/nvme")
        assert (await sh(conn, f"sudo -n blockdev --getsize64 {device}")).strip() == str(2 << 30)
        await sh(conn, f"sudo -n mkdir -p /restored && sudo -n mount {device} /restored")
        assert (await sh(conn, "cat /restored/f")) == "precious\n"
        await sh(conn, "sudo -n umount /restored")
    await ec2.detach_volume(VolumeId=restored, InstanceId=b["InstanceId"])
    await wait_volume(ec2, restored, "available")
    with pytest.raises(ClientError, match="smaller than snapshot"):
        await ec2.create_volume(SnapshotId=snap, Size=0, AvailabilityZone=zone)
    for v in (vol, restored):
        await ec2.delete_volume(VolumeId=v)
    for s in (snap, copy):
        await ec2.delete_snapshot(SnapshotId=s)
    assert not any(vol in line or restored in line for line in losetup_lines())


async def test_stop_start_keeps_root_and_attachment(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, three: list[dict[str, Any]]
) -> None:
    c = three[2]
    iid = c["InstanceId"]
    vol = (await ec2.create_volume(Size=1, AvailabilityZone=c["Placement"]["AvailabilityZone"]))[
        "VolumeId"
    ]
    await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdh")
    await wait_volume(ec2, vol, "in-use")
    fingerprints, _ = await known_host_keys(ec2, iid)
    by_id = BY_ID + vol.replace("-", "")
    async with ssh(ec2, c, key) as conn:
        await node(conn, by_id)
        await sh(conn, f"echo kept > ~/kept && sudo -n mkfs.ext4 -q {by_id}")
        await sh(conn, f"sudo -n mkdir /v && sudo -n mount {by_id} /v && sudo -n touch /v/x")
        device = (await sh(conn, f"readlink -f {by_id}")).strip()
    reply = await ec2.stop_instances(InstanceIds=[iid])
    assert reply["StoppingInstances"][0]["CurrentState"]["Name"] == "stopping"
    await wait_state(ec2, [iid], "stopped")
    with pytest.raises(OSError):
        await anyio.connect_tcp(c["PublicIpAddress"], 22)
    volume = await wait_volume(ec2, vol, "in-use")  # the attachment stays
    assert volume["Attachments"][0]["InstanceId"] == iid

    reply = await ec2.start_instances(InstanceIds=[iid])
    assert reply["StartingInstances"][0]["CurrentState"]["Name"] == "pending"
    (started,) = await wait_state(ec2, [iid], "running")
    # EC2: a new public address at every start; the private one stays
    assert started["PublicIpAddress"] != c["PublicIpAddress"]
    assert started["PrivateIpAddress"] == c["PrivateIpAddress"]
    with pytest.raises(OSError):
        await anyio.connect_tcp(c["PublicIpAddress"], 22)
    if cloud.network == "loopback":
        async with await anyio.connect_tcp(started["PrivateIpAddress"], 22):
            pass  # its sshd listens on the private address too
    assert (await known_host_keys(ec2, iid))[0] == fingerprints
    async with ssh(ec2, started, key) as conn:
        assert (await sh(conn, "cat ~/kept")) == "kept\n"
        # the mount went with the old boot; the device and its data are still there
        assert "/v" not in await sh(conn, "cat /proc/mounts")
        assert (await sh(conn, f"readlink -f {by_id}")).strip() == device  # the same node
        await sh(conn, f"sudo -n mount {device} /v && ls /v/x && sudo -n umount /v")
    await ec2.detach_volume(VolumeId=vol)
    await wait_volume(ec2, vol, "available")
    await ec2.delete_volume(VolumeId=vol)
    assert cloud.api_calls["StopInstances"] >= 1 and cloud.api_calls["StartInstances"] >= 1


async def test_terminate_cleans_up(cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey) -> None:
    (iid,) = await launch(cloud, ec2, 1)
    (instance,) = await wait_state(ec2, [iid], "running")
    vol = (
        await ec2.create_volume(Size=1, AvailabilityZone=instance["Placement"]["AvailabilityZone"])
    )["VolumeId"]
    await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdf")
    await wait_volume(ec2, vol, "in-use")
    with contextlib.ExitStack() as held:
        namespaces = pid_namespaces(cloud, held)
        ns = os.readlink(f"/proc/{cloud._engine.machines[iid].host.init_pid}/ns/pid")
        root = Path(cloud.state_dir) / "roots" / iid
        assert root.exists()
        reply = await ec2.terminate_instances(InstanceIds=[iid])
        assert reply["TerminatingInstances"][0]["CurrentState"]["Name"] == "shutting-down"
        await wait_state(ec2, [iid], "terminated")
        await wait_volume(ec2, vol, "available")
        assert ns in namespaces
        assert ns not in set(processes().values())
    assert not root.exists()
    assert not any(vol in line for line in losetup_lines())
    with pytest.raises(OSError):
        await anyio.connect_tcp(instance["PublicIpAddress"], 22)
    with pytest.raises(ClientError, match="IncorrectInstanceState"):
        await ec2.start_instances(InstanceIds=[iid])
    await ec2.delete_volume(VolumeId=vol)


@pytest.mark.slow
async def test_fifty_instances_in_one_call(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey
) -> None:
    start = time.monotonic()
    reply = await ec2.run_instances(
        ImageId=cloud.image_id, MinCount=1, MaxCount=50, KeyName="test"
    )  # MaxCount: the local cloud always has the capacity
    ids = [i["InstanceId"] for i in reply["Instances"]]
    assert len(ids) == 50
    instances = await wait_state(ec2, ids, "running", within=120)
    running = time.monotonic() - start
    limit = anyio.CapacityLimiter(10)
    hostnames: dict[str, str] = {}

    async def login(instance: dict[str, Any]) -> None:
        async with limit, ssh(ec2, instance, key) as conn:
            hostnames[instance["InstanceId"]] = (await sh(conn, "hostname")).strip()

    async with anyio.create_task_group() as tg:
        for instance in instances:
            tg.start_soon(login, instance)
    assert len(set(hostnames.values())) == 50
    answered = time.monotonic() - start
    print(f"\n50 instances: running after {running:.1f}s, all answered ssh after {answered:.1f}s")
    await ec2.terminate_instances(InstanceIds=ids)
    await wait_state(ec2, ids, "terminated", within=120)


# -- a cloud of its own ---------------------------------------------------------------------


async def test_boot_delay_is_observed_as_pending() -> None:
    # the delay is far longer than seeing sshd answer takes, even on a loaded machine
    boot_delay = 8.0
    async with (
        LocalCloud(boot_delay=boot_delay) as cloud,
        patient_client(**cloud.session_kwargs()) as ec2,
    ):
        await admit_ssh_from_here(cloud, ec2)
        launched = time.monotonic()
        reply = await ec2.run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1)
        instance = reply["Instances"][0]
        assert instance["State"]["Name"] == "pending"
        iid, address = instance["InstanceId"], instance["PublicIpAddress"]
        with anyio.fail_after(30):  # sshd answers first ...
            while True:
                with contextlib.suppress(OSError):
                    stream = await anyio.connect_tcp(address, 22)
                    await stream.aclose()
                    break
                await anyio.sleep(0.05)
        (described,) = await describe(ec2, [iid])
        assert described["State"]["Name"] == "pending"  # ... and still pending
        await wait_state(ec2, [iid], "running")
        assert time.monotonic() - launched >= boot_delay  # never before the delay ran out


async def test_two_clouds_at_once_do_not_collide(cloud: LocalCloud, ec2: Any) -> None:
    (mine,) = await launch(cloud, ec2, 1)
    async with (
        LocalCloud() as other,
        patient_client(**other.session_kwargs()) as ec2_other,
    ):
        assert other.endpoint_url != cloud.endpoint_url
        assert other.account_id != cloud.account_id
        reply = await ec2_other.run_instances(ImageId=other.image_id, MinCount=1, MaxCount=1)
        theirs = reply["Instances"][0]["InstanceId"]
        (a,) = await wait_state(ec2, [mine], "running")
        (b,) = await wait_state(ec2_other, [theirs], "running")
        block = {x["PublicIpAddress"].rsplit(".", 1)[0] for x in (a, b)}
        assert len(block) == 2  # each cloud has its own address block (a /24 of it)
        listed = await ec2_other.describe_instances()
        assert [i["InstanceId"] for r in listed["Reservations"] for i in r["Instances"]] == [theirs]
    await ec2.terminate_instances(InstanceIds=[mine])
    await wait_state(ec2, [mine], "terminated")


async def _busy_cloud(cloud: LocalCloud) -> None:
    """Launch an instance with a volume mounted inside it."""
    async with patient_client(**cloud.session_kwargs()) as ec2:
        private = asyncssh.generate_private_key("ssh-ed25519")
        await ec2.import_key_pair(KeyName="test", PublicKeyMaterial=private.export_public_key())
        await admit_ssh_from_here(cloud, ec2)
        (iid,) = await launch(cloud, ec2, 1)
        (instance,) = await wait_state(ec2, [iid], "running")
        vol = (await ec2.create_volume(Size=1, AvailabilityZone="us-east-1a"))["VolumeId"]
        await ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdf")
        await wait_volume(ec2, vol, "in-use")
        async with ssh(ec2, instance, private) as conn:
            by_id = BY_ID + vol.replace("-", "")
            await node(conn, by_id)
            await sh(conn, f"sudo -n mkfs.ext4 -q {by_id} && sudo -n mount {by_id} /mnt")
            await sh(conn, "sleep 1000 </dev/null >/dev/null 2>&1 &")


def _volume_dio(cloud: LocalCloud) -> set[str]:
    """The direct I/O flags of the loop devices of the cloud's volumes."""
    images = [x for x in losetup_lines() if cloud.state_dir in x and "/volumes/" in x]
    return {
        Path(f"/sys/block/{Path(x.split(':')[0]).name}/loop/dio").read_text().strip()
        for x in images
    }


@pytest.mark.parametrize(
    ("how", "store"),
    [("normal", "plain"), ("exception", "plain"), ("cancelled", "plain"), ("normal", "reflink")],
)
async def test_nothing_left_behind(how: str, store: Store) -> None:
    before = Footprint()
    cloud = LocalCloud(store=store)
    namespaces: set[str] = set()
    entry = None
    with contextlib.ExitStack() as held:  # the namespaces held until they are checked
        with anyio.CancelScope() as scope:
            with contextlib.suppress(RuntimeError):
                async with cloud:
                    await _busy_cloud(cloud)
                    namespaces = pid_namespaces(cloud, held)
                    entry = registry_entry(cloud)
                    assert exists(str(entry))
                    assert losetup_lines() - before.loops
                    # the volume's loop device: direct I/O in the reflink store (the
                    # instance's page cache the only one), buffered in the plain one
                    assert _volume_dio(cloud) == {"1" if store == "reflink" else "0"}
                    if how == "exception":
                        raise RuntimeError("boom")
                    if how == "cancelled":
                        scope.cancel()
                        await anyio.sleep(10)
        assert namespaces
        # a killed process stays in /proc until its parent reaps it, which on a loaded
        # machine may come a moment after the cloud returned: allowed a bound, never a
        # leak that lasts
        left = before.leftovers(cloud.state_dir, namespaces)
        with anyio.move_on_after(15):
            while left:
                await anyio.sleep(0.2)
                left = before.leftovers(cloud.state_dir, namespaces)
        assert left == []
    assert entry is not None and not exists(str(entry))


_CRASHER = textwrap.dedent(
    """
    import os, sys, anyio
    sys.path.insert(0, {root!r})
    from tests.test_localcloud import LocalCloud, _busy_cloud

    async def main():
        cloud = LocalCloud(store={store!r})
        await cloud.start()
        await _busy_cloud(cloud)
        print(cloud.state_dir, flush=True)
        os.kill(os.getpid(), 9)   # a crash: no cleanup at all

    anyio.run(main)
    """
)


@pytest.mark.parametrize("store", ["plain", "reflink"])
async def test_a_crashed_run_is_cleaned_at_the_next_start(store: Store) -> None:
    before = Footprint()
    root = ROOT
    with anyio.fail_after(120):
        crashed = await anyio.run_process(
            [sys.executable, "-c", _CRASHER.format(root=root, store=store)], cwd=root, check=False
        )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    state_dir = crashed.stdout.decode().strip()
    assert exists(state_dir)
    assert any(state_dir in line for line in losetup_lines())
    async with LocalCloud():
        pass
    left = before.leftovers(state_dir, [])
    assert left == []
    # and its hosts: no sshd of it listens any more
    assert not any(state_dir in line for line in mount_lines())


def test_errors_name_the_problem() -> None:
    from asyncstage.localcloud._system import which

    with pytest.raises(MissingDependency, match="apt-get install no-such-program-xyz"):
        which("no-such-program-xyz")
    # without root: a clear error (run in a child that drops root)
    code = (
        "import os, anyio, anyio._backends._asyncio, anyio.to_thread\n"
        "from asyncstage.localcloud import LocalCloud\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "async def main():\n"
        "    async with LocalCloud(): pass\n"
        "anyio.run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert NeedsRoot.__name__ in done.stderr and "needs root" in done.stderr


def test_crash_cleanup_touches_only_what_is_still_the_runs(tmp_path: Path) -> None:
    """A dead run's record names a loop device, a mount and a state dir; since then the
    path of its image holds another file (bound to that loop device), another mount sits
    on its mount point and a live cloud holds its state dir: none of them is touched.
    What still is the dead run's (a loop bound to the very file it recorded) is freed."""
    from asyncstage.localcloud._registry import REGISTRY_DIR, LoopId, lock_state_dir

    def losetup(*args: str) -> str:
        return subprocess.run(
            ["losetup", *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    reused, own = tmp_path / "reused.img", tmp_path / "own.img"
    for image in (reused, own):
        image.write_bytes(b"\0" * (1 << 20))
    old = LoopId.of(reused)
    reused.rename(tmp_path / "old.img")  # kept: its inode is not reused at once
    reused.write_bytes(b"\1" * (1 << 20))  # same path, another file
    assert LoopId.of(reused) != old
    stranger = losetup("--find", "--show", str(reused))
    mine = losetup("--find", "--show", str(own))
    assert stranger.startswith("/dev/loop") and mine.startswith("/dev/loop")
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "someone-else", str(mount_point)], check=True)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    held = lock_state_dir(state_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = REGISTRY_DIR / f"{dead.pid}-deadbeef.json"
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps(
            {
                "owner": dead.pid,
                "owner_start": 1,
                "token": "deadbeef",
                "state_dir": str(state_dir),
                "created_state_dir": True,
                "block": None,
                "pids": {},
                "mounts": [[str(mount_point), "asyncstage-roots-deadbeef"]],
                "loops": {
                    stranger: [old.image, old.inode, old.device],
                    mine: list(LoopId.of(own).__dict__.values()),
                },
                "cgroups": [],
            }
        )
    )
    try:

        async def start_one() -> None:
            async with LocalCloud():
                pass

        anyio.run(start_one)
        assert not record.exists()
        assert losetup("--list", "--noheadings", "-O", "BACK-FILE", stranger) == str(reused)
        # its loop is freed (the device number may serve another worker's cloud since)
        assert losetup("--associated", str(own)) == ""
        assert str(mount_point) in Path("/proc/mounts").read_text()
        assert state_dir.is_dir()
    finally:
        record.unlink(missing_ok=True)
        os.close(held)
        subprocess.run(["umount", str(mount_point)], check=False)
        for image in (reused, own):  # only the devices still bound to this test's files
            for line in losetup("--associated", str(image)).splitlines():
                device = line.split(":", 1)[0]
                subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
