"""``asyncstage backup check NAME [--snapshot ID | --all] [--read-data]``: check backups
against their manifests (:func:`asyncstage.backup.check`).

Exit status: 0 when nothing differs, 1 when a file is missing, changed, extra or damaged
in any checked snapshot, or a recorded manifest cannot be trusted. A snapshot with no
manifest (a ``snapshot``-mode set, or one made before manifests) is said to be not
verified, and does not fail the check.
"""

from __future__ import annotations

import argparse
import sys

from asyncstage import backup, blocking
from asyncstage.cli.common import EXIT_FAILURE, EXIT_OK, open_manager, phase_notes
from asyncstage.errors import InvalidArgument
from asyncstage.output import Output, human_bytes

__all__ = ["check_command"]


def check_command(args: argparse.Namespace, out: Output, rest: list[str]) -> int:
    """``backup check NAME``: one line per snapshot, and the findings on stderr."""
    if len(rest) != 1:
        raise InvalidArgument("backup check: name one backup (backup check NAME)")
    if args.snapshot and args.all_snapshots:
        raise InvalidArgument("backup check: give --snapshot or --all, not both")
    with open_manager(args) as m, out.transfer(f"check {rest[0]}") as progress:
        results = blocking.call(
            backup.check,
            m,
            rest[0],
            snapshot_id=args.snapshot,
            all_snapshots=args.all_snapshots,
            read_data=args.read_data,
            phase=phase_notes(out, progress),
        )
    for r in results:
        _findings(r)
    rows = [
        [
            r.snapshot_id,
            "FAILED" if r.failed else "ok" if r.verified else "not verified",
            r.entries,
            human_bytes(r.bytes_read) if r.read_data else "-",
            r.summary(),
        ]
        for r in results
    ]
    out.table(
        [r.as_dict() for r in results], rows, ["SNAPSHOT", "RESULT", "ENTRIES", "READ", ""], ""
    )
    return EXIT_FAILURE if any(r.failed for r in results) else EXIT_OK


def _findings(r: backup.CheckResult) -> None:
    """Each finding (the first of each kind) on stderr, for people and logs alike."""
    lines = [f"missing: {p}" for p in r.missing]
    lines += [f"changed: {c.get('path')} ({', '.join(c.get('fields', []))})" for c in r.changed]
    lines += [f"extra: {p}" for p in r.extra]
    lines += [f"damaged: {d.get('path')} ({d.get('error')})" for d in r.damaged]
    for line in lines:
        print(f"asyncstage: {r.snapshot_id}: {line}", file=sys.stderr)
    shown = len(lines)
    total = sum(r.counts.values())
    if total > shown:
        print(f"asyncstage: {r.snapshot_id}: ... {total - shown} more", file=sys.stderr)
