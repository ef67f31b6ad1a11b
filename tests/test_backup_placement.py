"""Where a copy-mode backup makes its work volume when no server is named: on the
server its sources are on, so that a fleet's backups each copy on their own server
instead of all sending their data over ssh into one."""

from __future__ import annotations

import pytest

from asyncstage import Manager, backup
from asyncstage.backup.copy import _sole_source_server
from asyncstage.backup.sources import plan_sources
from tests.backup_support import NOTHING, leftovers, manager_dropping

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

manager = manager_dropping("place-a", "place-b")


async def test_each_backup_copies_on_its_own_server(manager: Manager) -> None:
    servers = await manager.provision_servers(["place-a", "place-b"])
    for s in servers:
        await s.scmd("sh", "-c", f"mkdir -p /srv/app && echo {s.name} > /srv/app/id", sudo=True)
    plan = [backup.PlannedBackup(s.name, (f"{s.name}:/srv/app",)) for s in servers]
    report = await backup.run_plan(manager, plan)
    assert report.ok, report.as_dict()
    # rsync ran on the source server itself: the work volume was attached there
    assert [o.result["route"] for o in report.outcomes] == ["same-host", "same-host"]
    for s in servers:
        async with backup.snapshot_volume(manager, s.name, server=s) as vol:
            got = await s.scmd("cat", f"{vol.mtpt}/{s.name}/srv/app/id", sudo=True)
        assert got == f"{s.name}\n"
        assert await leftovers(manager, s.name) == NOTHING


async def test_work_volume_stays_off_a_source_that_would_hold_it(manager: Manager) -> None:
    a, _ = await manager.provision_servers(["place-a", "place-b"])
    zone = a.availability_zone

    def placed(sources: list[str], in_zone: str | None = None) -> str | None:
        found = _sole_source_server(plan_sources(manager, sources), in_zone, "place-a")
        return None if found is None else found.name

    assert placed(["place-a:/srv/app", "place-a:/etc/app"]) == "place-a"
    assert placed(["place-b:/srv/app"], zone) == "place-b"
    assert placed(["place-b:/srv/app"], "elsewhere-1z") is None
    assert placed(["place-a:/srv", "place-b:/srv"]) is None  # two hosts: any server
    # a source above the work volume's mount point (/mnt/Staging/NAME) would copy the
    # backup into itself: the volume goes to another server
    for above in ("/", "/mnt", "/mnt/", "/mnt/Staging", "/mnt/./Staging/"):
        assert placed([f"place-a:{above}"]) is None, above
    assert placed(["place-a:/mnt/other"]) == "place-a"
