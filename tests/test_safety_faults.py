"""Faults from outside: mounts changed behind the manager's back, servers restarted,
provisions cancelled at any moment, resources deleted by somebody else.

Each test asserts a clear typed error (or a correct result) and that no data was lost.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server, Volume
from asyncstage.ec2 import EC2, tag, tag_filters
from asyncstage.errors import EC2Error, VolumeInUse, VolumeNotMounted
from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.shared_server import shared_server

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

FILES = {"a.txt": "alpha\n", "sub/b.txt": "beta\n", "sub/deeper/c.bin": "gamma" * 1000}


# the first tests share one server: each puts its mounts back and deletes its volume
manager, server = shared_server("fault-host")


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """A local directory with files a --delete against an empty source would remove."""
    root = tmp_path / "dst"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


async def _fill(volume: Volume, files: dict[str, str], tmp: Path) -> None:
    src = tmp / f"fill-{secrets.token_hex(3)}"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    await volume.manager.rsync(f"{src}/", volume / "")
    shutil.rmtree(src)


async def _raw_ec2(cloud: LocalCloud) -> EC2:
    """An EC2 client of our own, as another party with access to the account has."""
    kw = cloud.session_kwargs()
    return await EC2(
        region=cloud.region,
        endpoint_url=cloud.endpoint_url,
        aws_access_key_id=kw["aws_access_key_id"],
        aws_secret_access_key=kw["aws_secret_access_key"],
    ).open()


# -- a volume unmounted behind the manager's back ------------------------------------------


async def test_unmounted_behind_its_back_then_rsync_delete_mounts_it_again(
    server: Server, local: Path, tmp_path: Path
) -> None:
    vol = await server.provision_volume("fault-unmounted", size=1)
    await _fill(vol, {"on-volume.txt": "keep me\n", "dir/x": "x\n"}, tmp_path)
    assert vol.mtpt and vol.mounted
    await server.scmd("umount", vol.mtpt, sudo=True)  # an admin, a reboot, another tool
    assert vol.mounted  # the manager has not noticed
    stats = await server.manager.rsync(f"{vol}/", f"{local}/", delete=True)
    # it was mounted again before rsync ran: the copy is the volume's contents, not nothing
    assert _tree(local) == {"on-volume.txt": "keep me\n", "dir/x": "x\n"}
    assert stats.files >= 2
    assert vol.mounted and vol.mtpt in await server.scmd("findmnt", "-rn", "-o", "TARGET")
    # the other way: nothing deleted from the volume by a push into an unmounted mount point
    await server.scmd("umount", vol.mtpt, sudo=True)
    await server.manager.rsync(f"{local}/", vol / "", delete=True)
    assert sorted((await vol.ls("-A")).split()) == ["dir", "lost+found", "on-volume.txt"]
    await vol.delete()


async def test_something_else_mounted_there_is_refused_and_nothing_copied(
    server: Server, local: Path, tmp_path: Path
) -> None:
    vol = await server.provision_volume("fault-shadowed", size=1)
    await _fill(vol, {"real.txt": "real\n"}, tmp_path)
    assert vol.mtpt
    await server.scmd("umount", vol.mtpt, sudo=True)
    # another filesystem in its place, with a file a wrong copy would bring back
    await server.scmd("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", vol.mtpt, sudo=True)
    await server.scmd("sh", "-c", f"echo impostor > {vol.mtpt}/impostor.txt", sudo=True)
    before = _tree(local)
    try:
        with pytest.raises((VolumeNotMounted, VolumeInUse)):
            await server.manager.rsync(f"{vol}/", f"{local}/", delete=True)
        assert _tree(local) == before
        with pytest.raises((VolumeNotMounted, VolumeInUse)):
            await server.manager.rsync(f"{local}/", vol / "", delete=True)
        with pytest.raises((VolumeNotMounted, VolumeInUse)):
            await vol.rm("-rf", "impostor.txt")
        with pytest.raises((VolumeNotMounted, VolumeInUse)):
            await vol.put(f"{local}/", dest="x")
        # the impostor filesystem was not touched either
        listing = await server.scmd("ls", "-A", vol.mtpt, sudo=True)
        assert listing.split() == ["impostor.txt"]
    finally:
        await server.scmd("umount", vol.mtpt, sudo=True)
    # once the mount point is free again it is mounted again and its data is intact
    assert "real.txt" in await vol.ls()
    await vol.delete()


async def test_the_volume_mounted_elsewhere_is_refused(
    server: Server, local: Path, tmp_path: Path
) -> None:
    vol = await server.provision_volume("fault-moved", size=1)
    await _fill(vol, {"moved.txt": "moved\n"}, tmp_path)
    assert vol.mtpt and vol.mtdev
    await server.scmd("umount", vol.mtpt, sudo=True)
    await server.scmd("mkdir", "-p", "/srv/moved", sudo=True)
    await server.scmd("mount", vol.mtdev, "/srv/moved", sudo=True)
    before = _tree(local)
    try:
        with pytest.raises((VolumeInUse, VolumeNotMounted)):
            await server.manager.rsync(f"{vol}/", f"{local}/", delete=True)
        assert _tree(local) == before
        with pytest.raises((VolumeInUse, VolumeNotMounted)):
            await vol.ls()
    finally:
        await server.scmd("umount", "/srv/moved", sudo=True)
    assert "moved.txt" in await vol.ls()
    await vol.delete()


async def test_a_volume_unmounted_behind_its_back_is_mounted_for_file_commands(
    server: Server, tmp_path: Path
) -> None:
    vol = await server.provision_volume("fault-filecmds", size=1)
    await _fill(vol, {"f.txt": "f\n"}, tmp_path)
    assert vol.mtpt
    await server.scmd("umount", vol.mtpt, sudo=True)
    assert "f.txt" in await vol.ls()
    await server.scmd("umount", vol.mtpt, sudo=True)
    await vol.mkdir("made")
    assert "made" in await server.scmd("ls", vol.mtpt, sudo=True)
    await vol.delete()


# -- a server stopped and started between operations -------------------------------------------


async def test_a_server_stopped_and_started_between_operations(
    manager: Manager, server: Server, cloud: LocalCloud, local: Path, tmp_path: Path
) -> None:
    vol = await server.provision_volume("fault-restart", size=1)
    await _fill(vol, {"before.txt": "before restart\n"}, tmp_path)
    raw = await _raw_ec2(cloud)
    try:
        # somebody else stops and starts it: the manager's address, mounts and device are stale
        await raw.stop_instances([server.instance_id])
        await raw.wait_for_instance(server.instance_id, "stopped", timeout=120)
        await raw.start_instances([server.instance_id])
        await raw.wait_for_instance(server.instance_id, "running", timeout=120)
    finally:
        await raw.close()
    await manager.rsync(f"{vol}/", f"{local}/", delete=True)
    assert _tree(local) == {"before.txt": "before restart\n"}
    await manager.rsync(f"{local}/", vol / "again/")
    assert "before.txt" in await vol.ls("again")
    assert vol.mounted and vol.server is server
    await vol.delete()


async def test_scan_takes_mount_state_from_the_server(
    manager_factory: ManagerFactory, local: Path, tmp_path: Path
) -> None:
    async with manager_factory(on_exit="run") as first:
        host = await first.get_server("fault-scan")
        vol = await host.provision_volume("fault-scan-vol", size=1)
        await _fill(vol, {"scanned.txt": "s\n"}, tmp_path)
        assert vol.mtpt
        await host.scmd("umount", vol.mtpt, sudo=True)  # the tags still say it is mounted
    async with manager_factory(on_exit="terminate", scan=True) as second:
        again = second.find_volume_by_name("fault-scan-vol")
        assert again is not None and not again.mounted
        await second.rsync(f"{again}/", f"{local}/", delete=True)
        assert _tree(local) == {"scanned.txt": "s\n"}
        assert again.mounted and again.server is not None
        adopted = again.server
        await again.delete()
        await second.terminate_servers([adopted])


async def test_an_attach_that_lands_after_its_failure_is_undone(
    server: Server, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AttachVolume that failed (EC2's InternalError, or no answer at all) may still
    attach the volume after the clean-up has looked at it: the clean-up's delete, refused
    because the volume is attached, detaches it and deletes it."""
    ec2, raw = server.manager.ec2, await _raw_ec2(cloud)
    in_flight: list[tuple[str, str, str]] = []
    real_describe = ec2.describe_volumes

    async def answer_lost(volume_id: str, instance_id: str, device: str) -> None:
        in_flight.append((volume_id, instance_id, device))
        raise EC2Error("AttachVolume failed: an internal error", code="InternalError")

    async def lands_after_the_look(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        found = await real_describe(*args, **kwargs)
        while in_flight:
            await raw.attach_volume(*in_flight.pop())
        return found

    monkeypatch.setattr(ec2, "attach_volume", answer_lost)
    monkeypatch.setattr(ec2, "describe_volumes", lands_after_the_look)
    name = f"fault-late-attach-{secrets.token_hex(3)}"
    try:
        with pytest.raises(EC2Error, match="an internal error"):
            await server.provision_volume(name, size=1)
        monkeypatch.undo()
        assert in_flight == []  # the attach did land
        vols = await raw.describe_volumes(filters=tag_filters({tag("name"): name}))
        assert [v["VolumeId"] for v in vols if v["State"] not in ("deleting", "deleted")] == []
    finally:
        await raw.close()
    assert server.manager.find_volume_by_name(name) is None


async def test_a_mount_whose_attach_got_no_answer_leaves_the_volume_as_it_was(
    server: Server, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AttachVolume that got no answer (the connection lost, a cancel) but that EC2
    carried out is undone: the volume is detached again, and mounts later as ever."""
    ec2, raw = server.manager.ec2, await _raw_ec2(cloud)
    vol = await server.provision_volume(f"fault-unanswered-{secrets.token_hex(3)}", size=1)
    try:
        await vol.detach()

        async def carried_out_unanswered(volume_id: str, instance_id: str, device: str) -> None:
            await raw.attach_volume(volume_id, instance_id, device)
            raise EC2Error("AttachVolume failed: connection reset")  # no code: no answer

        monkeypatch.setattr(ec2, "attach_volume", carried_out_unanswered)
        with pytest.raises(EC2Error, match="connection reset"):
            await vol.mount(server)
        monkeypatch.undo()
        (desc,) = await raw.describe_volumes([vol.volume_id])
        assert desc["State"] == "available" and not desc.get("Attachments")
        assert vol.server is None
        await vol.mount(server)
        assert vol.mounted and vol.server is server
    finally:
        await vol.delete()
        await raw.close()


async def test_an_attachment_from_before_an_unanswered_attach_stays(
    server: Server, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an attachment made since the unanswered call is undone: one that was there
    before it (another party's, unknown to the manager) stays."""
    ec2, raw = server.manager.ec2, await _raw_ec2(cloud)
    vol = await server.provision_volume(f"fault-theirs-{secrets.token_hex(3)}", size=1)
    try:
        await vol.detach()
        await raw.attach_volume(vol.volume_id, server.instance_id, "/dev/sdy")
        await anyio.sleep(4)  # well beyond the slack allowed for EC2's clock

        async def unanswered(volume_id: str, instance_id: str, device: str) -> None:
            raise EC2Error("AttachVolume failed: connection reset")

        monkeypatch.setattr(ec2, "attach_volume", unanswered)
        with pytest.raises(EC2Error, match="connection reset"):
            await vol.mount(server)
        monkeypatch.undo()
        (desc,) = await raw.describe_volumes([vol.volume_id])
        assert [a["InstanceId"] for a in desc["Attachments"]] == [server.instance_id]
    finally:
        await raw.detach_volume(vol.volume_id)
        await raw.wait_for_volume(
            vol.volume_id, lambda v: v.get("State") == "available", what="detached", timeout=60
        )
        await vol.delete()
        await raw.close()


# -- provisions cancelled at 20 points in time ---------------------------------------------------


Run = Callable[[str, "float | None"], Awaitable["tuple[bool, float]"]]


async def _cancelled_at_20_points(
    run: Run, left_behind: Callable[[str], Awaitable[list[str]]]
) -> None:
    """Time one provision, then cancel it at 20 points spread over that time.

    ``run(name, deadline)`` opens a manager, runs the provision under
    ``anyio.move_on_after(deadline)`` (no deadline: not cancelled), closes the
    manager and says whether the provision completed and how long it took. After
    each cancelled run ``left_behind(name)`` must find nothing.
    """
    durations = []
    for _ in range(2):  # the first run warms caches (image, key pair): the second is typical
        completed, took = await run(f"cancel-{secrets.token_hex(3)}-timing", None)
        assert completed
        durations.append(took)
    duration = min(durations)
    cancelled = 0
    for i in range(20):
        name = f"cancel-{secrets.token_hex(3)}-{i}"
        completed, _ = await run(name, duration * (i + 0.5) / 20)
        if not completed:
            cancelled += 1
            assert await left_behind(name) == [], f"left behind after a cancel at point {i}"
    # most points fall inside the operation; on the realistic profile each run's own random
    # delays (console, consistency, device) make it shorter or longer than the timed one
    assert cancelled >= 10


async def test_provision_volume_cancelled_at_20_points_leaves_no_volume(
    manager_factory: ManagerFactory, cloud: LocalCloud
) -> None:
    raw = await _raw_ec2(cloud)
    made: list[str] = []
    async with manager_factory(on_exit="terminate") as host_manager:
        host = await host_manager.get_server("cancel-vol-host")

        async def run(name: str, deadline: float | None) -> tuple[bool, float]:
            # a manager of its own that leaves everything running on exit: only the
            # provision's own clean-up may remove what it made. It adopts the one host
            # from EC2's description (what a scan does for each server), not the region:
            # a scan per point would read every server the session's other tests left up
            done = False
            async with manager_factory(on_exit="run") as m:
                (described,) = await m.ec2.describe_instances([host.instance_id])
                server = m.fleet.adopt(described)
                assert server.name == "cancel-vol-host"
                started = time.monotonic()
                with anyio.move_on_after(deadline if deadline is not None else 600):
                    await server.provision_volume(name, size=1)
                    done = True
                    made.append(name)
                elapsed = time.monotonic() - started
            return done, elapsed

        async def left_behind(name: str) -> list[str]:
            vols = await raw.describe_volumes(filters=tag_filters({tag("name"): name}))
            live = [v["VolumeId"] for v in vols if v.get("State") not in ("deleting", "deleted")]
            mounted = await host.scmd("findmnt", "-rn", "-o", "TARGET")
            return live + [line for line in mounted.splitlines() if name in line]

        try:
            await _cancelled_at_20_points(run, left_behind)
        finally:
            async with manager_factory(on_exit="run", scan=True) as m:
                for name in made:
                    again = m.find_volume_by_name(name)
                    if again is not None:
                        await again.delete()
            await raw.close()


async def test_provision_server_cancelled_at_20_points_leaves_no_instance(
    manager_factory: ManagerFactory, cloud: LocalCloud
) -> None:
    raw = await _raw_ec2(cloud)
    made: list[str] = []

    async def run(name: str, deadline: float | None) -> tuple[bool, float]:
        # on_exit="stop" would only stop a finished server: a cancelled one must go
        done = False
        async with manager_factory(on_exit="stop") as m:
            started = time.monotonic()
            with anyio.move_on_after(deadline if deadline is not None else 600):
                made.append((await m.provision_server(name)).instance_id)
                done = True
            elapsed = time.monotonic() - started
        return done, elapsed

    async def left_behind(name: str) -> list[str]:
        found = await raw.describe_instances(filters=tag_filters({tag("name"): name}))
        return [
            i["InstanceId"]
            for i in found
            if i.get("State", {}).get("Name") not in ("shutting-down", "terminated")
        ]

    try:
        await _cancelled_at_20_points(run, left_behind)
    finally:
        if made:
            await raw.terminate_instances(made)
        await raw.close()


# -- resources deleted by somebody else before the manager closes --------------------------------


async def test_closing_copes_with_resources_gone_elsewhere(
    manager_factory: ManagerFactory, cloud: LocalCloud, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await _raw_ec2(cloud)
    caplog.set_level(logging.WARNING, logger="asyncstage")
    try:
        async with manager_factory(on_exit="terminate") as m:
            a, b = await m.provision_servers(["gone-a", "gone-b"])
            gone_vol = await a.provision_volume("gone-vol", size=1)
            kept_vol = await b.provision_volume("gone-kept", size=1)
            snap = await gone_vol.create_snapshot(wait=True)
            detached = await b.provision_volume("gone-detached", size=1)
            await detached.detach()
            # somebody else deletes a volume, a detached volume, a snapshot and a server
            assert gone_vol.mtpt
            await a.scmd("umount", gone_vol.mtpt, sudo=True)
            await raw.detach_volume(gone_vol.volume_id, force=True)
            await raw.wait_for_volume(
                gone_vol.volume_id,
                lambda v: v.get("State") == "available",
                what="detach",
                timeout=60,
            )
            await raw.delete_volume(gone_vol.volume_id)
            await raw.delete_volume(detached.volume_id)
            await raw.delete_snapshot(snap)
            await raw.terminate_instances([a.instance_id])
            ids = [a.instance_id, b.instance_id]
            vol_ids = [gone_vol.volume_id, kept_vol.volume_id, detached.volume_id]
        # the clean-up went on past what was already gone: b and its volume are gone too
        insts = await raw.describe_instances(ids)
        assert {i["State"]["Name"] for i in insts} <= {"shutting-down", "terminated"}
        vols = await raw.describe_volumes(vol_ids)
        assert [v for v in vols if v.get("State") not in ("deleting", "deleted")] == []
        warned = "\n".join(r.getMessage() for r in caplog.records)
        assert gone_vol.volume_id in warned and detached.volume_id in warned
    finally:
        await raw.close()


async def test_closing_with_stop_copes_with_a_server_terminated_elsewhere(
    manager_factory: ManagerFactory, cloud: LocalCloud
) -> None:
    raw = await _raw_ec2(cloud)
    try:
        async with manager_factory(on_exit="stop") as m:
            a, b = await m.provision_servers(["stopgone-a", "stopgone-b"])
            await raw.terminate_instances([a.instance_id])
        (desc,) = await raw.describe_instances([b.instance_id])
        assert desc["State"]["Name"] == "stopped"
        await raw.terminate_instances([b.instance_id])
    finally:
        await raw.close()
