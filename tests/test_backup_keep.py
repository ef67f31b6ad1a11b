"""Keeping backups: ``forget`` by backup name, a plan's ``retention`` and ``copy_to``.

On plain moto (records only): plans and options checked before anything runs, forget of
backups that leaves unfinished ones alone, a forget interrupted midway then run again,
and KMS keys checked in the destination region before any copy. The local cloud's side
(KMS per region, copies to another region, restore from there alone) is in
``tests/test_backup_keep_regions.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstage import Manager, backup, cli
from asyncstage.backup import CopyTarget, PlannedBackup, UnknownKmsKey
from asyncstage.backup.keep import check_keys, copy_backup, copy_of, parse_copy_to
from asyncstage.backup.snapshots import STATE_TAG
from asyncstage.ec2 import tag
from asyncstage.errors import InvalidArgument
from asyncstage.retention import InvalidPolicy, Policy
from tests.backup_support import backup_history
from tests.fixtures.moto import moto_manager

PLAN = """
[[backup]]
name = "kept"
sources = ["/srv/a"]
retention = { keep_last = 2, keep_daily = 7, keep_within = "2d" }
copy_to = ["eu-west-1", { region = "us-west-2", kms_key_id = "alias/dr", retention = \
{ keep_last = 10 } }]
"""


def test_a_plans_retention_and_copies_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    (kept,) = backup.load_plan(path).backups
    assert kept.retention is not None
    assert (kept.retention.last, kept.retention.daily) == (2, 7)
    assert kept.copy_to == (
        CopyTarget("eu-west-1"),
        CopyTarget("us-west-2", "alias/dr", Policy(last=10)),
    )
    same = PlannedBackup(
        "kept",
        ("/srv/a",),
        retention={"keep_last": 2, "keep_daily": 7, "keep_within": "2d"},  # type: ignore[arg-type]
        copy_to=("eu-west-1", {"region": "us-west-2", "kms_key_id": "alias/dr"}),  # type: ignore[arg-type]
    )
    assert same.retention == kept.retention and same.copy_to[1].kms_key_id == "alias/dr"


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ("retention = { keep_daily = -1 }", InvalidPolicy, "keep-daily"),
        ("retention = { keep_last = true }", InvalidPolicy, "whole number"),
        ('retention = { keep_within = "-3d" }', InvalidPolicy, "duration"),
        ("retention = { keep_forever = 1 }", InvalidPolicy, "unknown retention"),
        ("retention = { keep_last = 0 }", InvalidPolicy, "no keep rule"),
        ('retention = "daily"', InvalidPolicy, "table"),
        ('copy_to = ["eu-west-1", "eu-west-1"]', InvalidArgument, "twice"),
        ('copy_to = ["../etc"]', InvalidArgument, "region name"),
        ('copy_to = "eu-west-1"', InvalidArgument, "list"),
        ('copy_to = [{ region = "eu-west-1", kms = "x" }]', InvalidArgument, "kms_key_id"),
        (
            'copy_to = [{ region = "eu-west-1", kms_key_id = '
            '"arn:aws:kms:us-east-1:123456789012:key/abc" }]',
            UnknownKmsKey,
            "another region",
        ),
        ('copy_to = [{ region = "eu-west-1", kms_key_id = "a b" }]', InvalidArgument, "key id"),
    ],
)
def test_hostile_retention_and_copies_are_refused(
    tmp_path: Path, extra: str, error: type[Exception], match: str
) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(f'[[backup]]\nname = "x"\nsources = ["/a"]\n{extra}\n')
    with pytest.raises(error, match=match):
        backup.load_plan(path)


@pytest.mark.parametrize(
    "options",
    [
        ["--keep-last", "-1"],
        ["--keep-daily", "abc"],
        ["--keep-weekly", "2.5"],
        ["--keep-last", "99999999999"],
        ["--keep-within=-1d"],
        ["--keep-within", "1x"],
        ["--keep-last", "0"],
        [],
    ],
)
def test_the_command_refuses_hostile_keep_options_before_any_cloud_call(
    options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backup", "forget", "web1", *options]) == 1
    assert "keep" in capsys.readouterr().err


def test_a_copy_tag_is_validated_when_read_back() -> None:
    def snap(value: str) -> dict[str, Any]:
        return {"Tags": [{"Key": tag("copy-of"), "Value": value}]}

    assert copy_of(snap("us-east-1/snap-0123456789abcdef0")) == (
        "us-east-1",
        "snap-0123456789abcdef0",
    )
    for bad in ("us-east-1/vol-01234567", "../snap-01234567", "us-east-1/snap-0123;rm", ""):
        assert copy_of(snap(bad)) is None


def test_parse_copy_to_takes_objects_too() -> None:
    target = CopyTarget("eu-west-1", "alias/x")
    assert parse_copy_to("b", [target, "us-west-2"])[0] is target


# -- plain moto ---------------------------------------------------------------------------


@pytest.fixture
async def home(moto_url: str, tmp_path: Path) -> AsyncIterator[Manager]:
    async with moto_manager(moto_url, tmp_path / "dot") as m:
        yield m


def _start_times(snapshot_ids: list[str]) -> None:
    """Give plain moto's snapshots an hour between each (it is this process's moto)."""
    from datetime import UTC, datetime, timedelta

    from moto.ec2.models import ec2_backends

    backend = ec2_backends["123456789012"]["us-east-1"]
    now = datetime.now(UTC).replace(tzinfo=None)
    for n, snapshot_id in enumerate(reversed(snapshot_ids)):
        backend.snapshots[snapshot_id].start_time = now - timedelta(hours=n)


def image_uses(image_id: str, snapshot_id: str) -> None:
    """Make moto's image use ``snapshot_id`` (plain moto makes a snapshot of its own for a
    registered image, whatever its mappings say)."""
    from moto.ec2.models import ec2_backends

    backend = ec2_backends["123456789012"]["us-east-1"]
    image = backend.amis[image_id]
    made, image.ebs_snapshot = image.ebs_snapshot, backend.snapshots[snapshot_id]
    backend.snapshots.pop(made.id, None)


@pytest.mark.anyio
async def test_forget_deletes_only_what_a_second_reading_confirms(home: Manager) -> None:
    m = home
    made = await backup_history(m, "kept-again", 6, "us-east-1a")
    _start_times(made)
    from moto.ec2.models import ec2_backends

    backend = ec2_backends["123456789012"]["us-east-1"]
    image = await m.ec2.call("RegisterImage", Name="kept-again", RootDeviceName="/dev/sda1")
    image_uses(image["ImageId"], made[0])  # the oldest: an image uses it from the start
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        if len(lines) == 6:  # every decision of the first reading is out, none deleted yet
            # meanwhile, another program starts a run whose snapshot is this one (a record
            # of EC2 changed between the two readings): it is no longer for removal
            backend.create_tags([made[1]], {STATE_TAG: "pending"})

    try:
        done = await backup.forget(m, ["kept-again"], Policy(last=2), report=report)
        first = {d.snapshot_id: d for d in done.decisions["kept-again"]}
        assert first[made[0]].reasons == (f"used by image {image['ImageId']}",)
        assert not first[made[1]].keep  # doomed by the first reading ...
        assert sorted(done.removed["kept-again"]) == sorted(made[2:4])  # ... not deleted
        assert {s["SnapshotId"] for s in await m.snapshots("kept-again")} == {
            made[0],
            made[1],
            *made[4:],
        }
    finally:
        await m.ec2.call("DeregisterImage", ImageId=image["ImageId"])


@pytest.mark.anyio
async def test_forget_keeps_unfinished_backups_and_reports_each(home: Manager) -> None:
    m = home
    made = await backup_history(m, "kept-app", 6, "us-east-1a", unfinished=1)
    _start_times(made)
    lines: list[str] = []
    dry = await backup.forget(m, ["kept-app"], Policy(last=2), dry_run=True, report=lines.append)
    assert len(lines) == 7 and not dry.removed
    decisions = {d.snapshot_id: d for d in dry.decisions["kept-app"]}
    unfinished = decisions[made[-1]]
    assert unfinished.keep and unfinished.reasons == ("unfinished: not completed yet",)
    assert decisions[made[-2]].reasons[0] == "newest completed snapshot"
    assert {s for s, d in decisions.items() if not d.keep} == set(made[:4])
    done = await backup.forget(m, ["kept-app"], Policy(last=2), report=lines.append)
    assert sorted(done.removed["kept-app"]) == sorted(made[:4])
    left = {s["SnapshotId"] for s in await m.snapshots("kept-app")}
    assert left == set(made[4:])
    data = json.loads(json.dumps(done.as_dict()))
    removed = {d["snapshot_id"] for d in data["backups"]["kept-app"] if d["removed"]}
    assert removed == set(made[:4]) and data["region"] == "us-east-1"


@pytest.mark.anyio
async def test_forget_interrupted_midway_loses_nothing_it_should_keep(
    home: Manager,
) -> None:
    m = home
    made = await backup_history(m, "kept-cut", 12, "us-east-1a")
    _start_times(made)
    policy = Policy(last=3, hourly=2)
    dry = await backup.forget(m, ["kept-cut"], policy, dry_run=True, report=lambda _: None)
    keep = {d.snapshot_id for d in dry.decisions["kept-cut"] if d.keep}
    assert len(keep) == 3
    removed: list[str] = []

    def report(line: str) -> None:
        if ": removed " in line:
            removed.append(line)
            if len(removed) == 4:
                scope.cancel()  # the controller is stopped between two deletions

    with anyio.CancelScope() as scope:
        await backup.forget(m, ["kept-cut"], policy, report=report)
    assert scope.cancelled_caught
    left = {s["SnapshotId"] for s in await m.snapshots("kept-cut")}
    assert keep <= left and len(left) == 12 - 4
    again = await backup.forget(m, ["kept-cut"], policy, report=lambda _: None)
    assert {s["SnapshotId"] for s in await m.snapshots("kept-cut")} == keep
    assert len(again.removed["kept-cut"]) == 12 - 4 - 3


@pytest.mark.anyio
async def test_a_missing_kms_key_is_refused_before_any_copy(
    home: Manager, moto_url: str, tmp_path: Path
) -> None:
    async with moto_manager(moto_url, tmp_path / "dot", "eu-west-1") as away:
        async with away.ec2.service("kms") as kms:
            key = (await kms.create_key(Description="dr"))["KeyMetadata"]
            await kms.create_alias(AliasName="alias/dr", TargetKeyId=key["KeyId"])
        regions = {"eu-west-1": away}
        await check_keys(regions, [CopyTarget("eu-west-1", "alias/dr")])
        await check_keys(regions, [CopyTarget("eu-west-1", key["Arn"])])
        before = sum(away.ec2.calls.values())
        with pytest.raises(UnknownKmsKey, match="alias/nosuch"):
            await check_keys(regions, [CopyTarget("eu-west-1", "alias/nosuch")])
        with pytest.raises(UnknownKmsKey):  # a key of another region is not there
            async with home.ec2.service("kms") as home_kms:
                home_key = (await home_kms.create_key())["KeyMetadata"]["KeyId"]
            await check_keys(regions, [CopyTarget("eu-west-1", home_key)])
        assert sum(away.ec2.calls.values()) == before  # no EC2 call, no copy
        with pytest.raises(InvalidArgument, match="no manager"):
            await check_keys({}, [CopyTarget("us-west-2", "alias/dr")])


def test_backup_list_shows_the_copy_region_too(
    moto_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dot = tmp_path / "dot"

    async def made() -> tuple[str, str]:
        async with (
            moto_manager(moto_url, dot) as home,
            moto_manager(moto_url, dot, "eu-west-1") as away,
        ):
            (source,) = await backup_history(home, "kept-listed", 1, "us-east-1a")
            return source, await copy_backup(home, away, source, CopyTarget("eu-west-1"))

    source, copied = anyio.run(made)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("ASYNCSTAGE_ENDPOINT_URL", raising=False)
    common = ["--endpoint-url", moto_url, "--dotdir", str(dot), "--region", "us-east-1"]
    argv = [*common, "backup", "list", "--copy-region", "eu-west-1", "--json"]
    assert cli.main(argv) == 0
    listed = {(d["name"], d["region"]): d for d in json.loads(capsys.readouterr().out)}
    home, away = listed["kept-listed", "us-east-1"], listed["kept-listed", "eu-west-1"]
    assert home["newest"] == source and home["copy_of"] is None
    assert away["newest"] == copied and away["copy_of"] == f"us-east-1/{source}"
    assert cli.main([*common, "backup", "list", "--copy-region", "eu-west-1"]) == 0
    assert "eu-west-1 (copy)" in capsys.readouterr().out
