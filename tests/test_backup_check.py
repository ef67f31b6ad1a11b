"""Backup manifests and checks on the local cloud: a backup checks clean; a byte corrupted
inside a snapshot is found by ``read_data`` (and by a restore); a manifest tag that does not
match is refused; a snapshot-mode set says it has no manifest; nothing is left behind."""

from __future__ import annotations

import filecmp
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup.manifest import MANIFEST_NAME, MANIFEST_TAG
from asyncstage.ec2 import tag, tag_filters, tags_of
from asyncstage.errors import RestoreVerifyFailed
from asyncstage.localcloud import LocalCloud
from tests.backup_support import cli_command

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

NAME = "verified"
INPLACE = "verified-inplace"
VICTIM = "docs/big.bin"
# Flip one byte of a file and put its mtime back: the metadata stays as the manifest says.
CORRUPT = (
    "import os, sys; p = sys.argv[1]; st = os.stat(p); f = open(p, 'r+b'); f.seek(70000); "
    "b = f.read(1); f.seek(70000); f.write(bytes([b[0] ^ 1])); f.close(); "
    "os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))"
)


@dataclass
class Made:
    m: Manager
    server: Server
    src: Path
    result: backup.BackupResult
    snap: dict[str, Any]
    dotdir: Path

    @property
    def rel(self) -> str:
        """Where the source is in the snapshot (a local path: at its absolute path)."""
        return str(self.src).lstrip("/")


@pytest.fixture(scope="module")
async def made(cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Made]:
    """One server and one backup for the module (deleted at its end)."""
    src = tmp_path_factory.mktemp("check-src")
    (src / "docs").mkdir()
    for i in range(5):
        (src / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * (i * 40 + 1))
    (src / VICTIM).write_bytes(os.urandom(200_000))
    os.symlink("docs/f1.txt", src / "link")
    dotdir = tmp_path_factory.mktemp("check-dotdir")
    async with cloud.manager(
        dotdir=dotdir,
        on_exit="terminate",
        scan=False,
        poll_interval=0.1,
    ) as m:
        server = await m.provision_server("check-host")
        try:
            result = await backup.backup(m, NAME, [src])
            (snap,) = await m.ec2.describe_snapshots([result.snapshot_id])
            yield Made(m, server, src, result, snap, dotdir)
        finally:
            for name in (NAME, INPLACE):
                for s in await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name})):
                    await m.ec2.delete_snapshot(s["SnapshotId"])


async def _state(made: Made) -> tuple[set[str], str, list[tuple[str, str]]]:
    """What a check may not leave behind: live volumes, the server's mounts, servers."""
    vols = await made.m.ec2.describe_volumes()
    live = {v["VolumeId"] for v in vols if v.get("State") != "deleted"}
    mounts = await made.server.scmd("cat", "/proc/self/mounts")
    return live, mounts, sorted((s.instance_id, s.state) for s in made.m.servers())


async def test_a_backup_writes_its_manifest_and_checks_clean(made: Made) -> None:
    assert tags_of(made.snap)[MANIFEST_TAG] == made.result.manifest_sha256
    before = await _state(made)
    phases: list[str] = []
    (meta,) = await backup.check(made.m, NAME, phase=phases.append)
    (full,) = await backup.check(made.m, NAME, read_data=True)
    assert phases == ["volume", "check", "cleanup"]
    for found in (meta, full):
        assert found.snapshot_id == made.result.snapshot_id
        assert found.verified and not found.failed, found
        # the directories down to the source, docs, its 6 files, link
        assert found.entries == len(made.src.parts) - 1 + 8
    assert full.files_read == 6 and full.bytes_read == sum(
        p.stat().st_size for p in (made.src / "docs").iterdir()
    )
    assert meta.files_read == 0
    assert meta.summary() == f"ok ({meta.entries} entries, metadata checked)"
    one = backup.CheckResult(NAME, "snap-1", "ok", read_data=True, entries=1, bytes_read=3)
    assert one.summary() == "ok (1 entry, metadata and content checked, 3 bytes read)"
    assert await _state(made) == before  # scratch volumes and mounts gone


async def test_a_restore_verifies_against_the_manifest(made: Made, tmp_path: Path) -> None:
    done = await backup.restore(made.m, NAME, tmp_path / "r")
    assert done.verified == "verified"
    assert not (tmp_path / "r" / MANIFEST_NAME).exists()  # the backup's own, not the user's
    compare = filecmp.dircmp(made.src, tmp_path / "r" / made.rel)
    assert not (compare.left_only or compare.right_only or compare.diff_files)
    skipped = await backup.restore(made.m, NAME, tmp_path / "s", verify=False)
    assert skipped.verified == "not asked"


async def test_read_data_finds_a_byte_corrupted_inside_a_snapshot(
    cloud: LocalCloud, made: Made, tmp_path: Path
) -> None:
    """A copy of the snapshot with one byte changed, carrying the original's tags."""
    volume = await made.server.provision_volume(snapshot_id=made.result.snapshot_id, reuse=False)
    try:
        victim = f"{volume.mtpt}/{made.rel}/{VICTIM}"
        await made.server.scmd("python3", "-c", CORRUPT, victim, sudo=True)
        corrupted = await volume.create_snapshot("corrupted copy", wait=True)
    finally:
        await volume.delete()
    await made.m.ec2.create_tags([corrupted], tags_of(made.snap))
    before = await _state(made)

    (meta,) = await backup.check(made.m, NAME, snapshot_id=corrupted)
    assert meta.manifest == "ok" and not meta.failed  # size and mtime are as listed
    (full,) = await backup.check(made.m, NAME, snapshot_id=corrupted, read_data=True)
    damaged = {"path": f"{made.rel}/{VICTIM}", "error": "content differs"}
    assert full.failed and full.damaged == (damaged,)
    assert full.counts == {"missing": 0, "changed": 0, "extra": 0, "damaged": 1}
    # the command says so on stderr and exits 1
    argv, env = cli_command(
        cloud, made.dotdir, "backup", "check", NAME, "--snapshot", corrupted, "--read-data"
    )
    with anyio.fail_after(300):
        ran = await anyio.run_process(argv, env=env, check=False)
    assert ran.returncode == 1, ran.stderr.decode()
    said = f"{corrupted}: damaged: {made.rel}/{VICTIM} (content differs)"
    assert said in ran.stderr.decode() and "FAILED" in ran.stdout.decode()

    with pytest.raises(RestoreVerifyFailed, match="does not match") as caught:
        await backup.restore(made.m, NAME, tmp_path / "r", snapshot_id=corrupted)
    assert caught.value.findings["damaged"] == [damaged]
    written = tmp_path / "r" / made.rel / VICTIM
    assert written.read_bytes() != (made.src / VICTIM).read_bytes()  # written, then reported
    assert await _state(made) == before
    await made.m.ec2.delete_snapshot(corrupted)


async def test_a_manifest_tag_that_does_not_match_is_refused(made: Made, tmp_path: Path) -> None:
    sid, digest = made.result.snapshot_id, made.result.manifest_sha256
    before = await _state(made)
    try:
        await made.m.ec2.create_tags([sid], {MANIFEST_TAG: "0" * 64})
        (found,) = await backup.check(made.m, NAME, read_data=True)
        assert found.manifest == "mismatch" and found.failed and found.entries == 0
        with pytest.raises(RestoreVerifyFailed, match="digest is not its tag's"):
            await backup.restore(made.m, NAME, tmp_path / "r")
        await made.m.ec2.create_tags([sid], {MANIFEST_TAG: "$(reboot)"})
        (found,) = await backup.check(made.m, NAME)
        assert found.manifest == "bad-tag" and found.failed
    finally:
        await made.m.ec2.create_tags([sid], {MANIFEST_TAG: digest})
    assert await _state(made) == before


async def test_a_cancelled_check_leaves_nothing(made: Made) -> None:
    before = await _state(made)
    with anyio.CancelScope() as scope:

        def phase(name: str) -> None:
            if name == "check":
                scope.cancel()

        await backup.check(made.m, NAME, read_data=True, phase=phase)
    assert scope.cancelled_caught
    assert await _state(made) == before


async def test_a_snapshot_mode_set_says_it_has_no_manifest(made: Made) -> None:
    volume = await made.server.provision_volume("verified-data", size=1)
    try:
        done = await backup.snapshot_backup(made.m, INPLACE, made.server)
    finally:
        await volume.delete()
    before = await _state(made)
    (found,) = await backup.check(made.m, INPLACE, read_data=True)
    assert found.snapshot_id in done.snapshots.values()
    assert found.manifest == "none" and not found.verified and not found.failed
    assert "snapshot-mode" in found.summary()
    assert await _state(made) == before


async def test_a_server_started_for_a_check_is_stopped_again(made: Made) -> None:
    """With no server running, the check starts one for its scratch volume, and puts it back."""
    await made.server.stop()
    try:
        (found,) = await backup.check(made.m, NAME)
        assert found.verified
        assert made.server.state == "stopped"
        (described,) = await made.m.ec2.describe_instances([made.server.instance_id])
        assert described["State"]["Name"] == "stopped"
    finally:
        if made.server.state != "running":
            await made.server.start()
