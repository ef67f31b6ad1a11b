"""Backup runs that crash or meet a fault, on one fleet for the whole module.

- The controller SIGKILLed at every step of a run (see :mod:`tests.backup_controller` for
  the points), then a rerun that completes, removes exactly what the dead run left and
  never builds on a snapshot that was not marked complete.
- A source server terminated mid-run (its backup's work volume made, its copy about to
  start): that backup fails with ``ServerNotRunning``, the others of the plan complete.
- A work volume too small for the data: a typed error, nothing left, a bigger one works.
- Hostile paths in a plan (options, shell syntax): typed errors, nothing run nor made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup.snapshots import usable
from asyncstage.ec2 import tag, tag_filters
from asyncstage.errors import RsyncError
from asyncstage.localcloud import LocalCloud
from tests.backup_support import NOTHING, leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("crashy", "crash-fresh", "crash-set", "crash-warm")


@dataclass
class Fleet:
    """The module's manager, the server that holds work volumes, and a source tree."""

    cloud: LocalCloud
    dotdir: Path
    manager: Manager
    host: Server
    src: Path


@pytest.fixture(scope="module")
async def fleet(
    cloud: LocalCloud, cloud_dotdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    src = tmp_path_factory.mktemp("crash-src")
    for i in range(24):
        (src / f"f{i:02}.bin").write_bytes(os.urandom(256 * 1024))
    async with cloud.manager(
        dotdir=cloud_dotdir, on_exit="terminate", scan=False, poll_interval=0.2
    ) as m:
        host = await m.provision_server("crash-host")
        try:
            yield Fleet(cloud, cloud_dotdir, m, host, src)
        finally:
            for name in NAMES:
                found = await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name}))
                for snap in found:
                    await m.ec2.delete_snapshot(snap["SnapshotId"])


def _controller(fleet: Fleet, config: dict[str, Any]) -> subprocess.Popen[str]:
    cloud = fleet.cloud
    session = cloud.session_kwargs()
    options = {
        "region": cloud.region,
        "endpoint_url": cloud.endpoint_url,
        "aws_access_key_id": session["aws_access_key_id"],
        "aws_secret_access_key": session["aws_secret_access_key"],
        "image": cloud.image_id,
        "username": cloud.default_username,
        "ssh_cidr": "127.0.0.1/32",
        "install_packages": False,
        "dotdir": str(fleet.dotdir),
        "on_exit": "run",
        "poll_interval": 0.2,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.backup_controller",
            json.dumps(config | {"manager": options}),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its rsync and ssh children die with it
    )


def _boto_options(cloud: LocalCloud) -> dict[str, Any]:
    session = cloud.session_kwargs()
    return {
        "endpoint_url": cloud.endpoint_url,
        "region_name": cloud.region,
        "aws_access_key_id": session["aws_access_key_id"],
        "aws_secret_access_key": session["aws_secret_access_key"],
    }


def _state(raw: Any, instance_id: str) -> str:
    found = raw.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(found[0]["Instances"][0]["State"]["Name"]) if found else "gone"


async def _kill_at(
    fleet: Fleet,
    name: str,
    point: str,
    want: dict[str, int],
    mode: str = "copy",
    keep_volume: bool = False,
) -> dict[str, list[str]]:
    """Run a controller up to ``point``, see what it made, SIGKILL it; what it left."""
    config = {
        "name": name,
        "mode": mode,
        "keep_volume": keep_volume,
        "sources": [str(fleet.src)],
        "server": fleet.host.name,
        "point": point,
    }
    proc = _controller(fleet, config)
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        with anyio.fail_after(240):
            while not seen or not seen[-1].startswith(("STOPPED", "DONE")):
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
                if not line:
                    break
                seen.append(line.strip())
        assert seen and seen[-1] == f"STOPPED {point}", "\n".join(seen)
        # EC2 lists what was just made after a while (the local cloud plays that too)
        with anyio.fail_after(60):
            # and the run's lease among them (its security group, a new id, listed late too)
            want = {**want, "leases": 1}
            while True:
                left = await leftovers(fleet.manager, name)
                if {k: len(left[k]) for k in want} == want:
                    break
                await anyio.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return left


async def _complete(m: Manager, name: str) -> list[str]:
    return [str(s["SnapshotId"]) for s in usable(await m.snapshots(name))]


# What a run stopped at each point has made: its work volume, its unfinished snapshots.
COPY_POINTS = {
    "lease": (0, 0),
    "created": (1, 0),
    "attached": (1, 0),
    "formatted": (1, 0),
    "volume": (1, 0),
    "copy": (1, 0),
    "copied": (1, 0),
    "snapshot": (1, 1),
    "complete": (1, 1),
    "marked": (1, 0),
    "detached": (1, 0),
}


@pytest.mark.parametrize("point", [*COPY_POINTS, "sweep"])
async def test_a_controller_killed_at_any_point_leaves_nothing_a_rerun_keeps(
    fleet: Fleet, point: str
) -> None:
    m, host = fleet.manager, fleet.host
    name = "crash-fresh" if point == "formatted" else "crashy"  # formatted: after mkfs
    before = await _complete(m, name)
    if name == "crashy":
        (fleet.src / f"late-{point}.txt").write_text(f"{point}\n")  # one change to copy

    if point == "sweep":
        # a run dies holding a mounted work volume; the next dies inside its sweep of it
        # (that volume unmounted and detached, not yet deleted); a third run completes
        first = await _kill_at(fleet, name, "volume", {"volumes": 1, "unfinished": 0})
        left = await _kill_at(fleet, name, "detached", {"volumes": 1, "unfinished": 0})
        assert left["volumes"] == first["volumes"] and left["leases"] != first["leases"]
    else:
        volumes, unfinished = COPY_POINTS[point]
        want = {"volumes": volumes, "unfinished": unfinished}
        left = await _kill_at(fleet, name, point, want)

    after = await _complete(m, name)
    marked = point in ("marked", "detached")  # the dead run marked its snapshot complete
    assert after[len(after) - len(before) :] == before
    assert len(after) == len(before) + marked

    # the dead run's lease has not expired: it is broken because its controller is gone
    again = await backup.backup(m, name, [fleet.src], server=host)
    assert again.previous_snapshot_id == (after[0] if after else None)  # never a half-made one
    assert set(again.swept) == set(left["volumes"] + left["unfinished"])
    assert again.files == (0 if marked else 1 if after else len(list(fleet.src.iterdir())))
    assert await _complete(m, name) == [again.snapshot_id, *after]
    assert await leftovers(m, name) == NOTHING
    assert m.volumes() == []
    mounts = await host.scmd("findmnt", "-rn", "-o", "TARGET", check=False)
    assert f"/{name}" not in mounts


async def test_a_controller_killed_copying_into_a_kept_volume_leaves_it_to_be_dropped(
    fleet: Fleet,
) -> None:
    """The kept volume is the dead run's from the moment it started to write to it: the
    next run never uses it as kept, removes it, and builds on the last complete backup."""
    m, host = fleet.manager, fleet.host
    first = await backup.backup(m, "crash-warm", [fleet.src], server=host, keep_volume=True)
    (fleet.src / "warm-late.txt").write_text("late\n")
    left = await _kill_at(
        fleet, "crash-warm", "copy", {"volumes": 1, "unfinished": 0}, keep_volume=True
    )
    assert left["volumes"] == [first.volume_id]

    again = await backup.backup(m, "crash-warm", [fleet.src], server=host, keep_volume=True)
    assert first.volume_id in again.swept and not again.volume_reused
    assert again.previous_snapshot_id == first.snapshot_id and again.files == 1
    assert await leftovers(m, "crash-warm") == NOTHING | {"volumes": [again.volume_id]}
    await m.find_volume_by_volid(again.volume_id).delete()
    assert await leftovers(m, "crash-warm") == NOTHING
    mounts = await host.scmd("findmnt", "-rn", "-o", "TARGET", check=False)
    assert "/crash-warm" not in mounts


@pytest.mark.parametrize("point", ["set", "set-complete"])
async def test_a_snapshot_set_killed_before_it_is_marked_is_never_a_backup(
    fleet: Fleet, point: str
) -> None:
    m, host = fleet.manager, fleet.host
    disk = await host.provision_volume("crash-disk", size=1)
    try:
        before = await _complete(m, "crash-set")
        left = await _kill_at(
            fleet, "crash-set", point, {"volumes": 0, "unfinished": 1}, mode="snapshot"
        )
        assert await _complete(m, "crash-set") == before
        again = await backup.snapshot_backup(m, "crash-set", host)
        assert set(again.swept) == set(left["unfinished"])
        assert list(again.snapshots) == [disk.volume_id]
        assert await _complete(m, "crash-set") == [again.snapshots[disk.volume_id], *before]
        assert await leftovers(m, "crash-set") == NOTHING
    finally:
        await disk.delete()


async def test_a_source_server_terminated_mid_run_fails_only_its_backup(
    fleet: Fleet, tmp_path: Path
) -> None:
    m, host = fleet.manager, fleet.host
    victim = await m.provision_server("crash-victim")
    await victim.scmd("sh", "-c", "mkdir -p /srv/app && echo v > /srv/app/index.html", sudo=True)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(name)
    plan = backup.Plan(
        (
            backup.PlannedBackup("gone-a", (str(tmp_path / "a"),), server=host.name),
            backup.PlannedBackup("gone-victim", ("crash-victim:/srv/app",), server=host.name),
            backup.PlannedBackup("gone-b", (str(tmp_path / "b"),), server=host.name),
        ),
        concurrency=3,
    )
    raw = boto3.client("ec2", **_boto_options(fleet.cloud))

    def terminate_at_copy(o: backup.BackupOutcome) -> None:
        # the victim's work volume is made, its copy about to start: the source goes away
        # (as if by someone else), and only then does the copy go on
        if o.name == "gone-victim" and o.phase == "rsync" and not terminated:
            terminated.append(victim.instance_id)
            raw.terminate_instances(InstanceIds=[victim.instance_id])
            deadline = time.monotonic() + 120
            while _state(raw, victim.instance_id) != "terminated":
                assert time.monotonic() < deadline, "the victim was never terminated"
                time.sleep(0.1)

    terminated: list[str] = []
    names = ("gone-a", "gone-victim", "gone-b")
    try:
        report = await backup.run_plan(m, plan, on_change=terminate_at_copy)
        assert terminated and report.as_dict()["failed"] == ["gone-victim"]
        gone = report.failed[0]
        assert gone.error_type == "ServerNotRunning"
        assert f"source server crash-victim ({victim.instance_id}) is terminated" in gone.error
        for o in report.outcomes:
            assert await leftovers(m, o.name) == NOTHING
        assert await _complete(m, "gone-victim") == []
        for ok in ("gone-a", "gone-b"):
            assert len(await _complete(m, ok)) == 1
        assert m.volumes() == []
    finally:
        for name in names:
            for sid in await _complete(m, name):
                await m.ec2.delete_snapshot(sid)


async def test_a_full_work_volume_is_a_typed_error_and_a_bigger_one_works(fleet: Fleet) -> None:
    m, host = fleet.manager, fleet.host
    # 1.2 GB of data (a sparse file on the server, copied whole) for a 1 GiB volume
    await host.scmd("sh", "-c", "mkdir -p /srv/big && truncate -s 1200M /srv/big/data", sudo=True)
    sources = ["crash-host:/srv/big"]
    try:
        with pytest.raises(RsyncError, match=r"work volume \(1 GiB\) is full .* bigger size"):
            await backup.backup(m, "crash-full", sources, server=host, size=1)
        assert await leftovers(m, "crash-full") == NOTHING
        assert m.volumes() == [] and await m.snapshots("crash-full") == []
        done = await backup.backup(m, "crash-full", sources, server=host, size=2)
        assert done.files == 1 and done.bytes == 1200 << 20 and done.size_gib == 2
        assert await leftovers(m, "crash-full") == NOTHING
    finally:
        await host.scmd("rm", "-rf", "/srv/big", sudo=True)
        for sid in await _complete(m, "crash-full"):
            await m.ec2.delete_snapshot(sid)


async def test_hostile_paths_in_a_plan_are_typed_errors_and_run_nothing(
    fleet: Fleet, tmp_path: Path
) -> None:
    m, host = fleet.manager, fleet.host
    mark = f"/tmp/hostile-{os.getpid()}"
    hostile = (
        f"--rsh=touch {mark}",
        f"$(touch {mark})",
        f"crash-host:--rsh=touch {mark}",
        f"crash-host:/srv; touch {mark}",
        f"crash-host:`touch {mark}`",
        "crash-host:/no/such/../../dir",
    )
    plan = backup.Plan(
        tuple(
            backup.PlannedBackup(f"hostile-{i}", (path,), server=host.name)
            for i, path in enumerate(hostile)
        ),
        concurrency=3,
    )
    report = await backup.run_plan(m, plan)
    assert [o.error_type for o in report.outcomes] == ["InvalidArgument"] * len(hostile)
    for o, path in zip(report.outcomes, hostile, strict=True):
        assert (
            "does not exist" if path.startswith(("-", "$")) else "missing or unreadable"
        ) in o.error
        assert await leftovers(m, o.name) == NOTHING
    assert not await anyio.Path(mark).exists()
    assert (await host.scmd("sh", "-c", f"test -e {mark} && echo there || true")).strip() == ""
    assert m.volumes() == []
