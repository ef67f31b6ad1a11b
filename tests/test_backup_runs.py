"""Backup runs that collide: two runs of one name at once; leases and run tags written by
someone else. (A controller SIGKILLed mid-run: tests/test_backup_faults.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup.lease import lease_name
from asyncstage.backup.runs import RunInfo
from asyncstage.ec2 import tag
from asyncstage.errors import BackupInProgress
from tests.backup_support import NOTHING, leftovers, manager_dropping

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

NAMES = ("twice", "stale", "foreign")


manager = manager_dropping(*NAMES)


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("backup-host")


def _tree(root: Path, files: int = 24) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:02}.bin").write_bytes(os.urandom(256 * 1024))
    return root


async def test_two_runs_of_one_name_never_interleave(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src = _tree(tmp_path / "src", files=8)
    holding = anyio.Event()
    results: dict[str, Any] = {}

    def phase(name: str) -> None:
        if name == "rsync":
            holding.set()

    async def first() -> None:
        results["first"] = await backup.backup(manager, "twice", [src], server=server, phase=phase)

    async def waiter() -> None:
        results["waiter"] = await backup.backup(manager, "twice", [src], server=server, wait=300)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await holding.wait()
        with pytest.raises(BackupInProgress, match="is being run by run") as refused:
            await backup.backup(manager, "twice", [src], server=server)
        tg.start_soon(waiter)

    one, two = results["first"], results["waiter"]
    assert refused.value.run_id == one.run_id
    assert two.previous_snapshot_id == one.snapshot_id and two.files == 0
    snaps = [s["SnapshotId"] for s in await manager.snapshots("twice")]
    assert snaps == [two.snapshot_id, one.snapshot_id]
    assert await leftovers(manager, "twice") == NOTHING


async def _group(m: Manager, name: str, tags: dict[str, str]) -> str:
    made = await m.ec2.call(
        "CreateSecurityGroup",
        GroupName=lease_name(name),
        Description="made by a test",
        TagSpecifications=[
            {
                "ResourceType": "security-group",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
        ],
    )
    return str(made["GroupId"])


async def test_an_expired_lease_is_broken_and_a_foreign_group_is_not(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src = _tree(tmp_path / "src", files=2)
    stale = RunInfo.new("stale", 60.0)
    expired = RunInfo(**{**stale.__dict__, "host": "elsewhere", "expires": int(time.time()) - 5})
    await _group(manager, "stale", {tag("role"): "backup-lease", **expired.tags()})
    done = await backup.backup(manager, "stale", [src], server=server)
    assert done.previous_snapshot_id is None
    assert await leftovers(manager, "stale") == NOTHING

    # a group of the lease's name that no run made (tags that do not parse): never broken
    foreign = await _group(manager, "foreign", {tag("backup-run"): "$(reboot)"})
    try:
        with pytest.raises(BackupInProgress, match="not a lease this library made"):
            await backup.backup(manager, "foreign", [src], server=server, wait=0)
        found = await manager.ec2.call("DescribeSecurityGroups", GroupIds=[foreign])
        assert found["SecurityGroups"][0]["GroupId"] == foreign
    finally:
        await manager.ec2.call("DeleteSecurityGroup", GroupId=foreign)
    assert manager.volumes() == []


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"backup-run": "not-hex"},
        {"backup-of": "../etc"},
        {"backup-controller": "host:0:1"},
        {"backup-controller": "bad host:12:1"},
        {"backup-controller": "host:12:$(id)"},
        {"backup-expires": "-1"},
        {"backup-expires": "9" * 40},
    ],
)
def test_run_tags_written_by_someone_else_are_validated(bad: dict[str, str]) -> None:
    good = RunInfo.new("ok", 60.0)
    assert RunInfo.from_tags(good.tags()) == good
    tags = {**good.tags(), **{tag(k): v for k, v in bad.items()}}
    if not bad:
        tags.pop(tag("backup-run"))
    assert RunInfo.from_tags(tags) is None


def test_a_dead_controller_on_this_host_is_seen_at_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    run = RunInfo.new("ok", 3600.0)
    gone = RunInfo(**{**run.__dict__, "pid": int(done.stdout)})
    assert gone.dead() and not run.dead()
    assert not RunInfo(**{**run.__dict__, "host": "elsewhere", "pid": 1}).dead()
    assert RunInfo(**{**run.__dict__, "expires": int(time.time()) - 1}).dead()
