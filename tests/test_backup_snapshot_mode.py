"""``snapshot`` mode: a server's own data volumes at one instant (CreateSnapshots), proven
by a writer that writes to two volumes in a known order while the set is taken; a set
restored whole, into directories and onto new volumes."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup import Hook
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import HookFailed, InvalidArgument, InvalidName
from tests.backup_support import NOTHING, leftovers, manager_dropping

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

NAME = "inplace"


manager = manager_dropping(NAME)


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.provision_server("inplace-host")


async def _count(server: Server, path: str) -> int:
    """The number in ``path`` (0 while the file is not there yet)."""
    text = await server.scmd("sh", "-c", f"cat {path} 2>/dev/null || true", sudo=True)
    return int(text.strip() or 0)


async def test_one_instant_for_all_volumes_of_a_server(manager: Manager, server: Server) -> None:
    first = await server.provision_volume("inplace-a", size=1)
    second = await server.provision_volume("inplace-b", size=1)
    a, b = f"{first.mtpt}/counter", f"{second.mtpt}/counter"
    # each number reaches the first volume's disk before the second's. Each file is replaced
    # whole (written aside, fsynced, renamed, its directory fsynced), as a crash-safe program
    # writes: an instant caught between a truncate and its write would show an empty file.
    step = "echo $i > {f}.new; sync {f}.new; mv {f}.new {f}; sync {d}"
    writer = (
        "i=0; while :; do i=$((i+1)); "
        + step.format(f=a, d=first.mtpt)
        + "; "
        + step.format(f=b, d=second.mtpt)
        + "; done"
    )
    pid = (
        await server.scmd(
            "sh", "-c", f"setsid sh -c '{writer}' >/dev/null 2>&1 & echo $!", sudo=True
        )
    ).strip()
    try:
        with anyio.fail_after(60):
            while await _count(server, b) < 20:  # noqa: ASYNC110 - a count on the server
                await anyio.sleep(0.1)
        done = await backup.snapshot_backup(manager, NAME, server)
        assert set(done.snapshots) == {first.volume_id, second.volume_id}
        assert done.consistency == "crash-consistent"
        running = await _count(server, b)
    finally:
        await server.scmd("kill", pid, sudo=True)

    seen: dict[str, int] = {}
    for volume in (first, second):
        snap = done.snapshots[volume.volume_id]
        async with backup.snapshot_volume(manager, NAME, snapshot_id=snap, server=server) as v:
            seen[volume.name] = await _count(server, f"{v.mtpt}/counter")
    # one instant: the second volume is never ahead of the first, and at most one behind
    assert seen["inplace-b"] <= seen["inplace-a"] <= seen["inplace-b"] + 1, seen
    assert 20 <= seen["inplace-b"] <= running
    for snap in await manager.snapshots(NAME):
        tags = tags_of(snap)
        assert tags[tag("backup-state")] == "complete"
        assert tags[tag("backup-consistency")] == "crash-consistent"
        assert tags[tag("backup-set-size")] == "2"
    assert await leftovers(manager, NAME) == NOTHING
    await first.delete()
    await second.delete()


async def test_snapshot_mode_hooks_run_on_the_server(manager: Manager, server: Server) -> None:
    volume = await server.provision_volume("inplace-c", size=1)
    log = "/root/inplace-hooks.log"
    done = await backup.snapshot_backup(
        manager,
        NAME,
        server,
        pre=Hook(f"echo pre >> {log}"),
        post=Hook(f"echo post >> {log}"),
    )
    assert done.consistency == "application-consistent"
    with pytest.raises(HookFailed, match="pre hook on inplace-host failed"):
        await backup.snapshot_backup(
            manager, NAME, server, pre=Hook("exit 4"), post=Hook(f"echo post >> {log}")
        )
    assert (await server.scmd("cat", log, sudo=True)).split() == ["pre", "post", "post"]
    assert len(await manager.snapshots(NAME)) == 1  # the failed run made none
    await volume.delete()


async def test_a_set_restores_whole_into_directories_and_onto_volumes(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    made = [await server.provision_volume(n, size=1) for n in ("inplace-d", "inplace-e")]
    for volume in made:
        await server.scmd("sh", "-c", f"echo {volume.name} > {volume.mtpt}/which", sudo=True)
    done = await backup.snapshot_backup(manager, NAME, server)
    for volume in made:  # changed after the set was taken: never seen in a restore
        await server.scmd("sh", "-c", f"echo later > {volume.mtpt}/which", sudo=True)

    restored = await backup.restore(manager, NAME, tmp_path / "back")
    assert restored.snapshots == {done.snapshots[v.volume_id]: v.name for v in made}
    for volume in made:
        assert (tmp_path / "back" / volume.name / "which").read_text() == f"{volume.name}\n"
    one = await backup.restore(
        manager, NAME, tmp_path / "one", snapshot_id=done.snapshots[made[0].volume_id]
    )
    assert one.snapshots == {} and (tmp_path / "one" / "which").read_text() == "inplace-d\n"

    copies = await backup.restore_volumes(manager, NAME, server)
    try:
        assert {sid: v.name for sid, v in copies.items()} == {
            done.snapshots[v.volume_id]: f"{v.name}-restored" for v in made
        }
        for sid, copy in copies.items():
            text = await server.scmd("cat", f"{copy.mtpt}/which", sudo=True)
            assert text.strip() == restored.snapshots[sid]
        with pytest.raises(InvalidArgument, match=r"only \{volume\} is known"):
            await backup.restore_volumes(manager, NAME, server, name_template="{disk}")
        with pytest.raises(InvalidName):
            await backup.restore_volumes(manager, NAME, server, name_template="../{volume}")
    finally:
        for volume in [*copies.values(), *made]:
            await volume.delete()
    assert manager.volumes() == []
    assert await leftovers(manager, NAME) == NOTHING
