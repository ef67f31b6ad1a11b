"""The ``asyncstage`` command through its real entry point, against a ``local up`` daemon.

The module starts one daemon (in a temporary ``ASYNCSTAGE_LOCAL_DIR``) and runs every
command as a subprocess of ``.venv/bin/asyncstage`` with ``--local``; the last test stops
it and checks that nothing is left behind.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncstage.backup import size_for
from asyncstage.cli import common
from asyncstage.cli.common import resolve_names
from asyncstage.cli.parser import build_parser
from asyncstage.localcloud._isolation import MECHANISMS, device_cgroups_available
from asyncstage.output import human_bytes, table
from tests.fixtures.daemon import EXE, local_daemon, run

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root")


def _alive(pid: int) -> bool:
    """True for a live process (an exited one waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with local_daemon(tmp_path_factory.mktemp("cli"), COLUMNS="200") as env:
        yield env


def test_helpers() -> None:
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"
    assert size_for(0) == 1 and size_for(2 << 30) == 4
    text = table([["a", 1], ["bbb", 22]], ["NAME", "N"])
    assert text.splitlines() == ["NAME   N", "a      1", "bbb   22"]

    class _M:
        def find_server_by_name(self, name: str) -> Any:
            return type("S", (), {"instance_id": "i-0123456789abcdef0"}) if name == "web" else None

        def find_volume_by_name(self, name: str) -> Any:
            return type("V", (), {"volume_id": "vol-0123456789abcdef0"}) if name == "d" else None

    m: Any = _M()
    assert resolve_names(m, "web:/etc") == "i-0123456789abcdef0:/etc"
    assert resolve_names(m, "d:/sub/") == "vol-0123456789abcdef0:/sub/"
    assert resolve_names(m, "/local:x") == "/local:x"
    assert resolve_names(m, "user@host:/x") == "user@host:/x"
    with pytest.raises(Exception, match="no server or volume named 'nope'"):
        resolve_names(m, "nope:/x")


def test_the_local_cloud_is_polled_sooner_than_ec2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a local cloud the waits end in a fraction of a second: its commands poll first
    after 0.2 s; elsewhere the library's default (1 s) stays."""
    state = {
        "pid": 1,
        "endpoint_url": "http://127.0.0.1:4567",
        "region": "us-east-1",
        "image_id": "ami-0123456789abcdef0",
        "username": "admin",
        "dotdir": str(tmp_path / "dot"),
        "aws_access_key_id": "local-key",
        "aws_secret_access_key": "local-secret",
    }
    monkeypatch.setenv("ASYNCSTAGE_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("ASYNCSTAGE_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(common, "read_local_state", lambda _: state)
    local = common.manager_options(build_parser().parse_args(["--local", "servers"]))
    assert local["poll_interval"] == 0.2 and local["endpoint_url"] == state["endpoint_url"]
    monkeypatch.setattr(common, "read_local_state", lambda _: None)
    test_cloud = ["--endpoint-url", "http://127.0.0.1:4568", "servers"]
    assert common.manager_options(build_parser().parse_args(test_cloud))["poll_interval"] == 0.2
    remote = common.manager_options(build_parser().parse_args(["servers"]))
    assert "poll_interval" not in remote and "endpoint_url" not in remote
    assert "host_keys" not in remote  # the library's default
    keyed = build_parser().parse_args(["servers", "--host-keys", "user-data"])
    assert common.manager_options(keyed)["host_keys"] == "user-data"


def test_no_local_cloud_names_where_it_looked(tmp_path: Path) -> None:
    # a cloud started with --dir elsewhere is not found without ASYNCSTAGE_LOCAL_DIR: the
    # error says where it looked and how to point the commands at another directory
    env = os.environ | {"ASYNCSTAGE_LOCAL_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = run(env, "--local", "servers", "list", ok=False)
    assert done.returncode == 3 and f"no local cloud running in {tmp_path}" in done.stderr
    assert "ASYNCSTAGE_LOCAL_DIR" in done.stderr
    done = run(env, "local", "env", ok=False)
    assert done.returncode == 3 and str(tmp_path) in done.stderr
    done = run(env, "local", "status", ok=False)
    assert done.returncode == 3 and f"not running (looked in {tmp_path})" in done.stdout


def test_backup_options_a_form_ignores_are_refused(tmp_path: Path) -> None:
    from asyncstage.cli.backup_options import unused_options

    def unused(*argv: str, form: str) -> list[str]:
        return unused_options(build_parser().parse_args(["backup", *argv]), form)

    # each form takes its own options, and no others
    assert unused("--name", "b", "web:/srv", "--size", "2", "--wait", "5", form="--name") == []
    assert unused("--each", "web*", "/srv", "--concurrency", "8", form="--each") == []
    assert unused("run", "plan.toml", "--concurrency", "2", "--wait", "9", form="run") == []
    assert unused("forget", "b", "--keep-daily", "7", "--dry-run", form="forget") == []
    assert unused("check", "b", "--all", "--read-data", form="check") == []
    assert unused("list", "--copy-region", "eu-west-1", form="list") == []
    assert unused("--name", "b", "web:/srv", "--keep-last", "2", "--all", form="--name") == [
        "--all (used by backup check)",
        "--keep-last (used by backup forget)",
    ]
    assert unused("list", "--name-template", "x-{server}", form="list") == [
        "--name-template (used by backup --each)"
    ]
    # on the command line: a usage error before anything runs, not an option dropped
    env = os.environ | {"ASYNCSTAGE_LOCAL_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = run(env, "--local", "backup", "--name", "b", "web:/srv", "--keep-last", "2", ok=False)
    assert done.returncode == 2 and "--keep-last (used by backup forget)" in done.stderr
    assert "retention: `backup forget NAME --keep-...`" in done.stderr
    done = run(env, "--local", "backup", "sweep", "--read-data", ok=False)
    assert done.returncode == 2 and "--read-data (used by backup check)" in done.stderr
    # the servers and volumes commands alike, and the combinations one option would lose
    for argv, said in (
        (["servers", "list", "--type", "t3.large"], "--type (used by servers provision)"),
        (["servers", "list", "web"], "servers list takes no names"),
        (["servers", "stop", "web", "--count", "2"], "--count (used by servers provision)"),
        (["servers", "provision", "web", "--count", "2"], "names or --count, not both"),
        (["volumes", "delete", "v", "--size", "5"], "--size (used by volumes provision)"),
        (["volumes", "provision", "v", "--server", "s", "--zone", "z"], "not both"),
    ):
        done = run(env, "--local", *argv, ok=False)
        assert done.returncode == 2 and said in done.stderr, (argv, done.stderr)


def test_usage_errors_exit_2() -> None:
    done = subprocess.run([str(EXE), "servers", "explode"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    done = subprocess.run([str(EXE), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("asyncstage ")


@needs_root
@pytest.mark.localcloud
def test_local_status(daemon: dict[str, str]) -> None:
    status = run(daemon, "local", "status", "--json")
    state = json.loads(status.stdout)
    assert state["running"] and state["endpoint_url"].startswith("http://127.0.0.1:")
    # which device isolation is in force: the best the machine has ("auto")
    assert state["device_isolation"] == ("v1" if device_cgroups_available() else "bpf")
    shown = run(daemon, "local", "status").stdout
    assert f"isolation:   {MECHANISMS[state['device_isolation']]}\n" in shown
    # where its instances live: the cloud's own network where the machine can make it
    from asyncstage.localcloud._network import possible

    assert state["network"] == ("vpc" if possible() is None else "loopback")
    assert f"network:     {state['network']} (" in shown
    assert bool(state["checkip_url"]) is (state["network"] == "vpc")
    assert state["store"] == "plain" and "store:       plain\n" in shown  # images as files
    again = run(daemon, "local", "up")  # idempotent: says where the running one is
    assert state["endpoint_url"] in again.stdout and "already running" in again.stderr
    # `local env` exports the cloud's own random credentials, kept readable by root only
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in run(daemon, "local", "env").stdout.splitlines()
    )
    record = Path(daemon["ASYNCSTAGE_LOCAL_DIR"]) / "cloud.json"
    secret = json.loads(record.read_text())["aws_secret_access_key"]
    assert exports["AWS_SECRET_ACCESS_KEY"] == secret != "asyncstage-local"
    assert record.stat().st_mode & 0o777 == 0o600
    # and where its daemon is: a shell that evaluates the lines finds the cloud with
    # --local, wherever `local up --dir` put it
    assert exports["ASYNCSTAGE_LOCAL_DIR"] == daemon["ASYNCSTAGE_LOCAL_DIR"]
    elsewhere = {k: v for k, v in daemon.items() if k != "ASYNCSTAGE_LOCAL_DIR"}
    script = f'eval "$({EXE} local env --dir "$1")" && exec {EXE} --local servers list'
    shown = subprocess.run(
        ["sh", "-c", script, "sh", daemon["ASYNCSTAGE_LOCAL_DIR"]],
        capture_output=True,
        text=True,
        env=elsewhere,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr


@needs_root
@pytest.mark.localcloud
def test_servers_ssh_volumes_rsync(daemon: dict[str, str], tmp_path: Path) -> None:
    env = daemon
    run(env, "--local", "servers", "provision", "web", "db")
    listed = json.loads(run(env, "servers", "--local", "--json").stdout)
    assert {s["name"] for s in listed} == {"web", "db"}
    assert all(s["state"] == "running" for s in listed)

    assert run(env, "--local", "ssh", "web", "whoami").stdout.strip() == "admin"
    assert run(env, "--local", "ssh", "web", "exit 7", ok=False).returncode == 7
    piped = run(env, "--local", "ssh", "web", "tr a-z A-Z", input="hello\n")
    assert piped.stdout == "HELLO\n"

    run(env, "--local", "volumes", "provision", "mydata", "--server", "web")
    vols = json.loads(run(env, "--local", "--json", "volumes").stdout)
    assert [(v["name"], v["server"], v["mtpt"]) for v in vols] == [
        ("mydata", "web", "/mnt/Staging/mydata")
    ]

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a" * 1000)
    (src / "b.bin").write_bytes(os.urandom(100_000))
    stats = json.loads(run(env, "--local", "--json", "rsync", f"{src}/", "mydata:/copy/").stdout)
    assert stats["files"] == 2 and stats["route"] == "local->host"
    run(env, "--local", "rsync", "mydata:/copy/", "db:/tmp/copied/")  # server to server
    back = tmp_path / "back"
    run(env, "--local", "rsync", "db:/tmp/copied/", f"{back}/")
    assert not filecmp.dircmp(src, back).diff_files
    assert (back / "b.bin").read_bytes() == (src / "b.bin").read_bytes()

    failed = run(env, "--local", "rsync", "nosuch:/x", str(tmp_path), ok=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "asyncstage: error: 'nosuch:/x': no server or volume named 'nosuch' "
        "(write ./nosuch:/x for a local path)"
    ]
    assert run(env, "--local", "ssh", "ghost", "true", ok=False).returncode == 1
    near = run(env, "--local", "ssh", "wbe", "true", ok=False)
    assert near.stderr.strip() == "asyncstage: error: no server named 'wbe' (did you mean 'web'?)"
    cache = Path(env["HOME"]) / ".asyncstage" / "cache"  # for shell completion
    assert (cache / "servers").read_text().split() == ["db", "web"]
    assert "mydata" in (cache / "volumes").read_text().split()

    snap = run(env, "--local", "snapshot", "mydata").stdout.strip()
    assert snap.startswith("snap-")
    run(env, "--local", "volumes", "provision", "copy2", "--server", "db")
    dd = json.loads(run(env, "--local", "--json", "dd", "mydata", "copy2", "--unmount").stdout)
    assert dd["route"] == "dd-host->host" and dd["digest"]

    run(env, "--local", "servers", "stop", "web")
    states = {
        s["name"]: s["state"] for s in json.loads(run(env, "--local", "--json", "servers").stdout)
    }
    assert states == {"web": "stopped", "db": "running"}
    run(env, "--local", "volumes", "delete", "copy2", "mydata")
    run(env, "--local", "servers", "terminate", "--all")
    assert json.loads(run(env, "--local", "--json", "servers").stdout) == []


@needs_root
@pytest.mark.localcloud
def test_backup_and_restore(daemon: dict[str, str], tmp_path: Path) -> None:
    env = daemon
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    for i in range(20):
        (data / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * (i * 100 + 1))
    (data / "big.bin").write_bytes(os.urandom(2_000_000))

    first = json.loads(run(env, "--local", "--json", "backup", "--name", "home", str(data)).stdout)
    assert first["files"] == 21 and first["snapshot_id"].startswith("snap-")
    (data / "docs" / "f0.txt").unlink()
    (data / "new.txt").write_text("new\n")
    second = json.loads(run(env, "--local", "--json", "backup", "--name", "home", str(data)).stdout)
    assert second["files"] == 1  # incremental: only the new file is sent
    snaps = json.loads(run(env, "--local", "--json", "snapshots", "home").stdout)
    assert [s["snapshot_id"] for s in snaps] == [second["snapshot_id"], first["snapshot_id"]]
    volumes = json.loads(run(env, "--local", "--json", "volumes").stdout)
    assert "home" not in [v["name"] for v in volumes]  # the backup volume was deleted

    dest = tmp_path / "restored"
    restored = json.loads(
        run(env, "--local", "--json", "restore", "--name", "home", str(dest)).stdout
    )
    assert restored["snapshot_id"] == second["snapshot_id"]
    assert restored["verified"] == "verified"  # against the manifest, content included
    checked = run(env, "--local", "--json", "backup", "check", "home", "--all", "--read-data")
    found = json.loads(checked.stdout)
    assert [c["snapshot_id"] for c in found] == [second["snapshot_id"], first["snapshot_id"]]
    assert all(c["verified"] and c["files_read"] > 0 for c in found)
    copy = dest / str(data).lstrip("/")
    compare = filecmp.dircmp(data, copy)
    assert not (compare.left_only or compare.right_only or compare.diff_files)
    assert (copy / "big.bin").read_bytes() == (data / "big.bin").read_bytes()
    assert not (copy / "docs" / "f0.txt").exists()

    missing = run(env, "--local", "restore", "--name", "nothing", str(tmp_path / "x"), ok=False)
    assert missing.returncode == 1 and "no backup named 'nothing'" in missing.stderr
    unknown = run(env, "--local", "backup", "check", "nothing", ok=False)
    assert unknown.returncode == 1 and "no backup named 'nothing'" in unknown.stderr

    # the destination must be empty unless --force; / is always refused
    again = run(env, "--local", "restore", "--name", "home", str(dest), ok=False)
    assert again.returncode == 1 and "is not empty" in again.stderr and "--force" in again.stderr
    (copy / "new.txt").write_text("mine\n")
    run(env, "--local", "restore", "--name", "home", str(dest), "--force")
    assert (copy / "new.txt").read_text() == "new\n"
    root = run(env, "--local", "restore", "--name", "home", "/", "--force", ok=False)
    assert root.returncode == 1 and "refusing to restore into /" in root.stderr


@needs_root
@pytest.mark.localcloud
def test_backup_never_touches_a_live_volume_of_its_name(
    daemon: dict[str, str], tmp_path: Path
) -> None:
    """A backup named like a live volume is refused."""
    env = daemon
    (tmp_path / "keep.txt").write_text("precious\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "other.txt").write_text("other\n")
    run(env, "--local", "volumes", "provision", "photos")
    run(env, "--local", "rsync", str(tmp_path / "keep.txt"), "photos:/keep.txt")

    refused = run(env, "--local", "backup", "--name", "photos", str(tmp_path / "dir"), ok=False)
    assert refused.returncode == 1
    assert "a volume named 'photos' exists" in refused.stderr
    bad = run(env, "--local", "backup", "--name", "../x", str(tmp_path / "dir"), ok=False)
    assert bad.returncode == 1 and "invalid backup name '../x'" in bad.stderr

    back = tmp_path / "back"
    run(env, "--local", "rsync", "photos:/", f"{back}/")
    assert (back / "keep.txt").read_text() == "precious\n" and not (back / "other.txt").exists()
    assert json.loads(run(env, "--local", "--json", "snapshots", "photos").stdout) == []
    run(env, "--local", "volumes", "delete", "photos")


PLAN = """
concurrency = 3

[[backup]]
name = "site-web1"
sources = ["web1:/srv/app"]

[[backup]]
name = "docs"
sources = ["{docs}"]

[[backup]]
name = "broken"
sources = ["ghost:/srv/app"]
"""


@needs_root
@pytest.mark.localcloud
def test_backup_plans_each_and_list(daemon: dict[str, str], tmp_path: Path) -> None:
    env = daemon
    run(env, "--local", "servers", "provision", "web1", "web2")
    for web in ("web1", "web2"):
        run(
            env, "--local", "ssh", web, f"sudo sh -c 'mkdir -p /srv/app && echo {web} > /srv/app/i'"
        )
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a\n")

    each = run(
        env,
        "--local",
        "--json",
        "backup",
        "--each",
        "web*",
        "/srv/app",
        "--name-template",
        "site-{server}",
    )
    report = json.loads(each.stdout)
    assert report["ok"] and report["failed"] == []
    assert [(b["name"], b["ok"], b["result"]["files"]) for b in report["backups"]] == [
        ("site-web1", True, 1),
        ("site-web2", True, 1),
    ]
    nomatch = run(env, "--local", "backup", "--each", "db*", "/srv", ok=False)
    assert nomatch.returncode == 1 and "no server matches" in nomatch.stderr

    # one backup of the plan fails: exit 1, every backup in the report, the failure named
    plan = tmp_path / "nightly.toml"
    plan.write_text(PLAN.format(docs=docs))
    failed = run(env, "--local", "--json", "backup", "run", str(plan), ok=False)
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)
    assert not report["ok"] and report["failed"] == ["broken"]
    assert [(b["name"], b["ok"]) for b in report["backups"]] == [
        ("site-web1", True),
        ("docs", True),
        ("broken", False),
    ]
    broken = report["backups"][2]
    assert broken["error_type"] == "NotFound" and "ghost" in broken["error"]
    assert broken["result"] is None
    assert report["backups"][0]["result"]["previous_snapshot_id"] == each_snapshot(each, 0)
    assert "asyncstage: backup broken failed: NotFound: " in failed.stderr
    # without it, the plan succeeds: exit 0, and a human table
    plan.write_text(PLAN.format(docs=docs).split('[[backup]]\nname = "broken"')[0])
    shown = run(env, "--local", "backup", "run", str(plan)).stdout
    assert shown.split("\n")[0].split() == ["BACKUP", "RESULT", "COPIED", "TIME", "SNAPSHOT"]
    assert {line.split()[0] for line in shown.splitlines()[1:]} == {"site-web1", "docs"}

    listed = {
        b["name"]: b for b in json.loads(run(env, "--local", "--json", "backup", "list").stdout)
    }
    assert {n: listed[n]["snapshots"] for n in ("site-web1", "site-web2", "docs")} == {
        "site-web1": 3,
        "site-web2": 1,
        "docs": 2,
    }
    assert "broken" not in listed
    assert listed["docs"]["consistency"] == "crash-consistent"
    # the data of the newest snapshot: the bytes its manifest lists ("a\n"; "web1\n")
    assert (listed["docs"]["data_bytes"], listed["site-web1"]["data_bytes"]) == (2, 5)
    table = run(env, "--local", "backup", "list").stdout.splitlines()
    assert table[0].split()[:5] == ["BACKUP", "LAST", "RUN", "AGE", "DATA"]
    assert json.loads(run(env, "--local", "--json", "volumes").stdout) == []
    run(env, "--local", "servers", "terminate", "--all")


def each_snapshot(done: Any, index: int) -> str:
    return str(json.loads(done.stdout)["backups"][index]["result"]["snapshot_id"])


@needs_root
@pytest.mark.localcloud
def test_local_down_leaves_nothing_behind(daemon: dict[str, str]) -> None:
    state = json.loads(run(daemon, "local", "status", "--json").stdout)
    local = Path(daemon["ASYNCSTAGE_LOCAL_DIR"])
    run(daemon, "local", "down")
    assert run(daemon, "local", "status", ok=False).returncode == 3
    assert not _alive(int(state["pid"]))
    assert not (local / "cloud.json").exists() and not (local / "state").exists()
    assert str(local) not in Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(local) not in loops
    run(daemon, "local", "down")  # idempotent
    shutil.rmtree(local, ignore_errors=True)
