"""``asyncstage backup forget`` as a user runs it, on the session's local cloud: every
decision printed, ``--json``, and a run killed midway (SIGKILL) then run again, losing
nothing the rules keep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from asyncstage import Manager
from asyncstage.localcloud import LocalCloud
from tests.backup_support import backup_history, cli_command
from tests.fixtures.cloud import ManagerFactory
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]


async def _history(cloud: LocalCloud, m: Manager, name: str, count: int) -> list[str]:
    """``count`` complete backups of ``name`` an hour apart, oldest first."""
    with playing(cloud, snapshot=(0.0, 0.0), snapshot_interval=0.0):
        made = await backup_history(m, name, count, f"{cloud.region}a")
    now = datetime.now(UTC)
    for hours, snapshot_id in enumerate(reversed(made)):
        cloud.set_snapshot_start_time(snapshot_id, now - timedelta(hours=hours))
    return made


def _killed_after_first_removal(argv: list[str], env: dict[str, str]) -> list[str]:
    """The lines ``argv`` printed until its first deletion, when it is SIGKILLed."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if ": removed " in line:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    return lines


async def test_forget_prints_every_decision_and_a_killed_run_loses_nothing(
    cloud: LocalCloud, manager_factory: ManagerFactory, cloud_dotdir: Path
) -> None:
    name = "keep-cli"
    async with manager_factory() as m:
        made = await _history(cloud, m, name, 12)
        try:
            argv, env = cli_command(
                cloud, cloud_dotdir, "backup", "forget", name, "--keep-last", "3"
            )
            with anyio.fail_after(120):
                dry = await anyio.run_process([*argv, "--dry-run", "--json"], env=env)
            decided = json.loads(dry.stdout)["backups"][name]
            keep = {d["snapshot_id"] for d in decided if d["keep"]}
            assert keep == set(made[-3:]) and not any(d["removed"] for d in decided)
            assert decided[0]["reasons"] == ["newest completed snapshot", "last snapshot"]
            assert len(await m.snapshots(name)) == 12

            # killed after its first deletion (SIGKILL: no cleanup of any kind)
            lines = await anyio.to_thread.run_sync(_killed_after_first_removal, argv, env)
            assert sum(line.startswith(f"{name}: keep") for line in lines) == 3
            assert sum(line.startswith(f"{name}: remove ") for line in lines) == 9
            left = {s["SnapshotId"] for s in await m.snapshots(name)}
            assert keep <= left and len(left) < 12

            with anyio.fail_after(120):
                again = await anyio.run_process([*argv, "--json"], env=env)
            removed = {
                d["snapshot_id"] for d in json.loads(again.stdout)["backups"][name] if d["removed"]
            }
            assert removed == left - keep
            assert {s["SnapshotId"] for s in await m.snapshots(name)} == keep
        finally:
            for snap in await m.snapshots(name):
                await m.ec2.delete_snapshot(snap["SnapshotId"])
