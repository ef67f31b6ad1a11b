"""An instance, its root included, cannot reach the machine's private files or disks.

Each attempt is made from inside an instance as root (``sudo -n``) over ssh, the way a
careless script or a hostile user would; the machine-side facts (its shadow hashes, its
host keys, its root disk) are read here to compare.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from asyncstage.localcloud import LocalCloud
from asyncstage.localcloud._isolation import DROPPED_CAPS, device_cgroups_available
from asyncstage.localcloud._registry import REGISTRY_DIR
from tests.test_localcloud import launch, node, sh, ssh, wait_state, wait_volume

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]


@pytest.fixture(scope="module")
async def cloud() -> AsyncIterator[LocalCloud]:
    async with LocalCloud() as c:
        yield c


@pytest.fixture(scope="module")
async def pair(cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey) -> list[dict[str, Any]]:
    """Two running instances (t2: Xen names); the second has a volume attached."""
    ids = await launch(cloud, ec2, 2, "t2.micro")
    return await wait_state(ec2, ids, "running")


PROBE = "/root/.asyncstage-isolation-probe"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


async def root_sh(conn: asyncssh.SSHClientConnection, command: str) -> tuple[int, str]:
    """Run ``command`` as root inside; (exit status, stdout + stderr)."""
    result = await conn.run(f"sudo -n sh -c {command!r} 2>&1")
    return int(result.exit_status or 0), str(result.stdout)


async def test_private_files_are_masked(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    machine_hashes = {
        line.split(":")[1]
        for line in _read("/etc/shadow").splitlines()
        if line.count(":") > 1 and line.split(":")[1] not in ("", "*", "!", "!*")
    }
    _write(PROBE, "secret\n")
    try:
        async with ssh(ec2, pair[0], key) as conn:
            assert (await root_sh(conn, "ls -A /root"))[1] == ""
            assert (await root_sh(conn, "ls -A /home"))[1].split() == ["admin"]
            assert (await sh(conn, "echo $HOME && ls -A ~")).split()[0] == "/home/admin"
            status, out = await root_sh(conn, f"cat {PROBE}")
            assert status != 0 and "No such file" in out
            shadow = (await root_sh(conn, "cat /etc/shadow"))[1]
            fields = {line.split(":")[1] for line in shadow.splitlines() if ":" in line}
            assert not fields & machine_hashes
            assert not any(f.startswith("$") for f in fields), shadow
            for private in ("/etc/shadow-", "/etc/gshadow-", "/work", "/opt/wheels"):
                status, out = await root_sh(conn, f"ls -d {private}")
                assert status != 0, f"{private} visible: {out}"
            # the state dir of the cloud (volume images of every instance) and its registry
            private_dirs = (cloud.state_dir, f"{cloud.state_dir}/volumes", REGISTRY_DIR)
            for path in private_dirs:
                status, out = await root_sh(conn, f"ls -A {path}")
                assert status != 0 or out == "", f"{path}: {out}"
            # ssh host keys: its own two, not the machine's
            keys = (await root_sh(conn, "ls /etc/ssh"))[1].split()
            assert sorted(k for k in keys if k.startswith("ssh_host_")) == [
                "ssh_host_ecdsa_key",
                "ssh_host_ecdsa_key.pub",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
            ]
            own = (await root_sh(conn, "cat /etc/ssh/ssh_host_ed25519_key"))[1]
            machine_key = _read("/etc/ssh/ssh_host_ed25519_key")
            assert own.strip() and own.strip() != machine_key.strip()
            # the system tree is there: programs, their libraries, /etc
            assert (await sh(conn, "python3 -c 'print(6*7)'")) == "42\n"
            assert (await sh(conn, "test -r /etc/os-release && echo ok")) == "ok\n"
    finally:
        os.unlink(PROBE)


async def test_devices_are_the_clouds_only(
    cloud: LocalCloud, ec2: Any, key: asyncssh.SSHKey, pair: list[dict[str, Any]]
) -> None:
    a, b = pair
    # the other instance's volume: its loop device is on this machine
    vol = (await ec2.create_volume(Size=1, AvailabilityZone=b["Placement"]["AvailabilityZone"]))[
        "VolumeId"
    ]
    await ec2.attach_volume(VolumeId=vol, InstanceId=b["InstanceId"], Device="/dev/sdf")
    await wait_volume(ec2, vol, "in-use")
    loop = cloud._engine.disks[vol].loop
    assert loop is not None
    st = os.stat("/")
    machine_disk = os.path.basename(
        os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    )
    try:
        async with ssh(ec2, a, key) as conn:
            status, out = await root_sh(conn, "mknod /tmp/x b 7 0")
            assert status != 0 and "Operation not permitted" in out
            status, out = await root_sh(conn, f"mknod /tmp/y b {os.major(st.st_dev)} 0")
            assert status != 0
            bounding = int((await root_sh(conn, "grep CapBnd /proc/self/status"))[1].split()[1], 16)
            for name, bit in DROPPED_CAPS.items():
                assert not bounding & (1 << bit), name
            assert bounding & (1 << 21)  # CAP_SYS_ADMIN stays: volumes are mounted inside
            listing = set((await sh(conn, "ls /dev")).split())
            assert not {machine_disk, Path(loop).name, "loop-control", "mem", "kmsg"} & listing
            assert {"null", "zero", "urandom", "pts", "ptmx"} <= listing
            # a devtmpfs shows every node of the machine; the kernel refuses to open them
            if device_cgroups_available():
                await root_sh(conn, "mkdir -p /mnt/d && mount -t devtmpfs devtmpfs /mnt/d")
                for name in (machine_disk, Path(loop).name, "loop-control", "mem"):
                    status, out = await root_sh(conn, f"head -c 512 /mnt/d/{name} | wc -c")
                    assert out.strip().splitlines()[-1] == "0", (name, out)  # nothing read
                    if name == machine_disk:
                        assert "Operation not permitted" in out, out
                status, out = await root_sh(conn, f"mount /mnt/d/{machine_disk} /mnt")
                assert status != 0, out
                await root_sh(conn, "umount /mnt/d")
        async with ssh(ec2, b, key) as conn:
            # its own volume it may use (the library mounts volumes as root inside); the
            # volume says in-use while its attachment is still attaching: wait for the node
            await node(conn, "/dev/xvdf")
            await sh(conn, "sudo -n mkfs.ext4 -q /dev/xvdf && sudo -n mount /dev/xvdf /mnt")
            await sh(conn, "sudo -n umount /mnt")
    finally:
        await ec2.detach_volume(VolumeId=vol)
        await wait_volume(ec2, vol, "available")
        await ec2.delete_volume(VolumeId=vol)
