"""Keeping backups across regions on the local cloud: KMS keys per region, a plan's copies
and retention in another region, and a restore from that region alone.

The cloud serves KMS on its endpoint (requests signed for ``kms``): keys and aliases are a
region's own, and a copy encrypted with a key its region lacks is accepted, then fails
(as EC2 checks the key after accepting the copy). A plan's ``copy_to`` copies each new
backup, tagged as a copy, and counts it only once completed; a copy that fails or is
cancelled is deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest
from botocore.exceptions import ClientError

from asyncstage import Manager, backup
from asyncstage.backup import CopyTarget, PlannedBackup
from asyncstage.backup.keep import COPY_OF_TAG, copy_backup, copy_of
from asyncstage.backup.snapshots import usable
from asyncstage.ec2 import tag, tag_filters
from asyncstage.errors import EC2Error
from asyncstage.localcloud import LocalCloud
from asyncstage.retention import Policy
from tests.backup_support import cli_command
from tests.fixtures.cloud import ManagerFactory
from tests.patience import patient_client
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

OTHER = "eu-west-1"


async def _copies_of(m: Manager, source: str) -> list[dict[str, Any]]:
    """Every snapshot in ``m``'s region tagged as a copy of ``source`` (any state)."""
    found = await m.ec2.describe_snapshots(filters=[{"Name": "tag-key", "Values": [COPY_OF_TAG]}])
    return [s for s in found if (of := copy_of(s)) is not None and of[1] == source]


async def test_kms_keys_are_a_regions_own_and_a_copy_needs_one_there(cloud: LocalCloud) -> None:
    session = aioboto3.Session()
    async with (
        session.client("kms", **cloud.session_kwargs(OTHER)) as away,
        session.client("kms", **cloud.session_kwargs()) as home,
        patient_client(**cloud.session_kwargs(OTHER)) as ec2_away,
        patient_client(**cloud.session_kwargs()) as ec2_home,
    ):
        key = (await away.create_key(Description="keys-test"))["KeyMetadata"]
        assert f":{OTHER}:" in key["Arn"]
        await away.create_alias(AliasName="alias/keys-test", TargetKeyId=key["KeyId"])
        described = (await away.describe_key(KeyId="alias/keys-test"))["KeyMetadata"]
        assert described["KeyId"] == key["KeyId"]
        aliases = {a["AliasName"] for a in (await away.list_aliases())["Aliases"]}
        assert "alias/keys-test" in aliases
        with pytest.raises(ClientError) as info:  # not a key of the other region
            await home.describe_key(KeyId=key["KeyId"])
        assert info.value.response["Error"]["Code"] == "NotFoundException"
        volume = await ec2_home.create_volume(AvailabilityZone=f"{cloud.region}a", Size=1)
        made: list[tuple[Any, str]] = []
        try:
            snap = await ec2_home.create_snapshot(VolumeId=volume["VolumeId"])
            made.append((ec2_home, snap["SnapshotId"]))
            await _completed(ec2_home, snap["SnapshotId"])

            async def encrypted_copy(key: str) -> dict[str, Any]:
                made_now = await ec2_away.copy_snapshot(
                    SourceSnapshotId=snap["SnapshotId"],
                    SourceRegion=cloud.region,
                    Encrypted=True,
                    KmsKeyId=key,
                )
                made.append((ec2_away, made_now["SnapshotId"]))
                return await _completed(ec2_away, made_now["SnapshotId"])

            copy = await encrypted_copy("alias/keys-test")
            assert copy["State"] == "completed" and copy["KmsKeyId"].endswith("alias/keys-test")
            # EC2 accepts a key the region lacks and fails the copy afterwards
            failed = await encrypted_copy("alias/no-such-key")
            assert failed["State"] == "error" and "alias/no-such-key" in failed["StateMessage"]
        finally:
            for client, snapshot_id in reversed(made):
                await client.delete_snapshot(SnapshotId=snapshot_id)
            await ec2_home.delete_volume(VolumeId=volume["VolumeId"])


async def _completed(client: Any, snapshot_id: str, within: float = 60) -> dict[str, Any]:
    """The snapshot once it is no longer pending (polled, bounded)."""
    with anyio.fail_after(within):
        while True:
            try:
                found = await client.describe_snapshots(SnapshotIds=[snapshot_id])
            except ClientError as e:  # a new id may be hidden for a moment
                if "NotFound" not in e.response["Error"]["Code"]:
                    raise
            else:
                snap: dict[str, Any] = found["Snapshots"][0]
                if snap["State"] != "pending":
                    return snap
            await anyio.sleep(0.05)


async def _live_volumes(m: Manager) -> set[str]:
    """The region's data volumes (not servers' root volumes) that are not deleted."""
    found = await m.ec2.describe_volumes(filters=tag_filters({tag("role"): "volume"}))
    return {v["VolumeId"] for v in found if v["State"] not in ("deleting", "deleted")}


async def _drop(m: Manager, name: str) -> None:
    for snap in await m.ec2.describe_snapshots(filters=tag_filters({tag("name"): name})):
        await m.ec2.delete_snapshot(snap["SnapshotId"])


async def test_a_plan_copies_keeps_there_and_restores_and_checks_from_there_alone(
    cloud: LocalCloud, manager_factory: ManagerFactory, cloud_dotdir: Path, tmp_path: Path
) -> None:
    name = "keep-dr"
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        try:
            async with away.ec2.service("kms") as kms:
                key = (await kms.create_key(Description="dr"))["KeyMetadata"]
                await kms.create_alias(AliasName="alias/keep-dr", TargetKeyId=key["KeyId"])
            server = await home.get_server("keep-host")
            src = tmp_path / "src"
            src.mkdir()
            planned = PlannedBackup(
                name,
                (str(src),),
                server=server.name,
                retention=Policy(last=1),
                copy_to=(CopyTarget(OTHER, "alias/keep-dr", Policy(last=2)),),
            )
            phases: set[str] = set()
            with playing(cloud, snapshot_interval=0.0):
                for n in range(3):
                    (src / "f.txt").write_text(f"version {n}")
                    report = await backup.run_plan(
                        home,
                        [planned],
                        regions={OTHER: away},
                        on_change=lambda o: phases.add(o.phase),
                    )
                    assert report.ok, report.as_dict()
            assert {"copy", "forget"} <= phases
            result = report.outcomes[0].result
            newest = str(result["snapshot_id"])
            (copied,) = result["copies"][OTHER]
            assert len(result["retention"][cloud.region]["removed"]) == 1
            assert len(result["retention"][OTHER]["removed"]) == 1
            assert [s["SnapshotId"] for s in usable(await home.snapshots(name))] == [newest]
            copies = usable(await away.snapshots(name))
            assert len(copies) == 2 and copies[0]["SnapshotId"] == copied
            assert copy_of(copies[0]) == (cloud.region, newest)
            assert copies[0]["Encrypted"] and copies[0]["KmsKeyId"].endswith("alias/keep-dr")

            # the source region loses every snapshot: the copy region restores alone
            await _drop(home, name)
            restored = await backup.restore(away, name, tmp_path / "out")
            assert restored.snapshot_id == copied
            landed = tmp_path / "out" / str(src).lstrip("/") / "f.txt"  # its full path
            assert landed.read_text() == "version 2"
            # ... and checks alone: every copy, content included, from its manifest
            before = await _live_volumes(away)
            checked = await backup.check(away, name, all_snapshots=True, read_data=True)
            assert [r.snapshot_id for r in checked] == [s["SnapshotId"] for s in copies]
            assert all(r.verified and r.files_read == 1 for r in checked), checked
            for command in (
                ("backup", "check", name, "--read-data"),
                ("restore", "--name", name, str(tmp_path / "cli")),
            ):
                argv, env = cli_command(cloud, cloud_dotdir, "--json", *command, region=OTHER)
                with anyio.fail_after(300):
                    ran = await anyio.run_process(argv, env=env, check=False)
                assert ran.returncode == 0, ran.stderr.decode()
                answer = json.loads(ran.stdout)
                (answer,) = answer if isinstance(answer, list) else [answer]
                assert answer["snapshot_id"] == copied and answer["verified"] in (True, "verified")
            assert (tmp_path / "cli" / landed.relative_to(tmp_path / "out")).read_text() == (
                "version 2"
            )
            assert await _live_volumes(away) == before  # the scratch volumes are gone
        finally:
            await _drop(home, name)
            await _drop(away, name)


async def test_a_missing_key_stops_the_backup_before_any_work(
    cloud: LocalCloud, manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    name = "keep-nokey"
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        planned = PlannedBackup(
            name, (str(tmp_path),), copy_to=(CopyTarget(OTHER, "alias/keep-missing"),)
        )
        report = await backup.run_plan(home, [planned], regions={OTHER: away})
        (outcome,) = report.outcomes
        assert not outcome.ok and outcome.error_type == "UnknownKmsKey"
        assert "alias/keep-missing" in outcome.error and OTHER in outcome.error
        assert await home.ec2.describe_snapshots(filters=tag_filters({tag("name"): name})) == []
        assert home.servers() == [] and home.volumes() == []  # no work was started


async def test_a_copy_that_fails_or_is_cancelled_leaves_no_half_copy(
    cloud: LocalCloud, manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    name = "keep-half"
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        try:
            server = await home.get_server("keep-half-host")
            (tmp_path / "f.txt").write_text("half")
            with playing(cloud, snapshot_interval=0.0):
                made = await backup.backup(home, name, [str(tmp_path)], server=server)
            source = made.snapshot_id
            # a key the region lacks: EC2 fails the copy; the failed copy is deleted
            with pytest.raises(EC2Error, match="alias/keep-none"):
                await copy_backup(home, away, source, CopyTarget(OTHER, "alias/keep-none"))
            assert await _copies_of(away, source) == []
            # cancelled while pending: the copy is deleted, nothing counted
            with playing(cloud, snapshot=(30.0, 30.0)):
                with anyio.move_on_after(2) as scope:
                    await copy_backup(home, away, source, CopyTarget(OTHER))
            assert scope.cancelled_caught
            assert await _copies_of(away, source) == []
            assert usable(await away.snapshots(name)) == []
        finally:
            await _drop(home, name)
            await _drop(away, name)


async def test_a_set_is_copied_kept_and_restored_whole_from_the_copy_region(
    cloud: LocalCloud, manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    name = "keep-set"
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        made = []
        try:
            server = await home.get_server("keep-set-host")
            made = [await server.provision_volume(n, size=1) for n in ("keep-a", "keep-b")]
            planned = PlannedBackup(
                name,
                mode="snapshot",
                server=server.name,
                retention=Policy(last=1),
                copy_to=(CopyTarget(OTHER, retention=Policy(last=2)),),
            )
            with playing(cloud, snapshot_interval=0.0):
                for n in range(3):
                    for v in made:
                        await server.scmd("sh", "-c", f"echo {n} > {v.mtpt}/which; sync", sudo=True)
                    report = await backup.run_plan(home, [planned], regions={OTHER: away})
                    assert report.ok, report.as_dict()
            result = report.outcomes[0].result
            newest = sorted(result["snapshots"].values())
            copies = result["copies"][OTHER]
            assert len(newest) == 2 and len(copies) == 2
            # each region removed one whole set (two snapshots) on the last run
            assert len(result["retention"][cloud.region]["removed"]) == 2
            assert len(result["retention"][OTHER]["removed"]) == 2
            assert sorted(s["SnapshotId"] for s in usable(await home.snapshots(name))) == newest
            there = usable(await away.snapshots(name))
            assert len(there) == 4 and {s["SnapshotId"] for s in there} >= set(copies)

            # the source region loses every snapshot: the copy region restores the set whole
            await _drop(home, name)
            restored = await backup.restore(away, name, tmp_path / "out")
            assert sorted(restored.snapshots) == sorted(copies)
            assert sorted(restored.snapshots.values()) == ["keep-a", "keep-b"]
            for v in made:
                assert (tmp_path / "out" / v.name / "which").read_text() == "2\n"
            (checked,) = await backup.check(away, name)
            assert checked.manifest == "none" and not checked.failed  # a set has no manifest
        finally:
            for v in made:
                await v.delete()
            await _drop(home, name)
            await _drop(away, name)
