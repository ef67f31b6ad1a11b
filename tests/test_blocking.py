"""The blocking facade: twin coverage (no cloud) and end to end on the shared local cloud."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncstage import Manager as AsyncManager
from asyncstage import Server as AsyncServer
from asyncstage import Volume, backup, blocking
from asyncstage.errors import CommandFailed
from asyncstage.localcloud import LocalCloud as AsyncLocalCloud
from asyncstage.settings import ManagerKeywords

PAIRS = [
    (AsyncManager, blocking.Manager),
    (AsyncServer, blocking.Server),
    (Volume, blocking.Volume),
    (AsyncLocalCloud, blocking.LocalCloud),
]
_OBJECT_TYPES = re.compile(r"\b(Server|Volume|Manager)\b")
_PUBLIC_DUNDERS = ("__truediv__", "__fspath__")


def _public_members(cls: type[Any]) -> dict[str, Any]:
    """Public methods and properties of a class, with its public operator methods."""
    found = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in _PUBLIC_DUNDERS:
            continue
        if name.startswith("__") and not any(name in vars(k) for k in cls.__mro__[:-1]):
            continue
        if callable(member) or isinstance(member, property):
            found[name] = member
    return found


def missing_twins(async_cls: type[Any], blocking_cls: type[Any]) -> list[str]:
    """What the blocking class lacks or gets wrong, one line per problem."""
    problems = []
    label = next(c.__name__ for c in blocking_cls.__mro__ if c.__module__ == blocking.__name__)
    skip = blocking.NOT_TWINNED.get(label, {})
    for name, member in _public_members(async_cls).items():
        if name in skip:
            continue
        twin = inspect.getattr_static(blocking_cls, name, None)
        if twin is None:
            problems.append(f"{label}.{name}: no blocking twin")
            continue
        if isinstance(member, property):
            if not isinstance(twin, property):
                problems.append(f"{label}.{name}: should be a property")
            continue
        if isinstance(twin, blocking._Twin):
            if _OBJECT_TYPES.search(
                str(inspect.signature(twin.func).replace(return_annotation=""))
            ):
                problems.append(
                    f"{label}.{name}: takes servers/volumes/managers; write "
                    "it out so that its types name the blocking classes"
                )
            continue
        if not callable(twin):
            problems.append(f"{label}.{name}: not a method")
            continue
        want = [(p.name, p.kind) for p in inspect.signature(member).parameters.values()]
        have = [(p.name, p.kind) for p in inspect.signature(twin).parameters.values()]
        if want != have:
            problems.append(f"{label}.{name}: parameters {have} != async {want}")
    return problems


@pytest.mark.parametrize(("async_cls", "blocking_cls"), PAIRS, ids=lambda c: c.__name__)
def test_every_public_async_member_has_a_blocking_twin(
    async_cls: type[Any], blocking_cls: type[Any]
) -> None:
    assert missing_twins(async_cls, blocking_cls) == []


def test_the_coverage_check_catches_methods_added_later() -> None:
    class Later(Volume):
        async def archive(self, dest: str) -> None: ...

        def __fspath__(self) -> str:
            return ""

    class Grown(AsyncServer):
        async def clone(self, source: Volume) -> None: ...

    assert missing_twins(Later, blocking.Volume) == [
        "Volume.__fspath__: no blocking twin",
        "Volume.archive: no blocking twin",
    ]

    class Lazy(blocking.Server):
        clone = blocking._twin(Grown.clone)

    assert missing_twins(Grown, Lazy) == [
        "Server.clone: takes servers/volumes/managers; write it out so that its types name "
        "the blocking classes"
    ]


def test_constructor_options_follow_the_async_classes() -> None:
    """The Manager's options: its named parameters and the settings it takes one by one."""
    params = inspect.signature(AsyncManager.__init__).parameters
    named = set(params) - {"self", "settings"}
    assert params["settings"].kind is inspect.Parameter.VAR_KEYWORD
    one_by_one = set(ManagerKeywords.__annotations__)
    assert set(blocking.ManagerOptions.__annotations__) == named | one_by_one
    cloud_params = inspect.signature(AsyncLocalCloud.__init__).parameters
    assert list(blocking.LocalCloudOptions.__annotations__) == list(cloud_params)[1:]


@pytest.fixture
def bmanager(manager_factory: Any) -> Iterator[blocking.Manager]:
    with blocking.Manager.from_async(manager_factory()) as m:
        yield m


@pytest.mark.localcloud
def test_end_to_end(bmanager: blocking.Manager) -> None:
    m = bmanager
    s = m.get_server("blocking-a")
    assert isinstance(s, blocking.Server)
    assert m.get_server("blocking-a") is s and m.servers() == [s]
    assert s.manager is m and str(s) == s.instance_id and s.state == "running"
    assert s.scmd("whoami").strip() == "admin"

    # every public instance attribute of the async objects is reachable on the twins
    skip = blocking.NOT_TWINNED["Server"]
    for name in vars(s._async):
        if not name.startswith("_") and name not in skip:
            assert hasattr(s, name), f"blocking.Server lacks {name}"

    with s.scmd_read("seq", "1", "20000") as f:
        assert f.readline() == "1\n"
        lines = list(f)
    assert len(lines) == 19999 and lines[-1] == "20000\n"
    with s.scmd_read("printf 'a\\nbb\\nccc'") as f:
        assert f.readlines() == ["a\n", "bb\n", "ccc"]
    with s.scmd_read("head -c 200000 /dev/zero", encoding=None) as fb:
        first = fb.read(10)
        rest = fb.read()
    assert first == b"\0" * 10 and len(first) + len(rest) == 200000
    with pytest.raises(CommandFailed), s.scmd_read("echo x; exit 3") as f:
        assert f.read() == "x\n"

    with s.scmd_write("cat > /tmp/blocking.txt") as w:
        w.write("first\n")
        w.writelines(f"{i}\n" for i in range(10000))
    assert s.scmd("wc -l < /tmp/blocking.txt").strip() == "10001"
    with s.scmd_write("cat > /tmp/blocking.bin", encoding=None) as wb:
        wb.write(bytes(range(256)) * 1000)
    assert s.scmd("stat -c %s /tmp/blocking.bin").strip() == "256000"
    with s.scmd_write("wc -c") as w:
        w.write("four")
    assert w.output.strip() == "4"
    w = s.scmd_write("read x; exit 4")
    w.write("hello\n")
    with pytest.raises(CommandFailed):
        w.close()
    assert w.closed
    with pytest.raises(ValueError), s.scmd_write("cat > /tmp/never") as w:
        w.write("partial")
        raise ValueError("the block failed: the command is stopped, not fed EOF")
    assert s.run("test -e /tmp/never", check=False).exit_status in (0, 1)

    v = s.provision_volume("blocking-data", size=1)
    assert isinstance(v, blocking.Volume) and v.server is s and v.mounted
    assert m.find_volume_by_name("blocking-data") is v and s.volumes() == [v]
    v.mkdir("sub")
    assert "sub" in v.ls()
    s.unmount_volume(v)
    assert not v.mounted
    v.mount(s)
    assert v.mounted and v.mtpt == s.default_mtpt(v)
    for name in vars(v._async):
        if not name.startswith("_"):
            assert hasattr(v, name), f"blocking.Volume lacks {name}"

    # from two threads at once: commands on one server, and a second server
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(key: str, name: str) -> None:
        try:
            results[key] = m.get_server(name).scmd("hostname").strip()
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=("one", "blocking-a")),
        threading.Thread(target=worker, args=("two", "blocking-b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results["one"] != results["two"]
    assert {x.name for x in m.servers()} == {"blocking-a", "blocking-b"}


@pytest.mark.localcloud
def test_a_script_runs_backups_through_call(bmanager: blocking.Manager, tmp_path: Path) -> None:
    # the backup package is async functions: a plain script runs them with blocking.call,
    # its blocking manager passed as it is (the guide's example)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    ec2 = bmanager.async_object.ec2
    try:
        done = blocking.call(backup.backup, bmanager, "blocking-bk", [src])
        assert done.files == 1 and done.previous_snapshot_id is None
        plan = backup.Plan((backup.PlannedBackup("blocking-bk", (str(src),)),))
        report = blocking.call(backup.run_plan, bmanager, plan)
        assert report.ok
        assert report.outcomes[0].result["previous_snapshot_id"] == done.snapshot_id
        (checked,) = blocking.call(backup.check, bmanager, "blocking-bk", read_data=True)
        assert checked.verified
        restored = blocking.call(backup.restore, bmanager, "blocking-bk", tmp_path / "out")
        assert restored.files == 1
        assert (tmp_path / "out" / src.relative_to("/") / "a.txt").read_text() == "a\n"
    finally:  # the backups' snapshots: nothing of the test left in the session's cloud
        for snap in bmanager.snapshots("blocking-bk"):
            blocking.call(ec2.delete_snapshot, snap["SnapshotId"])
    assert bmanager.snapshots("blocking-bk") == [] and bmanager.volumes() == []


def _credentials(running: Any) -> dict[str, str]:
    return {k: v for k, v in running.session_kwargs().items() if k.startswith("aws_")}


@pytest.mark.localcloud
def test_on_exit_applies_at_interpreter_exit(cloud: Any, cloud_dotdir: Path) -> None:
    """A script that never closes its Manager: on_exit still runs when Python exits."""
    script = textwrap.dedent(
        f"""
        from asyncstage import blocking
        m = blocking.Manager(
            region={cloud.region!r}, endpoint_url={cloud.endpoint_url!r},
            **{_credentials(cloud)!r}, image={cloud.image_id!r},
            username={cloud.default_username!r}, install_packages=False, root_type=None,
            dotdir={str(cloud_dotdir)!r}, scan=False, poll_interval=0.2, on_exit="terminate",
            checkip_url={cloud.checkip_url or None!r},
        )
        s = m.get_server("blocking-atexit")
        print(s.instance_id, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    instance_id = done.stdout.strip()
    with blocking.Manager(
        region=cloud.region,
        endpoint_url=cloud.endpoint_url,
        **_credentials(cloud),
        dotdir=cloud_dotdir,
        scan=False,
        on_exit="run",
    ) as m:
        found = blocking.call(m.async_object.ec2.describe_instances, [instance_id])
    assert [i["State"]["Name"] for i in found] == ["terminated"]


@pytest.mark.localcloud
def test_a_script_that_closes_nothing_leaves_nothing(tmp_path: Path) -> None:
    """Its own cloud and manager, never closed: at exit the manager's on_exit runs while
    the cloud still works, then the cloud goes, with everything it made."""
    if os.geteuid() != 0:
        pytest.skip("the local cloud needs root")
    script = textwrap.dedent(
        f"""
        from asyncstage import blocking
        cloud = blocking.LocalCloud()
        m = cloud.manager(
            on_exit="terminate", dotdir={str(tmp_path / "dot")!r}, scan=False, poll_interval=0.2
        )
        m.get_server("left-open").provision_volume("data", size=1)
        print(cloud.state_dir, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "at exit" not in done.stderr, done.stderr
    state_dir = done.stdout.strip()
    assert state_dir and not Path(state_dir).exists()
    assert state_dir not in Path("/proc/mounts").read_text()
