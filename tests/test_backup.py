"""Backups and restores (asyncstage.backup) on the local cloud: what they write, what they
refuse, and what a failure or a cancellation leaves behind (nothing but earlier snapshots)."""

from __future__ import annotations

import contextlib
import filecmp
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server, Volume, backup, remote
from asyncstage.backup.manifest import DATA_TAG, MANIFEST_NAME, MANIFEST_TAG, data_bytes, data_tag
from asyncstage.backup.snapshots import CONSISTENCY_TAG, PARENT_TAG, STATE_TAG
from asyncstage.ec2 import tag, tag_filters
from asyncstage.errors import (
    DestinationNotEmpty,
    HookFailed,
    InvalidArgument,
    InvalidName,
    NameTaken,
    UnknownSnapshot,
)
from tests.fixtures.cloud import ManagerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]


@pytest.fixture
async def manager(manager_factory: ManagerFactory) -> AsyncIterator[Manager]:
    async with manager_factory() as m:
        yield m
        names = ("photos", "round", "broken", "cancelled", "follow", "follow-stopped", "quick")
        for name in names:
            for snap in await m.snapshots(name):
                await m.ec2.delete_snapshot(snap["SnapshotId"])


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("backup-host")


def _tree(root: Path, files: int = 6) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(files):
        (root / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * (i * 50 + 1))
    (root / "blob.bin").write_bytes(os.urandom(300_000))
    return root


async def _volumes_named(m: Manager, name: str) -> list[str]:
    """Ids of the volumes EC2 still has with this name tag (whoever made them)."""
    found = await m.ec2.describe_volumes(filters=tag_filters({tag("name"): name}))
    return [v["VolumeId"] for v in found if v.get("State") != "deleted"]


async def test_a_live_volume_of_the_backup_name_is_never_touched(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    """`backup --name photos` with a live volume `photos` is refused."""
    live = await server.provision_volume("photos", size=1)
    assert live.mtpt
    await server.scmd("sh", "-c", f"echo precious > {live.mtpt}/keep.txt", sudo=True)
    src = _tree(tmp_path / "src")

    with pytest.raises(NameTaken, match="a volume named 'photos' exists"):
        await backup.backup(manager, "photos", [src])

    assert manager.volumes() == [live] and live.mounted and live.server is server
    assert await server.scmd("cat", f"{live.mtpt}/keep.txt", sudo=True) == "precious\n"
    assert await _volumes_named(manager, "photos") == [live.volume_id]
    assert await manager.snapshots("photos") == []  # nothing was written under its name
    await live.delete()


async def test_round_trip_incremental_and_restore_rules(
    manager: Manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tree(tmp_path / "src")
    phases: list[str] = []
    first = await backup.backup(manager, "round", [src], phase=phases.append)
    assert phases == ["volume", "rsync", "manifest", "snapshot", "cleanup"]
    assert first.files == 7 and first.previous_snapshot_id is None
    assert manager.volumes() == [] and await _volumes_named(manager, "round") == []

    (src / "docs" / "f0.txt").unlink()
    (src / "new.txt").write_text("added\n")
    calls = _recorded_calls(manager, monkeypatch)
    second = await backup.backup(manager, "round", [str(src)])
    assert second.files == 1  # incremental: the volume came from the first snapshot
    # the manifest's digest is tagged in the create call; one more call marks it complete
    (made,) = [p for op, p in calls if op == "CreateSnapshot"]
    (specs,) = made["TagSpecifications"]
    assert {"Key": MANIFEST_TAG, "Value": second.manifest_sha256} in specs["Tags"]
    # and the bytes of the files it lists (what `backup list` shows as the backup's data)
    total = await anyio.to_thread.run_sync(_file_bytes, src)
    assert {"Key": DATA_TAG, "Value": str(total)} in specs["Tags"]
    tagged = [p for op, p in calls if op == "CreateTags" and second.snapshot_id in p["Resources"]]
    marked = {STATE_TAG, PARENT_TAG, CONSISTENCY_TAG}
    assert [{t["Key"] for t in p["Tags"]} for p in tagged] == [marked]
    # the work volume is detached while EC2 completes the snapshot, not after
    order = [
        op
        for op, p in calls
        if (op in ("DetachVolume", "DeleteVolume") and p["VolumeId"] == second.volume_id)
        or (op == "CreateTags" and second.snapshot_id in p["Resources"])
    ]
    assert order == ["DetachVolume", "CreateTags", "DeleteVolume"], order
    assert second.previous_snapshot_id == first.snapshot_id
    snaps = [s["SnapshotId"] for s in await manager.snapshots("round")]
    assert snaps == [second.snapshot_id, first.snapshot_id]
    assert await _volumes_named(manager, "round") == []

    dest = tmp_path / "restored"
    done = await backup.restore(manager, "round", dest)
    assert done.snapshot_id == second.snapshot_id
    copy = dest / str(src).lstrip("/")
    compare = filecmp.dircmp(src, copy)
    assert not (compare.left_only or compare.right_only or compare.diff_files)
    assert not (copy / "docs" / "f0.txt").exists()
    assert manager.volumes() == []  # the temporary volume is gone

    # an older snapshot, by id, merged into the now non-empty directory only when asked
    with pytest.raises(DestinationNotEmpty, match="not empty"):
        await backup.restore(manager, "round", dest, snapshot_id=first.snapshot_id)
    (copy / "new.txt").write_text("mine\n")
    await backup.restore(manager, "round", dest, snapshot_id=first.snapshot_id, overwrite=True)
    assert (copy / "docs" / "f0.txt").exists()  # from the first backup
    assert (copy / "new.txt").read_text() == "mine\n"  # merged: nothing deleted

    with pytest.raises(InvalidArgument, match="refusing to restore into /"):
        await backup.restore(manager, "round", "/", overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(InvalidArgument, match="home directory"):
        await backup.restore(manager, "round", "~", overwrite=True)
    with pytest.raises(UnknownSnapshot, match="no backup named 'nothing'"):
        await backup.restore(manager, "nothing", tmp_path / "other")
    assert manager.volumes() == []


def _recorded_calls(m: Manager, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The EC2 calls ``m`` makes from now on, with their parameters."""
    calls: list[tuple[str, Any]] = []
    original = m.ec2.call

    async def call(operation: str, /, **params: Any) -> Any:
        calls.append((operation, params))
        return await original(operation, **params)

    monkeypatch.setattr(m.ec2, "call", call)
    return calls


@pytest.mark.parametrize("name", ["../x", "a/b", "-x", "a b", "a\nb", "$(id)", "é", "x" * 129])
async def test_hostile_backup_names_are_refused(
    manager: Manager, tmp_path: Path, name: str
) -> None:
    rule = r"(?s)invalid backup name .*starts with a letter or a digit"
    with pytest.raises(InvalidName, match=rule):
        await backup.backup(manager, name, [tmp_path])
    with pytest.raises(InvalidName):
        await backup.restore(manager, name, tmp_path / "dest")
    assert manager.volumes() == [] and not (tmp_path / "dest").exists()


async def test_a_failing_backup_deletes_only_its_own_volume(
    manager: Manager, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tree(tmp_path / "src")
    other = await server.provision_volume("bystander", size=1)
    first = await backup.backup(manager, "broken", [src])

    async def snapshot_fails(self: Volume, description: str = "", *, wait: bool = False) -> str:
        raise RuntimeError("EBS is having a bad day")

    monkeypatch.setattr(Volume, "create_snapshot", snapshot_fails)
    (src / "late.txt").write_text("late\n")
    with pytest.raises(RuntimeError, match="bad day"):
        await backup.backup(manager, "broken", [src])

    assert manager.volumes() == [other] and other.mounted
    assert await _volumes_named(manager, "broken") == []
    assert [s["SnapshotId"] for s in await manager.snapshots("broken")] == [first.snapshot_id]
    await other.delete()


async def test_a_cancelled_backup_deletes_its_volume(manager: Manager, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    with anyio.CancelScope() as scope:

        def phase(name: str) -> None:
            if name == "rsync":
                scope.cancel()

        await backup.backup(manager, "cancelled", [src], phase=phase)
    assert scope.cancelled_caught
    assert manager.volumes() == [] and await _volumes_named(manager, "cancelled") == []
    assert await manager.snapshots("cancelled") == []


def _follow_pids(root: str) -> list[str]:
    """The processes of a follow pass over ``root`` (this machine sees the local cloud's
    instances' processes)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"follow" in argv and root.encode() in argv:
            found.append(pid)
    return found


# the same as a script: prints them; with "wait", waits until there is one (2 min at most)
_FOLLOWING = (
    "from __future__ import annotations\nimport os, sys, time\n"
    + inspect.getsource(_follow_pids)
    + """
if sys.argv[2:] == ["wait"]:
    for _ in range(1200):
        if _follow_pids(sys.argv[1]):
            sys.exit(0)
        time.sleep(0.1)
    sys.exit(1)
print(*_follow_pids(sys.argv[1]))
"""
)


async def _following(server: Server, root: str) -> list[str]:
    """The processes of a follow pass over ``root`` on ``server`` (with its sudo)."""
    return (await server.scmd("python3", "-c", _FOLLOWING, root)).split()


async def test_files_copied_early_are_hashed_while_the_copy_goes_on(
    manager: Manager, server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first host's files land (server to server), then the second host's ``pre``
    hook holds the copy a while: the follow pass hashes the files there meanwhile and the
    final pass reads only what came later. What it writes is, byte for byte, the manifest
    a plain pass writes; a rerun still hashes only what changed."""
    src = await manager.get_server("follow-src")
    fill = "for i in $(seq 30); do head -c 20000 /dev/urandom > /srv/early/f$i; done"
    await src.scmd("sh", "-c", f"mkdir -p /srv/early && {fill}", sudo=True)
    late = _tree(tmp_path / "late")
    late_bytes = sum(p.stat().st_size for p in late.rglob("*") if p.is_file())
    # the hook (on this machine, which sees the server's processes) holds the copy until the
    # follow pass runs, then leaves it several of its walks' time
    wait = tmp_path / "following.py"
    wait.write_text(_FOLLOWING)
    root = server.default_mtpt("follow")
    hold = backup.Hook(f"python3 {wait} {root} wait && sleep 3", timeout=180)
    sources = ["follow-src:/srv/early", backup.Hooked(str(late), pre=hold)]

    with caplog.at_level(logging.DEBUG, logger="asyncstage.backup"):
        first = await backup.backup(manager, "follow", sources, server=server)
    assert [r for r in caplog.records if "follow pass on" in r.getMessage()]  # held: it ran
    assert first.files == 37 and first.route == "host->host,local->host"
    assert first.manifest_followed >= 30 and first.manifest_hashed <= late_bytes

    await src.scmd("sh", "-c", "head -c 20000 /dev/urandom > /srv/early/f7", sudo=True)
    second = await backup.backup(manager, "follow", sources, server=server)
    assert (second.manifest_reused, second.manifest_followed, second.manifest_hashed) == (
        36,
        1,
        0,
    )
    async with backup.snapshot_volume(manager, "follow", server=server) as vol:
        assert vol.mtpt
        top = (await server.scmd("ls", "-A", vol.mtpt, sudo=True)).split()
        assert MANIFEST_NAME in top
        assert not [n for n in top if n.startswith(MANIFEST_NAME + ".")]  # no provisional
        plain = await remote.run_json(server.host, True, "manifest", "write", vol.mtpt)
    assert plain["hashed"] == plain["bytes"] and plain["sha256"] == second.manifest_sha256


def _watch_for_follow_passes(root: str, stop: threading.Event, seen: set[str]) -> None:
    """Until ``stop``: every process of a follow pass over ``root`` (this machine sees
    the local cloud's instances' processes), looked for every few ms."""
    while not stop.is_set():
        seen.update(_follow_pids(root))
        time.sleep(0.002)


async def test_a_copy_over_within_a_second_starts_no_follow_pass(
    manager: Manager, server: Server
) -> None:
    """A copy that ends before the follow pass is due (a rerun's few files) leaves what it
    wrote to the final pass: no helper is started beside it."""
    await server.scmd("sh", "-c", "mkdir -p /srv/quick && echo a > /srv/quick/a", sudo=True)
    stop, seen = threading.Event(), set[str]()
    root = server.default_mtpt("quick")
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(anyio.to_thread.run_sync, _watch_for_follow_passes, root, stop, seen))
        try:
            done = await backup.backup(manager, "quick", [f"{server.name}:/srv/quick"])
        finally:
            stop.set()
    assert seen == set()
    assert done.files == 1 and done.manifest_followed == 0 and done.manifest_hashed == 2
    assert manager.volumes() == []


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
async def test_a_copy_cancelled_or_failed_stops_its_follow_pass(
    manager: Manager, server: Server, tmp_path: Path, ending: str
) -> None:
    await server.scmd("sh", "-c", "mkdir -p /srv/held && echo early > /srv/held/a", sudo=True)
    late = _tree(tmp_path / "late")
    go = tmp_path / "go"
    # the follow pass starts with the first host's rsync; the second's hook holds the copy
    held = backup.Hook(f"while [ ! -e {go} ]; do sleep 0.05; done; exit 3", timeout=120)
    sources = [f"{server.name}:/srv/held", backup.Hooked(str(late), pre=held)]
    root = server.default_mtpt("follow-stopped")
    scope = anyio.CancelScope()

    async def end_the_copy_once_followed() -> None:
        with anyio.fail_after(120):
            while not await _following(server, root):  # noqa: ASYNC110 (a remote process)
                await anyio.sleep(0.1)
        if ending == "cancelled":
            scope.cancel()
        else:
            go.touch()  # the hook fails: so does the backup

    failing = pytest.raises(HookFailed) if ending == "failed" else contextlib.nullcontext()
    async with anyio.create_task_group() as tg:
        tg.start_soon(end_the_copy_once_followed)
        with scope, failing:
            await backup.backup(manager, "follow-stopped", sources, server=server)
    assert scope.cancelled_caught == (ending == "cancelled")
    assert await _following(server, root) == []
    assert manager.volumes() == [] and await _volumes_named(manager, "follow-stopped") == []
    assert await manager.snapshots("follow-stopped") == []


def _file_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def test_the_data_tag_is_read_only_as_a_plain_count() -> None:
    def snap(value: str) -> dict[str, Any]:
        return {"Tags": [{"Key": DATA_TAG, "Value": value}]}

    assert data_bytes(snap("1234")) == 1234 and data_bytes({"Tags": []}) is None
    for hostile in ("", "-1", "12abc", "1e9", "²", "9" * 20, " 12", "0x10"):
        assert data_bytes(snap(hostile)) is None, hostile
    assert data_tag({"bytes": 5}) == {DATA_TAG: "5"}
    assert data_tag({"bytes": True}) == data_tag({"bytes": -1}) == data_tag({}) == {}


def test_destination_rules_need_no_cloud(tmp_path: Path) -> None:
    assert backup.check_destination(tmp_path / "new") == str(tmp_path / "new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DestinationNotEmpty):
        backup.check_destination(tmp_path / "full")
    assert backup.check_destination(tmp_path / "full", overwrite=True)
    with pytest.raises(InvalidArgument, match="not a directory"):
        backup.check_destination(tmp_path / "full" / "x", overwrite=True)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(InvalidArgument, match="into /"):
        backup.check_destination(tmp_path / "link", overwrite=True)
    assert backup.size_for(0) == 1 and backup.size_for(2 << 30) == 4
