"""Test-suite wide set-up: the loopback-only network guard, the shared fixtures, the layers.

The shared fixtures live in tests/fixtures/ and are registered here, once, with
``pytest_plugins``: test modules name them as arguments and never import them (an
imported fixture is a new fixture of the importing module, so a session-scoped one
would start again for every module that imports it).

Layers: a test that uses the local cloud is marked ``localcloud`` and one that uses an
sshd is marked ``sshd`` (from the fixtures it requests, or by hand); everything else is
the unit layer, which needs no root: ``make test-unit`` (``-m "not localcloud and not
sshd"``) runs it alone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests import netguard

pytest_plugins = ["tests.fixtures.cloud", "tests.fixtures.sshd", "tests.fixtures.moto"]

netguard.install()

# No AWS account is ever used: make sure nothing falls back to real credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, the library's loop."""
    return "asyncio"


# Fixtures that put a test in a layer, whatever its module's marks say.
_LAYER_FIXTURES = {
    "localcloud": {"cloud", "manager_factory"},
    "sshd": {"client_key", "sshd_server", "fresh_sshd", "sshd_factory"},
}


# The modules that take longest (from --durations on 2 cores), longest first. With
# `--dist loadscope --no-loadscope-reorder` (make test) each module goes whole to one worker
# in this order, so no worker is handed a long module when the others are nearly done: a
# module missing here is handed out in file-name order, late, and a long one then ends the
# run alone. The benchmark groups (each runs its scripts' quick mode in its first test) go
# between the long test modules: spread over the workers, not queued behind each other.
_LONGEST_FIRST = (
    "test_cli.py",
    "test_localcloud_snapshots.py",
    "test_benchmarks_quick.py",
    "test_safety_faults.py",
    "test_benchmarks_quick_fleets.py",
    "test_backup_faults.py",
    "test_benchmarks_quick_backups.py",
    "test_first_use.py",
    "test_realism_consistency.py",
    "test_localcloud_isolation.py",
    "test_localcloud_wire.py",
    "test_benchmarks_quick_baselines.py",
    "test_backup_runs.py",
    "test_demo.py",
    "test_manager_moto.py",
    "test_backup_check.py",
    "test_hostile.py",
    "test_volume.py",
    "test_transfer_cloud.py",
    "test_manager.py",
    "test_backup.py",
    "test_backup_keep_regions.py",
    "test_localcloud.py",
    "test_request_rate.py",
    "test_transfer_hosts.py",
    "test_remote_blockcopy.py",
    "test_jump.py",
    "test_network_library.py",
    "test_realism_devices.py",
    "test_blocking.py",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _LAYER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fail any test that tried a non-loopback connection, even if it was caught."""
    before = len(netguard.violations)
    yield
    tried = netguard.violations[before:]
    if tried:
        pytest.fail(f"test tried non-loopback connections: {tried}")


# -- nothing left behind -------------------------------------------------------------------
# After the whole session (session fixtures included) no loop device, mount, device cgroup
# (with its BPF program), network namespace, link, route or process that the tests made
# may remain: compared with what the
# machine had before. Loop devices, mounts and cgroups are machine-wide, so they are
# compared only when a local-cloud test ran (the unit layer may run without the test
# lock, beside another run that makes them), and, when the tests run in parallel workers
# (pytest-xdist), only by the controller once every worker has ended: a worker would see
# its siblings' clouds. Each worker still checks its own processes.


def _loop_devices() -> set[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    return {line.split(":", 1)[0] for line in out.stdout.splitlines() if line.strip()}


def _mounts() -> set[str]:
    """The machine's mounts, but iproute2's own /run/netns: the first ``ip netns add`` on a
    machine binds that directory onto itself and no ``ip netns`` command ever undoes it,
    so on a fresh machine the first run would take it for a cloud's leftover. The
    namespaces mounted in it are still compared, here and by :func:`_cloud_network`."""
    from asyncstage.localcloud._netns import NETNS_DIR

    with open("/proc/mounts") as f:
        found = {" ".join(line.split()[:3]) for line in f}
    return {m for m in found if m.split()[1] != str(NETNS_DIR)}


def _cloud_cgroups() -> set[str]:
    """The local clouds' device cgroups (v1 devices controller, v2 hierarchy)."""
    from asyncstage.localcloud._isolation import DEVICES_V1, cgroup2_mount

    found: set[str] = set()
    for hierarchy in (DEVICES_V1, cgroup2_mount()):
        if hierarchy is not None and hierarchy.is_dir():
            found |= {str(p) for p in hierarchy.glob("asyncstage-localcloud-*")}
    return found


def _cloud_network() -> set[str]:
    """The local clouds' namespaces, machine links and unreachable routes."""
    from asyncstage.localcloud._network import netns_names

    found = {f"netns {n}" for n in netns_names()}
    with contextlib.suppress(OSError):
        found |= {f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith("asl")}
    routes = subprocess.run(
        ["ip", "route", "show", "type", "unreachable"], capture_output=True, text=True, check=False
    )
    return found | {f"route {line.strip()}" for line in routes.stdout.splitlines()}


def _descendants() -> set[str]:
    """Processes below this one (by parent pid), as 'pid cmdline'."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: set[str] = set()
    todo = [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            found.add(f"{pid} {cmd}")
    return found


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _is_controller(config: pytest.Config) -> bool:
    """The process that hands tests to pytest-xdist workers and runs none itself."""
    return not _is_worker(config) and getattr(config.option, "numprocesses", None) not in (
        None,
        0,
    )


_before: dict[str, set[str]] = {}
_ran_localcloud: list[bool] = []
_workers_left: list[str] = []  # what workers reported left behind (controller only)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        _before["loop"] = _loop_devices()
        _before["mounts"] = _mounts()
        _before["cgroups"] = _cloud_cgroups()
        _before["network"] = _cloud_network()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Reports reach the controller from its workers too: it learns here whether any
    # local-cloud test ran (its own session holds no items).
    if report.when == "call" and "localcloud" in report.keywords:
        _ran_localcloud.append(True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """(pytest-xdist, controller) A worker ended: keep what it reported left behind."""
    text = getattr(node, "workeroutput", {}).get("left_behind")
    if text:
        _workers_left.append(f"{node.gateway.id}: {text}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    left: dict[str, set[str]] = {}
    if _workers_left:
        left["in workers"] = set(_workers_left)
    if not _is_controller(config):
        left["processes"] = _descendants()
    if _before and (
        _ran_localcloud or any(item.get_closest_marker("localcloud") for item in session.items)
    ):
        left["loop devices"] = _loop_devices() - _before["loop"]
        left["mounts"] = _mounts() - _before["mounts"]
        left["device cgroups"] = _cloud_cgroups() - _before["cgroups"]
        left["network"] = _cloud_network() - _before["network"]
    left = {what: items for what, items in left.items() if items}
    if left:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        text = "; ".join(f"{what}: {sorted(items)}" for what, items in left.items())
        if _is_worker(config):  # the controller reports it and fails the run
            config.workeroutput["left_behind"] = text  # type: ignore[attr-defined]
        if reporter is not None:
            reporter.write_line(
                f"LEFT BEHIND by the tests: {text} (loop devices and mounts are compared "
                "machine-wide: another test run or local cloud running meanwhile shows here too)",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
