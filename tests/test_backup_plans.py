"""Backup plans: TOML or Python objects, checked before anything runs; run all at once,
one failure never stopping the others; the command line's exit status and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncstage import Manager, Server, backup, cli
from asyncstage.backup import Hook, Hooked, Plan, PlannedBackup
from asyncstage.errors import InvalidArgument, InvalidName
from tests.backup_support import NOTHING, leftovers, manager_dropping

GOOD = """
concurrency = 2
wait = 5

[[backup]]
name = "plan-a"
sources = [
  "/srv/a",
  { path = "web1:/var/lib/db", pre = { command = "db-start", timeout = 30 }, post = { command = \
"db-stop", on_error = "continue" } },
]

[[backup]]
name = "plan-disks"
mode = "snapshot"
server = "web1"
"""


def test_a_toml_plan_becomes_the_same_objects(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(GOOD)
    plan = backup.load_plan(path)
    assert plan == Plan(
        (
            PlannedBackup(
                "plan-a",
                (
                    "/srv/a",
                    Hooked(
                        "web1:/var/lib/db",
                        pre=Hook("db-start", timeout=30),
                        post=Hook("db-stop", on_error="continue"),
                    ),
                ),
            ),
            PlannedBackup("plan-disks", mode="snapshot", server="web1"),
        ),
        concurrency=2,
        wait=5,
    )


def test_keep_volume_is_read_from_a_plan_and_off_unless_asked_for() -> None:
    plan = backup.parse_plan(
        {
            "backup": [
                {"name": "warm", "sources": ["/a"], "keep_volume": True},
                {"name": "cold", "sources": ["/b"]},
            ]
        }
    )
    assert [b.keep_volume for b in plan.backups] == [True, False]


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ('[[backup]]\nname = "../etc"\nsources = ["/a"]', InvalidName, "invalid backup name"),
        ('[[backup]]\nname = "$(id)"\nsources = ["/a"]', InvalidName, "invalid backup name"),
        ('[[backup]]\nname = "x"\nsources = ["/a\\nb"]', InvalidArgument, "control characters"),
        ('[[backup]]\nname = "x"\nsources = ["/a\\u0000"]', InvalidArgument, "control"),
        ('[[backup]]\nname = "x"\nsources = [3]', InvalidArgument, "a string or a table"),
        ('[[backup]]\nname = "x"\nsources = []', InvalidArgument, "needs sources"),
        ('[[backup]]\nname = "x"\nsources = ["/a"]\nrm = 1', InvalidArgument, "unknown keys"),
        ('[[backup]]\nname = "x"\nmode = "snapshot"', InvalidArgument, "names a server"),
        ('[[backup]]\nname = "x"\nsources = ["/a"]\nzone = "a b"', InvalidArgument, "zone"),
        ('[[backup]]\nname = "x"\nsources = ["/a"]\nserver = "-rf"', InvalidName, "server"),
        (
            '[[backup]]\nname = "x"\nsources = [{ path = "/a", pre = { timeout = 1 } }]',
            InvalidArgument,
            "needs a command",
        ),
        (
            '[[backup]]\nname = "x"\nsources = [{ path = "/a", pre = { command = "x", '
            'on_error = "ignore" } }]',
            InvalidArgument,
            "on_error",
        ),
        (
            '[[backup]]\nname = "x"\nsources = ["/a"]\n[[backup]]\nname = "x"\nsources = ["/b"]',
            InvalidArgument,
            "listed twice",
        ),
        (
            '[[backup]]\nname = "x"\nsources = ["/a"]\nkeep_volume = "yes"',
            InvalidArgument,
            "keep_volume is true or false",
        ),
        (
            '[[backup]]\nname = "x"\nmode = "snapshot"\nserver = "s"\nkeep_volume = true',
            InvalidArgument,
            "keep_volume is for copy backups",
        ),
        ("concurrency = 0\n[[backup]]\nname = 'x'\nsources = ['/a']", InvalidArgument, "1..256"),
        ("", InvalidArgument, "no backups"),
        ("[[backup", InvalidArgument, "not valid TOML"),
    ],
)
def test_hostile_or_broken_plans_are_refused(
    tmp_path: Path, text: str, error: type[Exception], match: str
) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    with pytest.raises(error, match=match):
        backup.load_plan(path)


def test_the_command_refuses_a_bad_plan_before_any_cloud_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.toml"
    path.write_text('[[backup]]\nname = "../x"\nsources = ["/a"]')
    assert cli.main(["backup", "run", str(path)]) == 1
    assert "invalid backup name" in capsys.readouterr().err
    assert cli.main(["backup", "frobnicate"]) == 1
    assert "give --name NAME" in capsys.readouterr().err


manager = manager_dropping("plan-a", "plan-b", "plan-bad")


@pytest.mark.anyio
@pytest.mark.localcloud
async def test_a_plan_runs_all_at_once_and_one_failure_stops_no_other(
    manager: Manager, tmp_path: Path
) -> None:
    server: Server = await manager.get_server("backup-host")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(name)
    plan = Plan(
        (
            PlannedBackup("plan-a", (str(tmp_path / "a"),), server=server.name),
            PlannedBackup("plan-bad", ("nosuch:/srv",), server=server.name),
            PlannedBackup("plan-b", (str(tmp_path / "b"),), server=server.name),
        ),
        concurrency=2,
    )
    seen: set[str] = set()
    report = await backup.run_plan(manager, plan, on_change=lambda o: seen.add(o.phase))
    assert not report.ok and [o.name for o in report.failed] == ["plan-bad"]
    data = json.loads(json.dumps(report.as_dict()))
    assert data["failed"] == ["plan-bad"]
    bad = data["backups"][1]
    assert bad["error_type"] == "NotFound" and "nosuch" in bad["error"]
    for good in (data["backups"][0], data["backups"][2]):
        assert good["ok"] and good["result"]["files"] == 1
    assert {"volume", "rsync", "snapshot", "done", "failed"} <= seen
    assert manager.volumes() == []
    for name in ("plan-a", "plan-b", "plan-bad"):
        assert await leftovers(manager, name) == NOTHING
