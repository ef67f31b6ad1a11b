"""The command line builds its parser without the library's heavy parts.

``asyncstage --help``, ``--version``, ``config show`` and every usage error run only the
parser: the Manager (aioboto3, asyncssh), the backup package and the local cloud (moto)
are imported by the commands that use them. Each check runs in a fresh interpreter, since
this one has imported them long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.daemon import ROOT

HEAVY = (
    "aioboto3",
    "asyncssh",
    "moto",
    "asyncstage.manager",
    "asyncstage.backup",
    "asyncstage.blocking",
    "asyncstage.cli.backup",
    "asyncstage.localcloud._cloud",
    "asyncstage.transfer",
    "rich.console",  # drawing on a terminal: imported where a command draws
)


def _loaded_after(code: str) -> list[str]:
    """Which of ``HEAVY`` a fresh interpreter has imported after running ``code``."""
    report = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"{code}\nimport json, sys\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "code",
    [
        "from asyncstage.cli import build_parser; build_parser().format_help()",
        "from asyncstage.cli import build_parser\n"
        "p = build_parser()\n"
        "sub = p._subparsers._group_actions[0].choices\n"  # the subcommands' own --help
        "[s.format_help() for s in sub.values()]",
        "import asyncstage.cli.commands, asyncstage.cli.common, asyncstage.cli.daemon",
    ],
    ids=["help", "subcommand-help", "command-modules"],
)
def test_parser_imports_nothing_heavy(code: str) -> None:
    assert _loaded_after(code) == []


def test_local_cloud_errors_without_the_cloud() -> None:
    assert _loaded_after("from asyncstage.localcloud.errors import LocalCloudError") == []


def test_local_cloud_names_still_import() -> None:
    code = (
        "import asyncstage.localcloud as lc\n"
        "from asyncstage.localcloud import LocalCloud, Realism, StateDirInUse\n"
        "assert lc.LocalCloud is LocalCloud and lc.Realism is Realism\n"
        "assert {'LocalCloud', 'Realism', 'StateDirInUse'} <= set(dir(lc))"
    )
    assert "asyncstage.localcloud._cloud" in _loaded_after(code)


def test_backup_command_imports_its_parts_when_run() -> None:
    code = "from asyncstage.cli import commands, backup"
    loaded = set(_loaded_after(code))
    assert {"asyncstage.backup", "asyncstage.cli.backup", "asyncstage.manager"} <= loaded


@pytest.mark.parametrize("fancy", [False, True])
def test_output_draws_with_rich_only_when_asked(fancy: bool) -> None:
    code = (
        "from asyncstage.output import Output\n"
        f"out = Output(json_output=False, quiet=False, verbose=0, fancy={fancy})\n"
        "out.table([], [[1]], ['n'], '')"
    )
    assert ("rich.console" in _loaded_after(code)) is fancy


def test_library_imports_without_the_local_extra() -> None:
    # What a wheel installed without `[local]` has: moto and what it brings are absent.
    code = (
        "import sys\n"
        "for name in ('moto', 'yaml', 'werkzeug', 'flask'):\n"
        "    sys.modules[name] = None\n"
        "import asyncstage, asyncstage.blocking, asyncstage.cli\n"
        "from asyncstage.localcloud import LocalCloud"
    )
    assert "asyncstage.blocking" in _loaded_after(code)
