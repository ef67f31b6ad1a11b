"""Hostile input: names, mount points, paths and EC2 tags written to do harm.

Each is fed where users and other parties can feed it: the Python API, the
``asyncstage`` command (run for real, against the session's local cloud), and
EC2 tags planted with raw EC2 calls as another party with access to the
account would. Each must be refused with a clear typed error (or, for tags,
skipped with a warning), and nothing may be created, mounted or written
outside ``/mnt``.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server
from asyncstage.ec2 import EC2, tag, tag_filters, tags_of
from asyncstage.errors import InvalidName, MountPointRefused, PathError
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.shared_server import shared_server

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

EXE = Path(sys.executable).parent / "asyncstage"

HOSTILE_NAMES = [
    "../x",
    "../../usr/local/sbin",
    "a/b",
    "new\nline",
    "-rf",
    "--help",
    "two words",
    "it's",
    'say"hi"',
    "$(touch /tmp/pwned)",
    "`id`",
    "ünïcode",
    "x" * 300,
    ".",
    "..",
]

HOSTILE_MOUNT_POINTS = [
    "/",
    "/usr/local/sbin",
    "/etc",
    "/lib64/x",
    "/var/lib/data",
    "/root",
    "/run/x",
    "/mnt/Staging/../../usr/local/sbin",
    "relative/dir",
    "/mnt/new\nline",
    "/mnt/$(id)",
]


# the API tests share one server: each leaves it as it found it
manager, server = shared_server("hostile-host")


async def _mounts(server: Server) -> list[str]:
    """The mount points of the server, one per line as findmnt prints them."""
    out = await server.scmd("findmnt", "-rn", "-o", "TARGET")
    return sorted(out.splitlines())


async def _live_volumes(ec2: EC2) -> set[str]:
    vols = await ec2.describe_volumes()
    return {v["VolumeId"] for v in vols if v.get("State") not in ("deleting", "deleted")}


async def _live_instances(ec2: EC2) -> set[str]:
    insts = await ec2.describe_instances()
    return {
        i["InstanceId"]
        for i in insts
        if i.get("State", {}).get("Name") not in ("shutting-down", "terminated")
    }


def _assert_rule(err: BaseException) -> None:
    text = str(err)
    assert "starts with a letter or a digit" in text and "128" in text, text


# -- the API -------------------------------------------------------------------------------


async def test_hostile_names_are_refused_by_the_api(manager: Manager, server: Server) -> None:
    before_vols = await _live_volumes(manager.ec2)
    before_insts = await _live_instances(manager.ec2)
    before_mounts = await _mounts(server)
    for name in HOSTILE_NAMES:
        calls: list[Any] = [
            lambda n=name: manager.provision_volume(n, size=1),
            lambda n=name: manager.get_volume(n),
            lambda n=name: server.provision_volume(n, size=1),
            lambda n=name: server.add_volume(n, size=1, fstype="raw"),
            lambda n=name: manager.provision_server(n),
            lambda n=name: manager.get_server(n),
            lambda n=name: manager.provision_servers([n]),
        ]
        for call in calls:
            with pytest.raises(InvalidName) as info:
                await call()
            _assert_rule(info.value)
            assert isinstance(info.value, ValueError)
    assert await _live_volumes(manager.ec2) == before_vols
    assert await _live_instances(manager.ec2) == before_insts
    assert await _mounts(server) == before_mounts
    assert [v.name for v in manager.volumes()] == []
    assert [s.name for s in manager.servers()] == ["hostile-host"]


async def test_hostile_mount_points_are_refused(manager: Manager, server: Server) -> None:
    before_vols = await _live_volumes(manager.ec2)
    before_mounts = await _mounts(server)
    for where in HOSTILE_MOUNT_POINTS:
        with pytest.raises(MountPointRefused):
            await server.provision_volume("hostile-mtpt", size=1, mtpt=where)
        with pytest.raises(MountPointRefused):
            await manager.provision_volume("hostile-mtpt", size=1, mount=where)
    assert await _live_volumes(manager.ec2) == before_vols
    assert await _mounts(server) == before_mounts
    # an existing volume cannot be moved there either
    vol = await server.provision_volume("hostile-ok", size=1)
    for where in HOSTILE_MOUNT_POINTS:
        with pytest.raises(MountPointRefused):
            await server.mount_volume(vol, where)
        with pytest.raises(MountPointRefused):
            await vol.mount(server, where)
    assert vol.mounted and vol.mtpt == "/mnt/Staging/hostile-ok"
    assert sorted(set(await _mounts(server)) - set(before_mounts)) == ["/mnt/Staging/hostile-ok"]
    await vol.delete()


async def test_a_mount_point_that_is_a_symlink_out_is_refused(
    manager: Manager, server: Server
) -> None:
    # the target is a harmless directory under /run (refused like any system directory)
    target = f"/run/asyncstage-hostile-{secrets.token_hex(4)}"
    await server.scmd("mkdir", "-p", target, "/mnt/links", sudo=True)
    await server.scmd("ln", "-sfn", target, "/mnt/links/escape", sudo=True)
    await server.scmd("ln", "-sfn", "/mnt/links/escape", "/mnt/links/twice", sudo=True)
    before_vols = await _live_volumes(manager.ec2)
    before_mounts = await _mounts(server)
    for where in ("/mnt/links/escape", "/mnt/links/twice", "/mnt/links/escape/sub"):
        with pytest.raises(MountPointRefused, match="/run"):
            await server.provision_volume("hostile-link", size=1, mtpt=where)
    assert await _mounts(server) == before_mounts
    assert await _live_volumes(manager.ec2) == before_vols
    # a symlink that stays in an allowed place is followed: the volume is mounted
    # at the real directory
    await server.scmd("mkdir", "-p", "/srv/real", sudo=True)
    await server.scmd("ln", "-sfn", "/srv/real", "/mnt/links/fine", sudo=True)
    vol = await server.provision_volume("hostile-fine", size=1, mtpt="/mnt/links/fine")
    assert vol.mtpt == "/srv/real" and "/srv/real" in await _mounts(server)
    # nor is a mounted volume moved through such a link: it stays where it was
    for where in ("/mnt/links/escape", "/mnt/links/twice"):
        with pytest.raises(MountPointRefused, match="/run"):
            await server.mount_volume(vol, where)
        assert vol.mtpt == "/srv/real" and "/srv/real" in await _mounts(server)
    await vol.delete()
    await server.scmd("rm", "-rf", target, "/mnt/links", "/srv/real", sudo=True)


async def test_volumes_are_mounted_nosuid_nodev_by_default(server: Server) -> None:
    vol = await server.provision_volume("hostile-opts", size=1)
    assert vol.mtpt
    opts = (await server.scmd("findmnt", "-n", "-o", "OPTIONS", vol.mtpt)).strip().split(",")
    assert "nosuid" in opts and "nodev" in opts
    assert "nosuid" in vol.fstab_line() and "nodev" in vol.fstab_line()
    await vol.delete()


async def test_paths_inside_a_volume_stay_inside(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    vol = await server.provision_volume("hostile-paths", size=1)
    outside = f"/tmp/asyncstage-outside-{secrets.token_hex(4)}"
    await server.scmd("mkdir", "-p", outside)
    await server.scmd("sh", "-c", f"echo secret > {outside}/secret")
    await vol.cmd("ln", "-s", outside, "out")
    await vol.cmd("ln", "-s", "/etc", "etc")
    await vol.cmd("mkdir", "-p", "in")
    await vol.cmd("ln", "-s", "../out", "in/back-out")
    local = tmp_path / "local"
    (local / "file").parent.mkdir()
    (local / "file").write_text("data\n")
    try:
        for sub in ("out", "out/", "etc/", "in/back-out/", "../", "in/../../x"):
            # reading out of the volume through the link
            with pytest.raises(PathError):
                await manager.rsync(vol / sub, f"{local}/got/")
            with pytest.raises(PathError):
                await manager.rsync(f"{vol}/{sub}", f"{local}/got/")
            # writing out of the volume through the link
            with pytest.raises(PathError):
                await manager.rsync(f"{local}/", vol / sub)
            with pytest.raises(PathError):
                await vol.put(f"{local}/", dest=sub)
            with pytest.raises(PathError):
                await vol.ls(sub)
            with pytest.raises(PathError):
                await vol.rm("-rf", sub)
        assert not (local / "got").exists()
        # nothing was written or removed outside the volume
        assert (await server.scmd("ls", outside)).split() == ["secret"]
        assert (await server.scmd("cat", f"{outside}/secret")).strip() == "secret"
        # inside the volume everything still works
        await manager.rsync(f"{local}/", vol / "in/")
        assert "file" in await vol.ls("in")
    finally:
        await server.scmd("rm", "-rf", outside)
        await vol.delete()


# -- tags planted by another party ------------------------------------------------------------


async def _raw_ec2(cloud: LocalCloud) -> EC2:
    """An EC2 client of our own, as another party with access to the account has."""
    kw = cloud.session_kwargs()
    return await EC2(
        region=cloud.region,
        endpoint_url=cloud.endpoint_url,
        aws_access_key_id=kw["aws_access_key_id"],
        aws_secret_access_key=kw["aws_secret_access_key"],
    ).open()


async def test_hostile_tags_planted_with_raw_ec2_calls_are_skipped(
    manager_factory: ManagerFactory, cloud: LocalCloud, caplog: pytest.LogCaptureFixture
) -> None:
    run = secrets.token_hex(3)
    raw = await _raw_ec2(cloud)
    planted_vols: list[str] = []
    planted_insts: list[str] = []
    try:
        async with manager_factory(on_exit="run") as m:
            host = await m.get_server(f"hostile-tags-{run}")
            planted_insts.append(host.instance_id)  # terminated at the end
            zone = host.availability_zone
            assert m.key_pair is not None
            key_name = m.key_pair.name
            owner = {k: v for k, v in host.tags.items() if k == tag("owner")}
            assert owner, "a launched server carries its owner tag"
            before_mounts = await _mounts(host)
        # volumes that carry our tags (and our owner tag, copied) with hostile values
        for name, extra in [
            ("../../etc", {}),
            ("new\nline", {}),
            ("-rf", {}),
            (f"fine-name-{run}", {tag("mtpt"): "/usr/local/sbin"}),
            (f"fine-name2-{run}", {tag("mtpt"): "/mnt/../etc"}),
            (f"fine-name3-{run}", {tag("fstype"): "ext4 -o exec"}),
        ]:
            tags = {tag("role"): "volume", tag("name"): name, **owner, **extra}
            desc = await raw.call(
                "CreateVolume",
                AvailabilityZone=zone,
                Size=1,
                TagSpecifications=[{"ResourceType": "volume", "Tags": _tag_list(tags)}],
            )
            planted_vols.append(desc["VolumeId"])
        # instances with our key and tags but a hostile name or login user
        image = cloud.image_id
        for name, user in [("$(reboot)", "admin"), (f"fine-{run}", "-oProxyCommand=touch /tmp/x")]:
            tags = {tag("role"): "server", tag("name"): name, tag("user"): user, **owner}
            got = await raw.call(
                "RunInstances",
                ImageId=image,
                MinCount=1,
                MaxCount=1,
                KeyName=key_name,
                InstanceType="t3.micro",
                Placement={"AvailabilityZone": zone},
                TagSpecifications=[{"ResourceType": "instance", "Tags": _tag_list(tags)}],
            )
            planted_insts += [i["InstanceId"] for i in got["Instances"]]
        # EC2 shows another party's new ids only after a while (eventual consistency): the
        # planting party waits until they are visible, so that the scan below meets them
        assert len(await raw.describe_volumes(planted_vols)) == len(planted_vols)
        assert len(await raw.describe_instances(planted_insts)) == len(planted_insts)
        caplog.set_level(logging.WARNING, logger="asyncstage")
        async with manager_factory(on_exit="run", scan=True) as scanner:
            adopted_vols = {v.volume_id for v in scanner.volumes()}
            adopted_insts = {s.instance_id for s in scanner.servers()}
            assert not adopted_vols & set(planted_vols)
            assert not adopted_insts & set(planted_insts[1:])
            assert host.instance_id in adopted_insts
            for v in scanner.volumes():
                assert v.mtpt is None or v.mtpt.startswith("/mnt/")
            # the named lookups do not reach them either
            assert scanner.find_volume_by_name(f"fine-name-{run}") is None
            assert scanner.find_server_by_name(f"fine-{run}") is None
            again = await scanner.get_server(f"hostile-tags-{run}")
            assert again.instance_id == host.instance_id
            assert await _mounts(again) == before_mounts
        warned = "\n".join(r.getMessage() for r in caplog.records)
        for rid in [*planted_vols, *planted_insts[1:]]:
            assert rid in warned, f"no warning about {rid}"
        assert "naming rules" in warned
    finally:
        if planted_insts:
            await raw.terminate_instances(planted_insts)
        for vid in planted_vols:
            await raw.delete_volume(vid)
        await raw.close()


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


async def test_only_our_own_resources_are_adopted(
    manager_factory: ManagerFactory, cloud: LocalCloud, tmp_path: Path
) -> None:
    """Our tags alone are not enough: the key name (instances) or owner tag (volumes) too."""
    run = secrets.token_hex(3)
    raw = await _raw_ec2(cloud)
    made: list[str] = []
    vol: dict[str, Any] = {}
    try:
        async with manager_factory(on_exit="run") as mine:
            host = await mine.get_server(f"adopt-{run}")
            made.append(host.instance_id)
        # another party's volume with the library's tags and a valid name but no owner tag
        # of ours, and a server launched by a manager with another dot directory (key)
        tags = {tag("role"): "volume", tag("name"): f"theirs-{run}"}
        vol = await raw.call(
            "CreateVolume",
            AvailabilityZone=host.availability_zone,
            Size=1,
            TagSpecifications=[{"ResourceType": "volume", "Tags": _tag_list(tags)}],
        )
        async with manager_factory(on_exit="run", dotdir=tmp_path / "theirs") as theirs:
            made.append((await theirs.get_server(f"their-{run}")).instance_id)
        async with manager_factory(on_exit="run", scan=True) as scanner:
            assert scanner.find_volume_by_name(f"theirs-{run}") is None
            assert scanner.find_server_by_name(f"their-{run}") is None
            assert scanner.find_server_by_name(f"adopt-{run}") is not None
            # asking for the name makes a new one of our own, never takes theirs
            got = await scanner.provision_volume(f"theirs-{run}", size=1)
            assert got.volume_id != vol["VolumeId"]
            await got.delete()
    finally:
        if made:
            await raw.terminate_instances(made)
        if vol:
            await raw.delete_volume(vol["VolumeId"])
        await raw.close()


# -- the command line -------------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=240)


async def _run_all(
    env: dict[str, str], argvs: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Each command's outcome, in the order given; three run at once."""
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(argvs)
    limiter = anyio.CapacityLimiter(3)

    async def one(i: int) -> None:
        results[i] = await anyio.to_thread.run_sync(lambda: _cli(env, *argvs[i]), limiter=limiter)

    async with anyio.create_task_group() as tg:
        for i in range(len(argvs)):
            tg.start_soon(one, i)
    return [r for r in results if r is not None]


async def test_hostile_names_are_refused_by_the_cli(
    manager_factory: ManagerFactory, cloud: LocalCloud, cloud_dotdir: Path, tmp_path: Path
) -> None:
    env = os.environ | {
        "ASYNCSTAGE_ENDPOINT_URL": cloud.endpoint_url,
        "ASYNCSTAGE_CHECKIP_URL": cloud.checkip_url,
        "ASYNCSTAGE_DOTDIR": str(cloud_dotdir),
        "AWS_DEFAULT_REGION": cloud.region,
        # the cloud checks every request's signature: its own random credentials
        "AWS_ACCESS_KEY_ID": cloud.session_kwargs()["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": cloud.session_kwargs()["aws_secret_access_key"],
        "HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }
    env.pop("ASYNCSTAGE_LOCAL_DIR", None)
    run = secrets.token_hex(3)
    async with manager_factory(on_exit="terminate") as m:
        web = await m.get_server(f"cli-web-{run}")
        before_vols = await _live_volumes(m.ec2)
        before_mounts = await _mounts(web)
        named = [n for n in HOSTILE_NAMES if n != "--help"]  # that one asks for help
        calls = [
            (name, argv)
            for name in named
            for argv in (
                ["volumes", "provision", name, "--server", web.name],
                ["servers", "provision", name],
            )
        ]
        for where in ("/usr/local/sbin", "/mnt/Staging/../../etc"):
            argv = ["volumes", "provision", f"ok-{run}", "--server", web.name, "--mtpt", where]
            calls.append((None, argv))
        # independent commands, each refused before it opens a manager: a few at a time
        results = await _run_all(env, [argv for _, argv in calls])
        for (name, argv), done in zip(calls, results, strict=True):
            assert done.returncode != 0, (argv, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
            if name is None:
                continue
            # a leading "-" is an option to argparse: a usage error; the rest reach the
            # naming rule, which the message states
            why = "usage:" if name.startswith("-") else "starts with a letter or a digit"
            assert why in done.stderr, (argv, done.stderr)
        assert await _live_volumes(m.ec2) == before_vols
        assert await _mounts(web) == before_mounts
        described = await m.ec2.describe_volumes(filters=tag_filters({tag("role"): "volume"}))
        assert not [v for v in described if tags_of(v).get(tag("name")) in HOSTILE_NAMES]
