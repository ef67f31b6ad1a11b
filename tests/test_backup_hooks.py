"""Consistency hooks of a backup: pre/post around the copy, post after every outcome
(success, failure, timeout, cancellation), and the consistency each snapshot records."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from asyncstage import Manager, Server, backup
from asyncstage.backup import Hook, Hooked
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import HookFailed, InvalidArgument
from tests.backup_support import NOTHING, leftovers, manager_dropping

pytestmark = [pytest.mark.anyio, pytest.mark.localcloud]

NAME = "hooked"


manager = manager_dropping(NAME)


@pytest.fixture
async def server(manager: Manager) -> Server:
    return await manager.get_server("backup-host")


async def _nothing_left(m: Manager) -> None:
    assert await leftovers(m, NAME) == NOTHING
    assert m.volumes() == []


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    return src


async def test_pre_and_post_around_the_copy_make_it_application_consistent(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src, log = _src(tmp_path), tmp_path / "log"
    hooked = Hooked(
        src,
        pre=Hook(f"echo pre >> {log} && echo quiesced > {src}/state"),
        post=Hook(f"echo post >> {log}"),
    )
    done = await backup.backup(manager, NAME, [hooked], server=server)
    assert done.consistency == "application-consistent" and done.files == 2
    assert log.read_text() == "pre\npost\n"
    (snap,) = await manager.snapshots(NAME)
    assert tags_of(snap)[tag("backup-consistency")] == "application-consistent"

    # a pre that fails with on_error="continue": the backup completes, crash-consistent only
    hooked = Hooked(src, pre=Hook("exit 3", on_error="continue"), post=Hook(f"echo post >> {log}"))
    again = await backup.backup(manager, NAME, [hooked], server=server)
    assert again.consistency == "crash-consistent" and log.read_text().endswith("post\npost\n")
    assert tags_of((await manager.snapshots(NAME))[0])[tag("backup-consistency")] == (
        "crash-consistent"
    )

    # a server's hooks run on the server, before its files are copied
    await server.scmd("mkdir", "-p", "/srv/hooked", sudo=True)
    on_server = Hooked(
        f"{server.name}:/srv/hooked",
        pre=Hook("date > /srv/hooked/dumped-by-pre"),
        post=Hook("rm -f /srv/hooked/dumped-by-pre"),
    )
    third = await backup.backup(manager, NAME, [on_server], server=server)
    assert third.consistency == "application-consistent" and third.files == 1
    assert await server.scmd("ls", "/srv/hooked", sudo=True) == ""
    await _nothing_left(manager)


async def test_a_failing_pre_fails_the_backup_and_post_still_runs(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src, log = _src(tmp_path), tmp_path / "log"
    hooked = Hooked(src, pre=Hook("echo broken >&2; exit 7"), post=Hook(f"echo post >> {log}"))
    with pytest.raises(HookFailed, match=r"pre hook on this machine failed.*exit status 7.*broken"):
        await backup.backup(manager, NAME, [hooked], server=server)
    assert log.read_text() == "post\n"
    assert await manager.snapshots(NAME) == []
    await _nothing_left(manager)


async def test_a_hanging_pre_times_out_is_killed_and_post_still_runs(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src, log, pid = _src(tmp_path), tmp_path / "log", tmp_path / "pid"
    hooked = Hooked(
        src,
        pre=Hook(f"sh -c 'echo $$ > {pid}; exec sleep 600'", timeout=1.0),
        post=Hook(f"echo post >> {log}"),
    )
    with pytest.raises(HookFailed, match="timed out after 1s"):
        await backup.backup(manager, NAME, [hooked], server=server)
    assert log.read_text() == "post\n"
    sleeper = int(pid.read_text())
    with anyio.fail_after(30):  # its sleep was killed too: gone, or a zombie being reaped
        while not _dead(sleeper):  # noqa: ASYNC110 - another process's state
            await anyio.sleep(0.05)
    assert await manager.snapshots(NAME) == []
    await _nothing_left(manager)


async def test_a_cancelled_backup_runs_post(
    manager: Manager, server: Server, tmp_path: Path
) -> None:
    src, log, started = _src(tmp_path), tmp_path / "log", tmp_path / "started"
    hooked = Hooked(
        src, pre=Hook(f"touch {started}; sleep 600", timeout=900), post=Hook(f"echo post >> {log}")
    )
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_once_pre_runs() -> None:
                with anyio.fail_after(120):
                    while not started.exists():  # noqa: ASYNC110 - a file another process makes
                        await anyio.sleep(0.05)
                scope.cancel()

            tg.start_soon(cancel_once_pre_runs)
            await backup.backup(manager, NAME, [hooked], server=server)
    assert scope.cancelled_caught
    assert log.read_text() == "post\n"
    await _nothing_left(manager)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"command": ""}, "non-empty"),
        ({"command": "x\0y"}, "NUL"),
        ({"command": "true", "timeout": 0}, "timeout"),
        ({"command": "true", "on_error": "maybe"}, "on_error"),
    ],
)
def test_bad_hooks_are_refused(args: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Hook(**args)  # type: ignore[arg-type]
