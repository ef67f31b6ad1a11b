"""The ``backup`` command's options, apart from the code that runs it.

The parser needs only these; :mod:`asyncstage.cli.backup` and its helpers import the
backup package, the Manager (aioboto3, asyncssh) and rich's live display, most of a second
of CPU that ``--help``, ``--version`` and every other command would otherwise pay.
"""

from __future__ import annotations

import argparse

from asyncstage.cli.common import ignored_options

__all__ = ["ACTIONS", "HELP", "KEEP_RULES", "add_arguments", "unused_options"]

HELP = "incremental backup of any sources into a snapshot; `backup sweep` removes leftovers"
ACTIONS = ("run", "list", "sweep", "check", "forget")
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``backup`` command's arguments."""
    p.add_argument("--name", help="the backup's name (snapshots carry it); else an action")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE",
        help="PATH, SERVER:/path, user@host:/path, VOLUME: or VOLUME:/sub; "
        "without --name: sweep [NAME...]",
    )
    p.add_argument("--size", type=int, help="volume GiB (default: from the data, with room)")
    p.add_argument("--zone", help="availability zone")
    p.add_argument("--each", metavar="PATTERN", help="one backup per server matching PATTERN")
    p.add_argument(
        "--name-template",
        default="{server}",
        help="with --each: the backups' names (default '{server}')",
    )
    p.add_argument(
        "--concurrency", type=int, help="backups at once (run, --each; default: the plan's, 4)"
    )
    p.add_argument(
        "--wait",
        type=float,
        help="seconds to wait for another run of the same backup (--name, --each, run; "
        "default: refuse at once, or the plan's)",
    )
    p.add_argument(
        "--keep-volume",
        action="store_true",
        help="keep the work volume for the next run (an EBS volume billed between runs; "
        "reruns copy only the change)",
    )
    _check_arguments(p)
    _keep_arguments(p)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``backup check`` (on the ``backup`` command)."""
    p.add_argument("--snapshot", help="check: this snapshot of the backup (default: the newest)")
    p.add_argument(
        "--all", action="store_true", dest="all_snapshots", help="check: every complete snapshot"
    )
    p.add_argument(
        "--read-data", action="store_true", help="check: also read and hash every file's content"
    )


def _keep_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``backup forget`` and ``backup list --copy-region``."""
    g = p.add_argument_group("forget (retention, restic's --keep-* rules)")
    for rule in KEEP_RULES:
        g.add_argument(
            f"--keep-{rule}",
            metavar="N",
            help=f"keep the newest {rule if rule == 'last' else rule + ' snapshot'} "
            + ("N" if rule == "last" else "of each of the last N periods"),
        )
    g.add_argument(
        "--keep-within",
        metavar="DURATION",
        help="keep every snapshot within DURATION (1y2m3d4h) of the newest",
    )
    g.add_argument("--dry-run", action="store_true", help="decide and print, delete nothing")
    p.add_argument(
        "--copy-region",
        action="append",
        default=[],
        metavar="REGION",
        help="backup list: also list REGION's backups (copies); repeatable",
    )


_NAMED, _EACH = "backup --name", "backup --each"
# the forms of the command that read each option (the rest never look at it)
_USED_BY: dict[str, tuple[str, ...]] = {
    "size": (_NAMED, _EACH),
    "zone": (_NAMED, _EACH),
    "keep_volume": (_NAMED, _EACH),
    "name_template": (_EACH,),
    "concurrency": (_EACH, "backup run"),
    "wait": (_NAMED, _EACH, "backup run"),
    "snapshot": ("backup check",),
    "all_snapshots": ("backup check",),
    "read_data": ("backup check",),
    **{f"keep_{rule}": ("backup forget",) for rule in (*KEEP_RULES, "within")},
    "dry_run": ("backup forget",),
    "copy_region": ("backup list",),
}


def unused_options(args: argparse.Namespace, form: str) -> list[str]:
    """The options given that ``form`` (``--name``, ``--each`` or an action) ignores, each
    with the forms that use it: a ``--keep-last`` given to a backup would otherwise be
    dropped in silence, and its snapshots kept."""
    return ignored_options(
        args,
        f"backup {form}",
        _USED_BY,
        defaults={"name_template": "{server}"},
        flags={"all_snapshots": "--all"},
    )
