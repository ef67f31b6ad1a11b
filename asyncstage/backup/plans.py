"""Backup plans: many backups run at once, each failure its own.

A plan is a TOML file or the same as Python objects (:class:`Plan`, :class:`PlannedBackup`)::

    concurrency = 8          # backups at once (default 4)
    wait = 600               # seconds to wait for another run of the same name (default 0)

    [[backup]]
    name = "web1"
    sources = ["web1:/srv/app", "/etc/app.conf"]

    [[backup]]
    name = "db1"
    sources = [  # an inline table stays on one line (TOML)
      { path = "db1:/var/lib/pg", pre = { command = "pg-start" }, post = { command = "pg-stop" } },
    ]

    [[backup]]
    name = "www"
    sources = ["www:/srv/www"]
    retention = { keep_daily = 7, keep_weekly = 4 }   # applied after each successful run
    copy_to = ["eu-west-1", { region = "us-west-2", kms_key_id = "alias/dr" }]

    [[backup]]
    name = "logs"
    sources = ["web1:/var/log/app"]
    keep_volume = true       # keep the work volume: reruns copy only the change into it

    [[backup]]
    name = "db1-disks"
    mode = "snapshot"        # the server's own volumes, at one instant
    server = "db1"

Everything read from a plan is checked before any backup starts: unknown keys, names that
break the naming rule, sources that are not strings or hold control characters, hooks
with bad timeouts, and a name used twice are typed errors
(:class:`~asyncstage.errors.InvalidArgument`, :class:`~asyncstage.errors.InvalidName`).
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from asyncstage import names
from asyncstage.backup.copy import backup
from asyncstage.backup.hooks import Hook, Hooked
from asyncstage.backup.keep import (
    CopyTarget,
    check_keys,
    keep_after,
    parse_copy_to,
    parse_retention,
    run_snapshots,
)
from asyncstage.backup.snapshot_mode import snapshot_backup
from asyncstage.errors import InvalidArgument
from asyncstage.manager import Manager
from asyncstage.retention import Policy
from asyncstage.transfer import Progress

__all__ = [
    "BackupOutcome",
    "Plan",
    "PlanReport",
    "PlannedBackup",
    "load_plan",
    "parse_plan",
    "run_plan",
]

Mode = Literal["copy", "snapshot"]
_PLAN_KEYS = {"concurrency", "wait", "backup"}
_BACKUP_KEYS = {"name", "sources", "mode", "server", "size", "zone", "retention", "copy_to"} | {
    "keep_volume"
}
_SOURCE_KEYS = {"path", "pre", "post"}
_HOOK_KEYS = {"command", "timeout", "on_error"}


@dataclass(frozen=True)
class PlannedBackup:
    """One backup of a plan: ``copy`` mode (sources) or ``snapshot`` mode (a server)."""

    name: str
    sources: tuple[str | Hooked, ...] = ()
    mode: Mode = "copy"
    server: str | None = None
    """``snapshot``: the server whose volumes are taken; ``copy``: where the work volume
    is made (default: any server)."""
    size: int | None = None
    zone: str | None = None
    retention: Policy | None = None
    """Applied to the backup's snapshots after each successful run (and to its copies,
    unless a target has its own); a ``snapshot``-mode set is kept or removed whole."""
    copy_to: tuple[CopyTarget, ...] = ()
    """Regions that get a copy of each new snapshot (:mod:`asyncstage.backup.keep`)."""
    keep_volume: bool = False
    """``copy``: keep the work volume for the next run (:mod:`asyncstage.backup.warm`)."""

    def __post_init__(self) -> None:
        names.check_name(self.name, "backup")
        retention: object = self.retention
        if retention is not None and not isinstance(retention, Policy):
            object.__setattr__(self, "retention", parse_retention(self.name, retention))
        object.__setattr__(self, "copy_to", parse_copy_to(self.name, list(self.copy_to)))
        if self.mode not in ("copy", "snapshot"):
            raise InvalidArgument(f"backup {self.name}: mode is 'copy' or 'snapshot'")
        if self.mode == "copy" and not self.sources:
            raise InvalidArgument(f"backup {self.name}: a copy backup needs sources")
        if not isinstance(self.keep_volume, bool):
            raise InvalidArgument(f"backup {self.name}: keep_volume is true or false")
        if self.mode == "snapshot" and self.keep_volume:
            raise InvalidArgument(
                f"backup {self.name}: keep_volume is for copy backups (snapshot mode has none)"
            )
        if self.mode == "snapshot" and (self.server is None or self.sources):
            raise InvalidArgument(
                f"backup {self.name}: a snapshot backup names a server and no sources"
            )
        if self.server is not None:
            names.check_name(self.server, "server")
        if self.zone is not None and not (
            isinstance(self.zone, str) and re.fullmatch(r"[a-z0-9-]{1,64}", self.zone)
        ):
            raise InvalidArgument(f"backup {self.name}: zone {self.zone!r} is not a zone name")
        if self.size is not None and not (isinstance(self.size, int) and 0 < self.size <= 16384):
            raise InvalidArgument(f"backup {self.name}: size is 1..16384 GiB")
        for s in self.sources:
            _check_source(self.name, s.source if isinstance(s, Hooked) else s)


def _check_source(name: str, source: object) -> None:
    if not isinstance(source, str | os.PathLike):
        raise InvalidArgument(f"backup {name}: a source is a string, not {source!r}")
    text = os.fspath(source)
    if not isinstance(text, str) or not text or any(ord(c) < 32 or c == "\x7f" for c in text):
        raise InvalidArgument(
            f"backup {name}: source {text!r} is empty or holds control characters"
        )


@dataclass(frozen=True)
class Plan:
    """Backups to run at once, ``concurrency`` at a time."""

    backups: tuple[PlannedBackup, ...]
    concurrency: int = 4
    wait: float = 0.0

    def __post_init__(self) -> None:
        if not self.backups:
            raise InvalidArgument("plan: no backups")
        seen: set[str] = set()
        for b in self.backups:
            if b.name in seen:
                raise InvalidArgument(f"plan: backup {b.name!r} is listed twice")
            seen.add(b.name)
        if not (isinstance(self.concurrency, int) and 1 <= self.concurrency <= 256):
            raise InvalidArgument("plan: concurrency is 1..256")
        if not (isinstance(self.wait, int | float) and 0 <= self.wait <= 86400):
            raise InvalidArgument("plan: wait is 0..86400 seconds")


def _only(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InvalidArgument(f"{where}: unknown keys {unknown} (known: {sorted(allowed)})")


def _hook(where: str, raw: object) -> Hook | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where}: a hook is a table with command, timeout, on_error")
    _only(where, raw, _HOOK_KEYS)
    if "command" not in raw:
        raise InvalidArgument(f"{where}: a hook needs a command")
    return Hook(**raw)


def _source(where: str, raw: object) -> str | Hooked:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, Mapping) or "path" not in raw:
        raise InvalidArgument(f"{where}: a source is a string or a table with a path")
    _only(where, raw, _SOURCE_KEYS)
    pre, post = _hook(f"{where} pre", raw.get("pre")), _hook(f"{where} post", raw.get("post"))
    return Hooked(raw["path"], pre=pre, post=post)


def parse_plan(data: Mapping[str, Any]) -> Plan:
    """A :class:`Plan` from the tables of a TOML plan (validated)."""
    _only("plan", data, _PLAN_KEYS)
    raw = data.get("backup", [])
    if not isinstance(raw, list):
        raise InvalidArgument("plan: [[backup]] tables are expected")
    backups: list[PlannedBackup] = []
    for i, b in enumerate(raw):
        if not isinstance(b, Mapping):
            raise InvalidArgument(f"plan: backup {i + 1} is not a table")
        _only(f"plan backup {i + 1}", b, _BACKUP_KEYS)
        sources = b.get("sources", [])
        if not isinstance(sources, list):
            raise InvalidArgument(f"plan backup {i + 1}: sources is a list")
        where = f"plan backup {b.get('name', i + 1)!s:.40}"
        backups.append(
            PlannedBackup(
                name=b.get("name", ""),
                sources=tuple(_source(where, s) for s in sources),
                mode=b.get("mode", "copy"),
                server=b.get("server"),
                size=b.get("size"),
                zone=b.get("zone"),
                retention=None
                if b.get("retention") is None
                else parse_retention(where, b["retention"]),
                copy_to=parse_copy_to(where, b.get("copy_to", [])),
                keep_volume=b.get("keep_volume", False),
            )
        )
    return Plan(tuple(backups), concurrency=data.get("concurrency", 4), wait=data.get("wait", 0.0))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and check a TOML plan file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"plan {os.fspath(path)}: not valid TOML: {e}") from e
    except OSError as e:
        raise InvalidArgument(f"plan {os.fspath(path)}: {e.strerror}") from e
    return parse_plan(data)


@dataclass
class BackupOutcome:
    """One backup of a plan: its state as it runs, and its result or error."""

    name: str
    mode: Mode
    phase: str = "waiting"
    bytes_done: int = 0
    total: int | None = None
    rate: float = 0.0
    started: float | None = None
    elapsed: float = 0.0
    ok: bool | None = None
    error: str = ""
    error_type: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def eta(self) -> float | None:
        """Seconds left of the copy, when rsync knows the total."""
        if self.total and self.rate > 0 and self.total > self.bytes_done:
            return (self.total - self.bytes_done) / self.rate
        return None

    def as_dict(self) -> dict[str, Any]:
        """The outcome as a plain dict (the ``--json`` report)."""
        return {
            "name": self.name,
            "mode": self.mode,
            "ok": bool(self.ok),
            "error_type": self.error_type or None,
            "error": self.error or None,
            "elapsed": round(self.elapsed, 3),
            "result": self.result or None,
        }


@dataclass
class PlanReport:
    """Every backup's outcome, in the plan's order."""

    outcomes: list[BackupOutcome]

    @property
    def ok(self) -> bool:
        """Whether every backup succeeded."""
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[BackupOutcome]:
        """The backups that failed."""
        return [o for o in self.outcomes if not o.ok]

    def as_dict(self) -> dict[str, Any]:
        """The report as a plain dict (``--json``)."""
        return {
            "ok": self.ok,
            "failed": [o.name for o in self.failed],
            "backups": [o.as_dict() for o in self.outcomes],
        }


async def run_plan(
    m: Manager,
    plan: Plan | Sequence[PlannedBackup],
    *,
    on_change: Callable[[BackupOutcome], object] | None = None,
    regions: Mapping[str, Manager] = {},
) -> PlanReport:
    """Run every backup of ``plan`` at once (``plan.concurrency`` at a time); one that
    fails never stops the others. ``on_change`` is told each outcome as it changes.

    After each successful backup its ``copy_to`` copies are made (with ``regions``, a
    manager per destination region) and its ``retention`` applied; a failure there fails
    that backup's outcome (its new snapshot stays).
    """
    if not isinstance(plan, Plan):
        plan = Plan(tuple(plan))
    outcomes = [BackupOutcome(b.name, b.mode) for b in plan.backups]
    limit = anyio.CapacityLimiter(plan.concurrency)
    tell = on_change or (lambda _: None)

    async def one(b: PlannedBackup, o: BackupOutcome) -> None:
        async with limit:
            o.started = time.monotonic()
            o.phase = "starting"
            tell(o)

            def phase(p: str) -> None:
                o.phase = p
                tell(o)

            def progress(p: Progress) -> None:
                o.bytes_done, o.total, o.rate = p.bytes_done, p.total, p.rate
                tell(o)

            try:
                await check_keys(regions, b.copy_to)  # a missing key: before any work
                o.result = await _run_one(m, b, plan.wait, phase, progress)
                if b.retention is not None or b.copy_to:
                    o.result |= await keep_after(
                        m,
                        b.name,
                        run_snapshots(o.result),
                        retention=b.retention,
                        copy_to=b.copy_to,
                        regions=regions,
                        phase=phase,
                    )
                o.ok, o.phase = True, "done"
            except Exception as e:  # each backup's failure is its own
                o.ok, o.phase = False, "failed"
                o.error_type, o.error = type(e).__name__, str(e)
            finally:
                o.elapsed = time.monotonic() - o.started
                tell(o)

    async with anyio.create_task_group() as tg:
        for b, o in zip(plan.backups, outcomes, strict=True):
            tg.start_soon(one, b, o)
    return PlanReport(outcomes)


async def _run_one(
    m: Manager,
    b: PlannedBackup,
    wait: float,
    phase: Callable[[str], None],
    progress: Callable[[Progress], None],
) -> dict[str, Any]:
    if b.mode == "snapshot":
        assert b.server is not None
        phase("snapshot")
        return (await snapshot_backup(m, b.name, b.server, wait=wait)).as_dict()
    server = None
    if b.server is not None:
        server = m.find_server_by_name(b.server)
        if server is None:
            raise InvalidArgument(f"backup {b.name}: no managed server named {b.server!r}")
    done = await backup(
        m,
        b.name,
        list(b.sources),
        server=server,
        size=b.size,
        zone=b.zone,
        wait=wait,
        progress=progress,
        phase=phase,
        keep_volume=b.keep_volume,
    )
    return done.as_dict()
