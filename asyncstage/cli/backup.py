"""The ``asyncstage backup`` command: one backup of any sources, or an action on backups.

``asyncstage backup --name NAME SOURCE...`` backs the sources up (local paths,
``SERVER:/path``, ``user@host:/path``, ``VOLUME:`` or ``VOLUME:/sub``);
``asyncstage backup --each 'web*' /srv/app`` backs up each matching server (one backup
per server, named from ``--name-template``). Without ``--name`` or ``--each`` the first
word is an action:

- ``asyncstage backup run PLAN``: every backup of a TOML plan at once (exit 1 when any
  failed, the failures named);
- ``asyncstage backup list``: each backup's last run, age, size, snapshots, consistency,
  and the volume kept for its next run (``--keep-volume``);
- ``asyncstage backup sweep [NAME...]``: remove what dead runs left (work volumes,
  unfinished snapshots, leases);
- ``asyncstage backup check NAME [--snapshot ID | --all] [--read-data]``: check snapshots
  against their manifests (:mod:`asyncstage.cli.backup_check`).
- ``asyncstage backup forget NAME... --keep-*``: retention (:mod:`.backup_keep`).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from rich.live import Live
from rich.table import Table

from asyncstage import backup, blocking
from asyncstage.adoption import ours
from asyncstage.backup.keep import copy_of
from asyncstage.backup.manifest import data_bytes
from asyncstage.backup.snapshots import consistency_of, is_backup
from asyncstage.backup.warm import KEPT_TAG, holds_newest
from asyncstage.cli import backup_check
from asyncstage.cli.backup_keep import (
    forget_command,
    plan_regions,
    region_managers,
    run_plan_in_regions,
)
from asyncstage.cli.backup_options import ACTIONS, unused_options
from asyncstage.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    open_manager,
    refuse_ignored,
    with_progress,
)
from asyncstage.ec2 import tag, tags_of
from asyncstage.errors import InvalidArgument
from asyncstage.output import Output, human_bytes, human_duration

__all__ = ["backup_command"]


def backup_command(args: argparse.Namespace, out: Output) -> int:
    """``asyncstage backup``: a backup with ``--name``, else the action named first."""
    form = "--each" if args.each is not None else "--name" if args.name is not None else ""
    form = form or (args.paths[0] if args.paths[0] in ACTIONS else "")
    if form:
        unused = unused_options(args, form)
        retention = any(u.startswith("--keep-") for u in unused)
        hint = " (retention: `backup forget NAME --keep-...`, or a plan's retention)"
        refuse_ignored(unused, f"backup {form}", hint if retention else "")
    if args.each is not None:
        return _each(args, out)
    if args.name is None:
        action, rest = args.paths[0], args.paths[1:]
        if action == "sweep":
            return _sweep(args, out, rest)
        if action == "list":
            return _list(args, out)
        if action == "check":
            return backup_check.check_command(args, out, rest)
        if action == "forget":
            return forget_command(args, out, rest)
        if action == "run" and len(rest) == 1:
            return _run_plan(args, out, backup.load_plan(rest[0]))
        raise InvalidArgument(
            f"backup: give --name NAME to back up {action!r}, or an action: {', '.join(ACTIONS)}"
        )
    with open_manager(args) as m:
        result = with_progress(
            out,
            f"backup {args.name}",
            backup.backup,
            m,
            args.name,
            args.paths,
            size=args.size,
            zone=args.zone,
            wait=args.wait or 0.0,
            keep_volume=args.keep_volume,
        )
        swept = f", {len(result.swept)} leftovers of dead runs removed" if result.swept else ""
        out.result(
            result.as_dict(),
            f"backup {result.name}: {result.snapshot_id} ({human_bytes(result.bytes)} "
            f"copied, {result.files} files, {result.elapsed:.1f}s{swept})",
        )
        return EXIT_OK


def _sweep(args: argparse.Namespace, out: Output, names: list[str]) -> int:
    with open_manager(args) as m:
        results = [blocking.call(backup.sweep, m, n) for n in names] or [
            blocking.call(backup.sweep, m)
        ]
    done = backup.SweepResult()
    for r in results:
        for key in ("volumes", "snapshots", "leases", "kept", "refused", "kept_volumes"):
            getattr(done, key).extend(getattr(r, key))
    if done.refused:
        out.note(
            "left alone (run tags that do not parse, not made by a run): " + ", ".join(done.refused)
        )
    out.result(
        done.as_dict(),
        f"swept: {len(done.volumes)} work volumes, {len(done.snapshots)} unfinished "
        f"snapshots, {len(done.leases)} dead leases; kept {len(done.kept)} of live runs"
        + (f", {len(done.kept_volumes)} kept volumes" if done.kept_volumes else ""),
    )
    return EXIT_OK


def _each(args: argparse.Namespace, out: Output) -> int:
    """``--each PATTERN PATH...``: a plan of one backup per matching server."""
    with open_manager(args) as m:
        servers = sorted(
            (s for s in m.servers() if fnmatch.fnmatchcase(s.name, args.each)),
            key=lambda s: s.name,
        )
        if not servers:
            raise InvalidArgument(f"backup --each {args.each!r}: no server matches")
        planned = [
            backup.PlannedBackup(
                name=_template(args.name_template, s.name),
                sources=tuple(f"{s.name}:{p}" for p in args.paths),
                size=args.size,
                zone=args.zone,
                keep_volume=args.keep_volume,
            )
            for s in servers
        ]
        plan = backup.Plan(tuple(planned), concurrency=args.concurrency or 4, wait=args.wait or 0.0)
        return _report(out, _run_with_table(m, plan, out))


def _template(template: str, server: str) -> str:
    try:
        return template.format(server=server)
    except (KeyError, IndexError, ValueError) as e:
        raise InvalidArgument(f"--name-template {template!r}: only {{server}} is known") from e


def _run_plan(args: argparse.Namespace, out: Output, plan: backup.Plan) -> int:
    if args.concurrency or args.wait is not None:  # the command line's over the plan's
        plan = backup.Plan(
            plan.backups,
            concurrency=args.concurrency or plan.concurrency,
            wait=plan.wait if args.wait is None else args.wait,
        )
    with open_manager(args) as m, region_managers(args, plan_regions(plan)) as others:
        return _report(out, _run_with_table(m, plan, out, others))


def _run_with_table(
    m: blocking.Manager,
    plan: backup.Plan,
    out: Output,
    others: list[blocking.Manager] | None = None,
) -> backup.PlanReport:
    """Run the plan; a live table (phase, bytes, rate, ETA) on a terminal meanwhile."""
    rows: dict[str, backup.BackupOutcome] = {}
    lock = threading.Lock()

    def changed(o: backup.BackupOutcome) -> None:
        with lock:
            rows[o.name] = o

    def render() -> Table:
        t = Table("BACKUP", "PHASE", "BYTES", "RATE", "ETA", "ELAPSED")
        with lock:
            shown = [rows.get(b.name) for b in plan.backups]
        now = time.monotonic()
        for b, o in zip(plan.backups, shown, strict=True):
            if o is None:
                t.add_row(b.name, "waiting", "", "", "", "")
                continue
            eta = o.eta
            running = o.elapsed if o.ok is not None else now - (o.started or now)
            t.add_row(
                o.name,
                o.phase if o.ok is not False else f"failed: {o.error_type}",
                human_bytes(o.bytes_done),
                f"{human_bytes(o.rate)}/s" if o.rate else "",
                human_duration(eta) if eta is not None else "",
                human_duration(running) if o.started else "",
            )
        return t

    regions = others or []  # a manager of each region the plan copies to
    if not out.live:
        return blocking.call(run_plan_in_regions, m, plan, regions, on_change=changed)
    with Live(get_renderable=render, refresh_per_second=4, transient=True, console=None):
        return blocking.call(run_plan_in_regions, m, plan, regions, on_change=changed)


def _report(out: Output, report: backup.PlanReport) -> int:
    rows = [
        [
            o.name,
            "ok" if o.ok else f"FAILED ({o.error_type})",
            human_bytes(int(o.result.get("bytes", 0))),
            f"{o.elapsed:.1f}s",
            o.result.get("snapshot_id") or " ".join(o.result.get("snapshots", {}).values()),
        ]
        for o in report.outcomes
    ]
    if out.json:
        out.result(report.as_dict())
    elif not out.quiet:
        out.table(report.as_dict(), rows, ["BACKUP", "RESULT", "COPIED", "TIME", "SNAPSHOT"], "")
    for o in report.failed:
        print(f"asyncstage: backup {o.name} failed: {o.error_type}: {o.error}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE


def _list(args: argparse.Namespace, out: Output) -> int:
    """Each backup (complete snapshots only): last run, age, the newest one's data (what
    its manifest lists) and volume size, count, consistency; with
    ``--copy-region``, each of those regions' too (a REGION column)."""
    with open_manager(args) as m, region_managers(args, args.copy_region) as others:
        listed = [(x.region, blocking.call(_backup_snapshots, x)) for x in [m, *others]]
        kept = blocking.call(_kept_volumes, m)
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for region, snaps in listed:
        for snap in snaps:
            name = tags_of(snap).get(tag("name"))
            if name:
                found.setdefault((name, region), []).append(snap)
    now = datetime.now(UTC)
    data: list[dict[str, Any]] = []
    for name, region in sorted(found):
        newest = found[name, region][0]
        source = copy_of(newest)
        started = newest.get("StartTime")
        age = (now - started).total_seconds() if isinstance(started, datetime) else None
        data.append(
            {
                "name": name,
                "region": region,
                "copy_of": None if source is None else "/".join(source),
                "last_run": started.isoformat() if isinstance(started, datetime) else None,
                "age_s": None if age is None else round(age, 1),
                "data_bytes": data_bytes(newest),
                "size_gib": int(newest.get("VolumeSize", 0)),
                "snapshots": len(found[name, region]),
                "consistency": consistency_of(newest),
                "newest": newest["SnapshotId"],
                "kept_volume": next(
                    (
                        str(v["VolumeId"])
                        for v in kept
                        if region == m.region and holds_newest(v, name, newest)
                    ),
                    None,
                ),
            }
        )
    rows = [
        [
            d["name"],
            d["last_run"] or "-",
            human_duration(d["age_s"]) if d["age_s"] is not None else "-",
            human_bytes(d["data_bytes"]) if d["data_bytes"] is not None else "-",
            f"{d['size_gib']} GiB",
            d["snapshots"],
            d["consistency"],
            d["kept_volume"] or "-",
        ]
        for d in data
    ]
    headers = ["BACKUP", "LAST RUN", "AGE", "DATA", "SIZE", "SNAPSHOTS", "CONSISTENCY"]
    headers.append("KEPT VOLUME")
    if args.copy_region:
        headers.insert(1, "REGION")
        for row, d in zip(rows, data, strict=True):
            row.insert(1, d["region"] + (" (copy)" if d["copy_of"] else ""))
    out.table(data, rows, headers, "no backups")
    return EXIT_OK


async def _kept_volumes(m: Any) -> list[dict[str, Any]]:
    """Our volumes that runs kept for their next run (:mod:`asyncstage.backup.warm`)."""
    found = await m.ec2.describe_volumes(filters=[{"Name": "tag-key", "Values": [KEPT_TAG]}])
    return ours("volume", found, keys=m.known_key_names(), level=logging.DEBUG)


async def _backup_snapshots(m: Any) -> list[dict[str, Any]]:
    """Our snapshots that are complete backups marked by a run, newest first."""
    return [
        s
        for s in await m.snapshots()
        if is_backup(s) and tags_of(s).get(tag("backup-state")) == "complete"
    ]
